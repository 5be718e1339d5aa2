"""Quantized KV cache (int8 / fp8): quantization bit for bit against numpy / ml_dtypes, page
writes, and attention over quantized pages against the float naive reference (NaN-poisoned)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.layers.attention import (
    AttentionConfig,
    AttentionMetadata,
    backend_request,
    check_kv_backend,
    paged_attention,
    write_kv,
)
from jaxserve.layers.blockwise_attention import BlockwiseSizes, blockwise_paged_attention
from jaxserve.layers.kv_quant import check_kv_cache_dtype, quantize_tokens
from tests.pallas_kernels._paged_cases import make_case, naive_ragged

DTYPES = {"int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}
CASE = dict(seq_lens=[1, 37, 130, 0, 16, 77], q_lens=[1, 1, 70, 0, 16, 3], num_tokens=100,
            max_blocks=14, seed=3)
# Quantized attention vs float attention, as relative Frobenius error of the output (and max
# abs error). Inputs are N(0, 1), head_dim 64 (max |x| over a vector ~2.5-3.5). int8: each
# element is off by <= scale / 2 = max|x| / 254 (~0.4% of the vector's range, ~0.2% RMS
# relative), V's error passes through the convex softmax mix, K's moves scores by ~1e-2 at
# most; measured 0.7% relative, 0.014 max -> bounds 2% and 0.05. fp8 e4m3: 3 mantissa bits,
# relative error <= 2^-4 per element (~3.6% RMS); measured 3.2% and 0.11 -> bounds 6% and 0.3.
TOLERANCE = {"int8": (0.02, 0.05), "fp8": (0.06, 0.3)}


def _np_quantize(x: np.ndarray, name: str):
    """x [..., D] f32 -> (values, scales [...]): the symmetric quantizer, per vector, values
    x * (1 / scale) in f32 (kv_quant.py's rule; x / scale differs in ~1 value in 2000)."""
    qmax = np.float32(127.0 if name == "int8" else 448.0)
    scale = (np.abs(x).max(axis=-1) * (np.float32(1.0) / qmax)).astype(np.float32)
    inv = np.float32(1.0) / np.where(scale > 0, scale, np.float32(1.0))
    y = np.where(scale[..., None] > 0, x * inv[..., None], np.float32(0.0)).astype(np.float32)
    if name == "int8":
        return np.clip(np.round(y), -127, 127).astype(np.int8), scale
    return np.clip(y, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn), scale


def _pack(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Page rows [..., D + 4]: the values, then the float32 scale's bytes (layers/kv_quant.py);
    int8 pages for int8, uint8 (the e4m3 bit patterns) for fp8."""
    page = np.int8 if values.dtype == np.int8 else np.uint8
    raw = np.ascontiguousarray(scales.astype(np.float32))[..., None].view(page)  # [..., 4]
    return np.concatenate([values.view(page), raw], axis=-1)


def _quantized_case(name: str):
    """(float case, quantized K and V pages, the case on the dequantized pages). Every slot no
    sequence owns has a NaN scale (and NaN values for fp8; int8 holds garbage there)."""
    case = make_case(**CASE)
    unused = np.isnan(case.k_pages[0, :, :, 0])  # [NB, bs]: poisoned by make_case
    packed, deq = [], []
    for pages in (case.k_pages, case.v_pages):
        values, scales = _np_quantize(np.nan_to_num(pages), name)
        scales[:, unused] = np.nan
        if name == "fp8":
            values[:, unused] = np.nan
        else:
            values[:, unused] = np.random.default_rng(0).integers(-127, 128, values[:, unused].shape)
        packed.append(_pack(values, scales))
        deq.append(values.astype(np.float32) * scales[..., None])
    dequantized = dataclasses.replace(case, k_pages=deq[0], v_pages=deq[1])
    return case, tuple(packed), dequantized


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_quantize_tokens_matches_numpy_bit_for_bit(name):
    x = np.random.default_rng(1).standard_normal((400, 3, 64)).astype(np.float32)
    x[5, 1] = 0.0  # an all-zero vector: scale 0, values 0
    x[7, 0, :9] *= 50.0  # an outlier
    values, scales = jax.jit(quantize_tokens, static_argnums=1)(jnp.asarray(x), DTYPES[name])
    want_v, want_s = _np_quantize(x, name)
    np.testing.assert_array_equal(np.asarray(scales), want_s)
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), want_v.view(np.uint8))
    assert float(scales[5, 1]) == 0.0


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("window,cap", [(None, None), (24, 5.0)])
def test_blockwise_over_quantized_pages(name, window, cap):
    case, (kq, vq), dequantized = _quantized_case(name)
    fn = jax.jit(lambda *a, **kw: blockwise_paged_attention(
        *a, **kw, sliding_window=window, logits_soft_cap=cap, sizes=BlockwiseSizes(2, 3, 16)))
    got = np.asarray(fn(case.q, kq, vq, case.block_tables, case.seq_lens, case.query_start_loc))
    assert kq.shape[-1] == case.k_pages.shape[-1] + 4  # values + the scale's 4 bytes per row
    assert not np.isnan(got).any()  # NaN scales / fp8 NaN in unused slots never leak
    # exactly float attention over the dequantized pages ...
    np.testing.assert_allclose(got, naive_ragged(dequantized, sliding_window=window,
                                                 logits_soft_cap=cap), rtol=2e-5, atol=2e-5)
    # ... and close to float attention over the unquantized pages
    want = naive_ragged(case, sliding_window=window, logits_soft_cap=cap)
    rel, worst = TOLERANCE[name]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < rel
    assert np.abs(got - want).max() < worst


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_write_then_attend_through_the_dispatch(name):
    """write_kv quantizes each token into its slot (values and scale as numpy's quantizer);
    the reference and blockwise backends read the same pages to the same result."""
    case = make_case(**CASE)
    kvh, nb, bs, d = case.k_pages.shape
    slots = np.array([b * bs + o for b in range(1, nb) for o in range(bs)
                      if not np.isnan(case.k_pages[0, b, o, 0])], np.int32)
    k_tok = case.k_pages.reshape(kvh, nb * bs, d)[:, slots].transpose(1, 0, 2)  # [T, Hkv, D]
    v_tok = case.v_pages.reshape(kvh, nb * bs, d)[:, slots].transpose(1, 0, 2)
    fill = _pack(np.full((kvh, nb, bs, d), np.nan if name == "fp8" else 99, DTYPES[name]),
                 np.full((kvh, nb, bs), np.nan, np.float32))  # every slot NaN-poisoned
    kv = jax.jit(write_kv)(jnp.asarray(fill), jnp.asarray(fill), k_tok, v_tok,
                           jnp.asarray(slots))
    rows = np.asarray(kv[0]).reshape(kvh, nb * bs, d + 4)[:, slots].transpose(1, 0, 2)
    want = _pack(*_np_quantize(k_tok, name))  # [T, Hkv, D + 4]
    np.testing.assert_array_equal(rows.view(np.uint8), want.view(np.uint8))
    md = AttentionMetadata(positions=jnp.zeros(len(case.q), jnp.int32),
                           slot_mapping=jnp.zeros(len(case.q), jnp.int32),
                           block_tables=jnp.asarray(case.block_tables),
                           seq_lens=jnp.asarray(case.seq_lens),
                           query_start_loc=jnp.asarray(case.query_start_loc))
    scale = d**-0.5
    outs = {b: np.asarray(jax.jit(lambda q, kv, md, b=b: paged_attention(
        q, *kv, md, AttentionConfig(backend=b), scale))(jnp.asarray(case.q), kv, md))
            for b in ("reference", "blockwise")}
    assert not np.isnan(outs["reference"]).any()
    np.testing.assert_allclose(outs["blockwise"], outs["reference"], rtol=2e-5, atol=2e-5)
    rel, _ = TOLERANCE[name]
    want = naive_ragged(case)
    assert np.linalg.norm(outs["blockwise"] - want) / np.linalg.norm(want) < rel


def test_bad_kv_cache_dtype_and_pallas_are_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype: 'int4' is not one of"):
        check_kv_cache_dtype("int4")
    with pytest.raises(ValueError, match="kv_cache_dtype: 'int8' is not supported by the pallas"):
        check_kv_backend("pallas", "int8")
    check_kv_backend("cpu", "fp8")  # the CPU kernel reads quantized pages
    check_kv_backend("pallas", "auto")
    assert backend_request("auto", "int8") == "auto"  # on CPU: the kernel, which reads them
    assert backend_request("auto", "auto") == "auto"
    assert backend_request("reference", "fp8") == "reference"
    pages = jnp.zeros((1, 2, 16, 68), jnp.int8)  # quantized rows reaching the kernel dispatch
    md = AttentionMetadata(*(jnp.zeros(n, jnp.int32) for n in (1, 1)),
                           jnp.zeros((1, 1), jnp.int32), jnp.ones(1, jnp.int32),
                           jnp.arange(2, dtype=jnp.int32))
    with pytest.raises(ValueError, match="kv_cache_dtype: 'int8' is not supported by the pallas"):
        paged_attention(jnp.zeros((1, 1, 64)), pages, pages, md,
                        AttentionConfig(backend="pallas"), 0.125)
    check_kv_backend("blockwise", "fp8")


def test_auto_with_a_quantized_cache_on_a_gpu_asks_for_blockwise(monkeypatch, caplog):
    """Off the CPU the auto kernels (Mosaic GPU) read float pages: auto means blockwise, logged."""
    import logging

    from jaxserve.layers import attention

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.attention"):
        assert backend_request("auto", "fp8") == "blockwise"
    assert "read by the blockwise XLA loops" in caplog.text
    assert backend_request("auto", "auto") == "auto"


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_mosaic_gpu_kernel_entries_refuse_quantized_pages_by_name(name):
    """The Pallas (Mosaic GPU) kernels do not read quantized rows: both entries say so, naming
    them, before any kernel is built (the references read them: tests/pallas_kernels)."""
    import pallas_kernels as pk
    from tests.pallas_kernels._paged_cases import quantize_case

    case = make_case([20, 5], [1, 1], num_q_heads=4, num_kv_heads=2)
    k_rows, v_rows, _ = quantize_case(case, name)
    q = jnp.asarray(case.q, jnp.bfloat16)
    args = (q, jnp.asarray(k_rows), jnp.asarray(v_rows), case.block_tables, case.seq_lens)
    match = "quantized KV pages .* not read by the Mosaic GPU attention kernel"
    with pytest.raises(pk.UnsupportedConfig, match=match):
        pk.ragged_paged_attention(*args, case.query_start_loc)
    with pytest.raises(pk.UnsupportedConfig, match=match):
        pk.paged_attention(*args)
