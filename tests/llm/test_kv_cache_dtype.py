"""LLM(kv_cache_dtype=int8|fp8) end to end: close to the float cache, prefix cache hits give the
same tokens, the pool comes back empty, the KV budget counts the smaller blocks, no step makes
a full-precision copy of the cache, and bad settings are refused naming the field."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.llm import EngineArgs, LLM
from jaxserve.runtime.kv_cache import kv_block_bytes
from tests.llm._hf import make_prompts
from tests.llm.conftest import assert_idle, greedy, token_prompts
from tests.models.forward import paged_logits

ARCH = "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_model_logits_with_quantized_kv_close_to_float(name, tiny_checkpoints):
    """Every position of chunked prefills (later chunks read the quantized cache): the logit
    error is small next to the logits' own spread, the argmax almost always unchanged."""
    from jaxserve.weights.loader import load_model

    loaded = load_model(tiny_checkpoints(ARCH))
    prompts = make_prompts(loaded.config.vocab_size, seed=3, lens=(61, 24, 9))
    ref = paged_logits(loaded, prompts, chunk=8)
    got = paged_logits(loaded, prompts, chunk=8, kv_cache_dtype=name)
    ref, got = np.concatenate(ref), np.concatenate(got)
    rms = np.sqrt(((got - ref) ** 2).mean(axis=-1)) / ref.std(axis=-1)  # per position
    # Per element, int8 is off by <= 1/254 of a vector's range, fp8 e4m3 by <= 2^-4 relative
    # (tests/layers/test_kv_quant.py); two layers of this random model (weights N(0, 0.15))
    # amplify that: measured worst positions 2.5% (int8) and 9.5% (fp8) of the logits' spread.
    # Bounds at 2x; a cache read without its scales is off by ~100%.
    assert rms.max() < (0.05 if name == "int8" else 0.2), rms.max()
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= (0.97 if name == "int8" else 0.85), agree  # measured 0.99 / 0.93


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 0.2)])
def test_cpu_kernel_logits_over_quantized_kv_match_reference(tiny_checkpoints, dtype, tol):
    """Chunked prefills through the model, int8 cache: the CPU kernel (writing and reading its own
    layout) against the reference over kv_quant.py's pages. The bytes are the same, so the
    logits differ by f32 summation order only (float32: worst position measured 4.3e-6 of the
    logits' spread), or by bf16 rounding of each layer's attention output (bfloat16: 0.091,
    where float pages give 0.067 between the same two backends). Bounds ~2-5x those."""
    from jaxserve.layers.attention import AttentionConfig
    from jaxserve.weights.loader import load_model

    path = tiny_checkpoints(ARCH)
    ref_model = load_model(path, dtype)
    prompts = make_prompts(ref_model.config.vocab_size, seed=3, lens=(61, 24, 9))
    ref = np.concatenate(paged_logits(ref_model, prompts, chunk=8, kv_cache_dtype="int8"))
    cpu_model = load_model(path, dtype, attn=AttentionConfig(backend="cpu"))
    got = np.concatenate(paged_logits(cpu_model, prompts, chunk=8, kv_cache_dtype="int8"))
    err = np.abs(got - ref).max(axis=-1) / ref.std(axis=-1)  # per position
    assert err.max() < tol, err.max()


def test_greedy_with_int8_kv_close_to_float_and_prefix_hits_equal(make_llm):
    float_llm = make_llm(ARCH)
    int8_llm = make_llm(ARCH, kv_cache_dtype="int8")
    assert int8_llm.engine.runner.kv_cache[0][0].dtype == np.int8
    prompts = token_prompts(make_prompts(float_llm.engine.runner.model_config.vocab_size, seed=4))
    params = greedy(12)
    want = [o.outputs[0].token_ids for o in float_llm.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in int8_llm.generate(prompts, params, use_tqdm=False)]
    first = np.mean([g[0] == w[0] for g, w in zip(got, want)])
    same = np.mean([a == b for g, w in zip(got, want) for a, b in zip(g, w)])
    assert first == 1.0 and same >= 0.85, (first, same, got, want)
    # the same prompts again: full blocks come from the prefix cache (quantized bytes shared)
    again = [o.outputs[0].token_ids for o in int8_llm.generate(prompts, params, use_tqdm=False)]
    assert again == got
    assert int8_llm.stats().prefix_cache_hits > 0


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_cpu_kernel_over_quantized_kv_gives_the_blockwise_tokens(make_llm, name):
    """The C++ kernel (what auto picks on CPU) quantizes K/V as kv_quant.py does and attends over
    the same bytes as the blockwise loops (f32 math both): the same greedy tokens, mixed prefill
    chunks and decodes; every block back in the pool. (float32 model: in bfloat16 this random
    model's greedy tokens already differ between float-page backends, on near-tied logits.)"""
    prompts = token_prompts(make_prompts(make_llm(ARCH).engine.runner.model_config.vocab_size,
                                         seed=5))
    kernel = make_llm(ARCH, kv_cache_dtype=name, attention_backend="cpu")
    loops = make_llm(ARCH, kv_cache_dtype=name, attention_backend="blockwise")
    page = kernel.engine.runner.kv_cache[0][0]
    assert page.dtype == (np.int8 if name == "int8" else np.uint8)
    assert page.shape[-1] == kernel.engine.runner.model_config.head_dim + 4
    got = [o.outputs[0].token_ids for o in kernel.generate(prompts, greedy(12), use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in loops.generate(prompts, greedy(12), use_tqdm=False)]
    assert got == want and all(len(t) == 12 for t in got)
    assert_idle(kernel)


def test_int8_kv_under_preemption_keeps_outputs(make_llm):
    """Preempted requests recompute their int8 pages: the same tokens as without preemption
    (a token's quantized bytes depend only on its own K/V, not on the batch around it)."""
    prompts = token_prompts(make_prompts(make_llm(ARCH).engine.runner.model_config.vocab_size,
                                         seed=4))
    plain = make_llm(ARCH, kv_cache_dtype="int8")
    tight = make_llm(ARCH, kv_cache_dtype="int8", num_kv_blocks=24)  # ~40 blocks needed at once
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy(12), use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, greedy(12), use_tqdm=False)]
    assert tight.stats().num_preemptions > 0
    assert got == want


def test_kv_budget_counts_quantized_bytes_and_scales(tiny_checkpoints):
    cfg = ModelConfig.from_dir(tiny_checkpoints(ARCH))
    kvh, d, layers, bs = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, 16
    bf16 = kv_block_bytes(cfg, bs, "bfloat16")
    assert bf16 == layers * 2 * kvh * bs * d * 2
    for name in ("int8", "fp8"):
        assert kv_block_bytes(cfg, bs, "bfloat16", name) == layers * 2 * kvh * bs * (d + 4)
    from jaxserve import llm as llm_module

    args = EngineArgs(model="m", kv_cache_memory_bytes=1 << 26, kv_cache_dtype="int8")
    blocks = llm_module._num_kv_blocks(args, kv_block_bytes(cfg, bs, "bfloat16", "int8"), 1 << 30)
    assert blocks == (1 << 26) // (layers * 2 * kvh * bs * (d + 4)) > (1 << 26) // bf16


@pytest.mark.parametrize("backend", ["auto", "blockwise"])  # auto: the CPU kernel
def test_no_step_makes_a_full_precision_copy_of_the_cache(make_llm, backend):
    """The decode reads int8 pages: no array of the cache's shape in f32 / bf16 in any step,
    and no copy of the int8 pages (written in place)."""
    extra = {} if backend == "auto" else dict(attention_backend=backend)
    runner = make_llm(ARCH, kv_cache_dtype="int8", **extra).engine.runner
    kvh, nb, bs, row = runner.kv_cache[0][0].shape
    d = runner.model_config.head_dim
    assert row == d + 4 and runner.kv_cache[0][0].dtype == np.int8  # values + scale bytes
    wide = re.compile(r"= (?:f32|bf16|f16)\[([\d,]+)\]")
    copy = re.compile(r"= \w+\[([\d,]+)\]\S* copy\(")
    full = {f"{kvh},{nb},{bs},{n}" for n in (d, row)} | {f"{kvh},{nb * bs},{n}" for n in (d, row)}
    for key in runner.buckets.step_shapes():
        text = runner.executables.get("step", key).as_text()
        wide_full = [m for m in wide.findall(text) if m in full]
        assert not wide_full, f"step {key}: a full-precision array of the whole cache's shape"
        copies = [m for m in copy.findall(text) if m in full]
        assert not copies, f"step {key}: copies of a whole KV cache array: {copies}"


def test_bad_kv_cache_dtype_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="kv_cache_dtype: 'int4' is not one of auto, int8, fp8"):
        EngineArgs(model="unused", kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8' is not supported by the pallas"):
        LLM("unused-model-never-loaded", attention_backend="pallas", kv_cache_dtype="fp8",
            use_tqdm_on_load=False, compilation_cache_dir=None)
