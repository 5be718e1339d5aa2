"""bfloat16 parity (tolerance relative to HF's own bf16 error) and sharded safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from jaxserve.cpu_kernels import packed_matmul
from jaxserve.layers.linear import Embedding, Linear, PackedGateUp, PackedProjections

from jaxserve.weights.loader import load_model
from tests.checkpoints import TINY_ARCHS
from tests.models.forward import paged_logits
from tests.models.test_hf_parity import hf_logits, make_prompts


def _rel_err(ours, ref):
    return max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, ref))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bfloat16_error_is_like_hf_bfloat16(arch, tiny_checkpoints):
    """bf16 has an 8-bit mantissa (~4e-3 relative per rounding); two bf16 implementations that
    round in different places cannot agree to much better than that. So we measure both against
    the float32 HF logits and require our bf16 error to be within 2x HF's own bf16 error
    (plus 1e-2 of the logit range, a floor for the few-ulp differences of tiny models)."""
    path = tiny_checkpoints(arch)
    prompts = make_prompts(500, seed=7)[:3]
    ref = hf_logits(path, prompts)
    hf_bf16 = hf_logits(path, prompts, dtype=torch.bfloat16)
    ours = paged_logits(load_model(path, dtype="bfloat16"), prompts)
    assert _rel_err(ours, ref) <= 2 * _rel_err(hf_bf16, ref) + 1e-2


@pytest.mark.skipif(not packed_matmul.available(), reason="no packed-weight kernel on this CPU")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_bfloat16_weights_error_is_like_hf_bfloat16(arch, tiny_checkpoints):
    """With the CPU kernels on, every bf16 projection (and a tied embedding) is packed once at
    load, q, k and v fused, a bias-free gate and up fused under silu, and every step, prefill
    and decode, runs the packed kernels: same bound as above."""
    path = tiny_checkpoints(arch)
    prompts = make_prompts(500, seed=7)[:3]
    loaded = load_model(path, dtype="bfloat16", cpu_matvec=True)
    nodes = [m for _, m in nnx.iter_graph(loaded.model)]
    linears = [m for m in nodes if isinstance(m, Linear)]
    assert linears and all(m.packed for m in linears)
    fused = [m for m in nodes if isinstance(m, PackedGateUp)]
    fusable = loaded.config.hidden_act in ("silu", "swish") and not loaded.config.mlp_bias
    assert len(fused) == (loaded.config.num_layers if fusable else 0)  # Mistral, Qwen2, Qwen3
    qkv = [m for m in nodes if isinstance(m, PackedProjections)]  # whole panels: all fuse
    assert len(qkv) == loaded.config.num_layers
    tables = [m for m in nodes if isinstance(m, Embedding)]
    assert [m.packed for m in tables] == [loaded.config.tie_word_embeddings]
    head = loaded.model.lm_head
    assert head is None or head.f32_out  # untied: logits from the f32 sums
    ref = hf_logits(path, prompts)
    hf_bf16 = hf_logits(path, prompts, dtype=torch.bfloat16)
    assert _rel_err(paged_logits(loaded, prompts), ref) <= 2 * _rel_err(hf_bf16, ref) + 1e-2


def test_sharded_checkpoint_loads_identically(tiny_checkpoints, tmp_path):
    import transformers

    src = tiny_checkpoints("Qwen2ForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").exists()
    prompts = make_prompts(500)[:2]
    for a, b in zip(paged_logits(load_model(src), prompts), paged_logits(load_model(str(out)), prompts)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not packed_matmul.available(), reason="no packed-weight kernel on this CPU")
@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])  # untied / tied
def test_packed_float32_weights_match_hf_float32(arch, tiny_checkpoints):
    """f32 models pack too ([P, K, 16] panels, vfmadd): logits within f32 summation-order
    noise of HF's float32 ones."""
    path = tiny_checkpoints(arch)
    prompts = make_prompts(500, seed=7)[:3]
    loaded = load_model(path, dtype="float32", cpu_matvec=True)
    linears = [m for _, m in nnx.iter_graph(loaded.model) if isinstance(m, Linear)]
    assert linears and all(m.packed for m in linears)
    assert _rel_err(paged_logits(loaded, prompts), hf_logits(path, prompts)) < 1e-4


@pytest.mark.skipif(not packed_matmul.available(), reason="no packed-weight kernel on this CPU")
@pytest.mark.parametrize("method", [None, "int8", "int4"])
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])  # q, k, v biases
def test_fused_qkv_computes_what_the_separate_projections_do(method, arch, tiny_checkpoints,
                                                             monkeypatch):
    """q, k and v in one kernel call: the same sums, bias and rounding per column as three
    calls, so the logits are equal bit for bit."""
    path = tiny_checkpoints(arch)
    prompts = make_prompts(500, seed=3)[:2]
    kw = dict(dtype="bfloat16", quantization=method, cpu_matvec=True)
    fused = load_model(path, **kw)
    monkeypatch.setattr(PackedProjections, "fusable", staticmethod(lambda parts: False))
    separate = load_model(path, **kw)
    count = lambda loaded: sum(isinstance(m, PackedProjections)  # noqa: E731
                               for _, m in nnx.iter_graph(loaded.model))
    assert (count(fused), count(separate)) == (fused.config.num_layers, 0)
    assert fused.model.layers[0].qkv.bias is not None
    for a, b in zip(paged_logits(fused, prompts), paged_logits(separate, prompts)):
        np.testing.assert_array_equal(a, b)
