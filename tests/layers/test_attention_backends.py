"""The Mosaic GPU kernels (CPU interpreter) and the reference give the same logits and greedy
generation in a bf16 model; unsupported shapes are refused at engine start."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.layers.attention import AttentionConfig
from jaxserve.weights.loader import load_model
from tests.models.forward import paged_logits

ENGINE = dict(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, block_size=16,
              num_kv_blocks=12, use_tqdm_on_load=False)


def test_kernel_logits_match_reference_in_a_model(tiny_checkpoints):
    path = tiny_checkpoints("Qwen3ForCausalLM", head_dim=64)  # a kernel head_dim
    prompts = [list(range(5, 40)), list(range(100, 109))]
    ref = paged_logits(load_model(path, "bfloat16"), prompts, block_size=16, chunk=16)
    kernel_model = load_model(path, "bfloat16",
                              attn=AttentionConfig(backend="pallas", interpret=True))
    ours = paged_logits(kernel_model, prompts, block_size=16, chunk=16)
    for a, b in zip(ours, ref):  # bf16 model: the kernel rounds P to bf16 for P @ V
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2)


def test_greedy_generation_with_kernels_equals_reference(tiny_checkpoints, tmp_path, caplog):
    path = tiny_checkpoints("LlamaForCausalLM", head_dim=64)
    prompts = [{"prompt_token_ids": list(range(7, 30))}, {"prompt_token_ids": [11, 12, 13]}]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    cache = str(tmp_path / "xla")
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.attention"):
        kernel = LLM(path, attention_backend="pallas", compilation_cache_dir=cache,
                     dtype="bfloat16", **ENGINE)
    assert "pallas in the CPU interpreter" in caplog.text  # the choice is logged once
    reference = LLM(path, attention_backend="reference", compilation_cache_dir=cache,
                    dtype="bfloat16", **ENGINE)
    got = [o.outputs[0].token_ids for o in kernel.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    assert got == want and all(len(t) == 5 for t in got)
    s = kernel.stats()
    assert s.kv_blocks_free == s.kv_blocks_total


@pytest.mark.parametrize("overrides,engine,field", [
    (dict(head_dim=32), dict(dtype="bfloat16"), "head_dim 32"),
    (dict(head_dim=64), dict(dtype="float32"), "dtype float32"),
    (dict(head_dim=64), dict(dtype="bfloat16", block_size=8), "block_size 8"),
])
def test_pallas_refuses_unsupported_models_at_start(tiny_checkpoints, tmp_path, monkeypatch,
                                                    overrides, engine, field):
    """Refused before anything is compiled, with the field named."""
    from jaxserve.runtime.model_runner import ModelRunner

    path = tiny_checkpoints("LlamaForCausalLM", **overrides)
    monkeypatch.setattr(ModelRunner, "warmup", lambda *a, **k: pytest.fail("compiled"))
    args = {**ENGINE, "num_kv_blocks": 24, **engine}
    with pytest.raises(ValueError, match=f"attention_backend pallas: {field}"):
        LLM(path, attention_backend="pallas", compilation_cache_dir=str(tmp_path), **args)
