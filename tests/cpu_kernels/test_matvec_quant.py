"""The C++ quantized decode matmul (int8 / int4 / fp8) against float64 numpy on the dequantized
weights, and where QuantizedLinear uses it."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.cpu_kernels import build
from jaxserve.cpu_kernels import matvec_quant as mq
from jaxserve.cpu_kernels import packed_matmul as pm
from jaxserve.layers import quantized_linear as ql
from jaxserve.layers.quant_scheme import QuantConfig, dequantize, quantize

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernel")
PORTABLE = "jaxserve_cpu_matvec_quant_portable"
FP8_NAN = (0x7F, 0xFF)  # e4m3fn NaN bytes: never written by quantize(), read as 480 (see .cc)


def _target(portable: bool) -> str:
    if not portable:
        return mq.TARGET
    build.register(mq.SOURCE, mq.SYMBOL, PORTABLE, extra_flags=("-mno-avx512f",))
    return PORTABLE


def _weights(rng, method, n_out, n_in, groups, asymmetric):
    """Random stored bytes of every kind the format allows, scales and (integer) zeros."""
    if method == "int8":
        q = rng.integers(-127, 128, (n_out, n_in)).astype(np.int8)
    elif method == "int4":
        q = rng.integers(0, 256, (n_out, n_in // 2)).astype(np.uint8)
    else:
        q = rng.integers(0, 256, (n_out, n_in)).astype(np.uint8)
        q[np.isin(q, FP8_NAN)] = 0x7E  # 448
    scales = (rng.random((n_out, groups)) * 0.02 + 1e-3).astype(np.float32)
    zeros = (rng.integers(-3, 4, (n_out, groups)).astype(np.float32) if asymmetric else None)
    return q, scales, zeros


def _run(x, q, scales, zeros, method, target):
    z = None if zeros is None else jnp.asarray(zeros)
    fn = jax.jit(lambda a, b, c, d: mq.matvec_quant(a, b, c, d, method, target=target))
    return np.asarray(fn(x, jnp.asarray(q), jnp.asarray(scales), z))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("method,asymmetric", [("int8", False), ("int8", True), ("int4", False),
                                               ("int4", True), ("fp8", False)])
@pytest.mark.parametrize("rows,n_in,n_out,groups", [(1, 896, 67, 1), (2, 256, 40, 2),
                                                    (3, 100, 9, 1), (4, 96, 33, 3),
                                                    (8, 4864, 7, 38), (5, 36, 5, 2),
                                                    (19, 160, 70, 5)])
def test_matches_float64_oracle(rows, n_in, n_out, groups, method, asymmetric, portable):
    rng = np.random.default_rng(rows * 1000 + n_in + groups)
    q, scales, zeros = _weights(rng, method, n_out, n_in, groups, asymmetric)
    x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.bfloat16)  # [T, in]
    y = _run(x, q, scales, zeros, method, _target(portable))
    assert y.shape == (rows, n_out) and y.dtype == np.float32
    w = dequantize(method, q, scales, zeros).astype(np.float64)  # [out, in], exact values
    xf = np.asarray(x, np.float64)
    want = xf @ w.T
    # f32 products of exact bf16 values, f32 sums: error <= ~n * 2^-24 of the sum of |terms|
    v = np.abs(dequantize(method, q, np.ones_like(scales), None)) + (
        0 if zeros is None else np.repeat(np.abs(zeros), n_in // groups, axis=1))
    bound = np.abs(xf) @ (v * np.repeat(scales, n_in // groups, axis=1)).T
    # the int8 / int4 fast path rounds x to int16 per chunk of <= 256 inputs of a group: unit
    # 2^(e - 15) where the chunk's max |x| < 2^e; error <= one unit per input (see the .cc)
    units = 0 * xf if portable or method == "fp8" else _units(xf, n_in // groups)
    np.testing.assert_array_less(np.abs(y - want), 2e-5 * bound + units @ np.abs(w).T + 1e-30)


def _units(x: np.ndarray, group: int) -> np.ndarray:
    """[T, in] -> the int16 unit of each input's chunk (256 inputs of a group at most)."""
    units = np.zeros_like(x)
    for g0 in range(0, x.shape[1], group):
        for c0 in range(g0, g0 + group, 256):
            c1 = min(c0 + 256, g0 + group)
            m = np.abs(x[:, c0:c1]).max(axis=1)
            units[:, c0:c1] = np.where(m > 0, np.ldexp(1.0, np.frexp(m)[1] - 15), 0)[:, None]
    return units


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_nan_and_inf_reach_only_their_outputs(method, portable):
    rng = np.random.default_rng(3)
    q, scales, _ = _weights(rng, method, 11, 50, 1, False)
    one = {"int8": 1, "int4": 9, "fp8": 0x38}[method]  # stored bytes of 0 and 1
    zero = {"int8": 0, "int4": 8, "fp8": 0}[method]
    if method == "int4":  # column 0 is the low nibble of byte 0
        q[:, 0] = (q[:, 0] & 0xF0) | one
        q[0, 0] = (q[0, 0] & 0xF0) | zero
    else:
        q[:, 0] = one
        q[0, 0] = zero
    x = jnp.asarray(rng.standard_normal((11, 50)), jnp.bfloat16)  # two passes of <= 8 rows
    x = x.at[1, 49].set(jnp.nan).at[2, 0].set(jnp.inf)  # column 49 lies in the masked tail
    x = x.at[9, 3].set(jnp.nan)
    y = _run(x, q, scales, None, method, _target(portable))
    assert np.isnan(y[1]).all() and np.isnan(y[9]).all()
    assert np.isfinite(np.delete(y, [1, 2, 9], axis=0)).all()
    assert np.isnan(y[2, 0]) and np.isposinf(y[2, 1:]).all()  # 0 * inf, then 1 * inf


def test_fp8_decodes_every_finite_byte():
    """All 254 finite e4m3 bytes (normals and subnormals) through the kernel, one per input."""
    q = np.array([b for b in range(256) if b not in FP8_NAN], np.uint8)[None]  # [1, 254]
    eye = jnp.eye(254, dtype=jnp.bfloat16)
    got = np.concatenate([
        _run(eye[start:start + 8], q, np.ones((1, 1), np.float32), None, "fp8", mq.TARGET)[:, 0]
        for start in range(0, 254, 8)])  # row t picks input start + t
    np.testing.assert_array_equal(got, q[0].view(ml_dtypes.float8_e4m3fn).astype(np.float32))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("method,asymmetric", [("int8", False), ("int4", True), ("fp8", False)])
def test_dequant_bf16_equals_numpy_rounded_once(method, asymmetric, portable):
    """The many-row steps' bf16 weight: numpy's float32 dequantize() rounded to bf16, bit for
    bit (same f32 arithmetic, one round-to-nearest-even)."""
    rng = np.random.default_rng(8)
    q, scales, zeros = _weights(rng, method, 37, 100, 5, asymmetric)  # groups of 20: tails
    target = mq.DEQUANT_TARGET
    if portable:
        target = PORTABLE + "_dequant"
        build.register(mq.DEQUANT_SOURCE, mq.DEQUANT_SYMBOL, target,
                       extra_flags=("-mno-avx512f",))
    z = None if zeros is None else jnp.asarray(zeros)
    w = jax.jit(lambda a, b, c: mq.dequant_bf16(a, b, c, method, target=target))(
        jnp.asarray(q), jnp.asarray(scales), z)
    want = dequantize(method, q, scales, zeros).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(w).view(np.uint16), want.view(np.uint16))


def test_refuses_what_it_does_not_take():
    q = jnp.zeros((4, 8), jnp.int8)
    s = jnp.ones((4, 1), jnp.float32)
    with pytest.raises(ValueError, match="method"):
        mq.matvec_quant(jnp.zeros((1, 8), jnp.bfloat16), q, s, None, "nf4")
    with pytest.raises(ValueError, match="bf16"):
        mq.matvec_quant(jnp.zeros((1, 8), jnp.float32), q, s, None, "int8")
    with pytest.raises(ValueError, match="T <= 64"):
        mq.matvec_quant(jnp.zeros((65, 8), jnp.bfloat16), q, s, None, "int8")


def _layer(method, group, matvec, dtype=jnp.bfloat16, symmetric=True, w8a8=False):
    in_dim, out_dim = 128, 48
    quant = QuantConfig(method, group, symmetric, source="test", int8_activations=w8a8)
    lin = ql.make_linear(in_dim, out_dim, bias=True, dtype=dtype, rngs=None, quant=quant,
                         matvec=matvec)
    rng = np.random.default_rng(1)
    arrays = quantize(rng.standard_normal((out_dim, in_dim)).astype(np.float32), method,
                      group or in_dim)
    lin.qweight.set_value(jnp.asarray(arrays["qweight"]))
    lin.scales.set_value(jnp.asarray(arrays["scales"]))
    if not symmetric:
        lin.zeros.set_value(jnp.asarray(rng.integers(-2, 3, lin.zeros.shape), jnp.float32))
    lin.bias.set_value(jnp.asarray(np.linspace(-1, 1, out_dim), dtype))
    return lin


def _uses_kernel(lin, x) -> bool:
    return mq.TARGET in jax.jit(lambda a: lin(a)).lower(x).as_text()


@pytest.mark.parametrize("method,group,symmetric", [("int8", None, True), ("int4", 32, True),
                                                    ("int4", 64, False), ("fp8", None, True)])
def test_quantized_linear_takes_it_for_decode_rows(method, group, symmetric):
    on = _layer(method, group, True, symmetric=symmetric)
    off = _layer(method, group, False, symmetric=symmetric)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 128)), jnp.bfloat16)
    assert _uses_kernel(on, x) and not _uses_kernel(off, x)
    assert not _uses_kernel(on, jnp.zeros((ql.KERNEL_MAX_ROWS[method] + 1, 128), jnp.bfloat16))
    assert _uses_kernel(on, jnp.zeros((ql.KERNEL_MAX_ROWS[method], 128), jnp.bfloat16))
    got = np.asarray(jax.jit(lambda a: on(a))(x), np.float32)
    want = np.asarray(jax.jit(lambda a: off(a))(x), np.float32)  # XLA's path, same weights
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())


@pytest.mark.parametrize("matvec", [True, False])
@pytest.mark.parametrize("method,group,symmetric", [("int8", None, True), ("int4", 32, False),
                                                    ("fp8", None, True)])
def test_many_bf16_rows_take_the_bf16_dot_on_the_dequantized_weight(method, group, symmetric,
                                                                    matvec):
    """Past the kernel's rows (or XLA's reduction without it) a bf16 step dequantizes the
    weight to bf16 and runs XLA's bf16 dot: each weight rounded once to bf16 (2^-9 relative),
    f32 sums, the output rounded to bf16 (2^-9)."""
    lin = _layer(method, group, matvec, symmetric=symmetric)
    rows = 80  # past REDUCE_MAX_TOKENS of every method too
    x = jnp.asarray(np.random.default_rng(4).standard_normal((rows, 128)), jnp.bfloat16)
    text = jax.jit(lambda a: lin(a)).lower(x).as_text()
    assert mq.TARGET not in text and "tensor<48x128xbf16>) -> tensor<80x48xf32>" in text
    got = np.asarray(jax.jit(lambda a: lin(a))(x), np.float64)
    zeros = None if symmetric else np.asarray(lin.zeros[...])
    w = dequantize(method, np.asarray(lin.qweight[...]), np.asarray(lin.scales[...]), zeros)
    xf = np.asarray(x, np.float64)
    want = xf @ w.T.astype(np.float64) + np.asarray(lin.bias[...], np.float64)
    bound = 2**-8 * (np.abs(xf) @ np.abs(w.T) + np.abs(want))
    np.testing.assert_array_less(np.abs(got - want), bound)


def test_plan_keeps_xla_for_w8a8_and_float32_and_logs_why(caplog):
    assert not ql.kernel_plan(QuantConfig("int8", None, int8_activations=True), jnp.bfloat16, True)
    assert not ql.kernel_plan(QuantConfig("int4", 32), jnp.float32, True)
    assert ql.kernel_plan(QuantConfig("int4", 32), jnp.bfloat16, True)
    x = jnp.zeros((1, 128), jnp.float32)
    assert not _uses_kernel(_layer("int4", 32, True, dtype=jnp.float32), x)
    assert not _uses_kernel(_layer("int8", None, True, w8a8=True), x.astype(jnp.bfloat16))
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.quantized_linear"):
        ql.log_kernel_plan(QuantConfig("int4", 32), "bfloat16", True)
        ql.log_kernel_plan(QuantConfig("int4", 32, symmetric=False), "bfloat16", True)
        ql.log_kernel_plan(QuantConfig("int8", 32), "bfloat16", True)
        ql.log_kernel_plan(QuantConfig("int4", 32), "float32", True)
        ql.log_kernel_plan(QuantConfig("int8", None, int8_activations=True), "bfloat16", True)
        ql.log_kernel_plan(QuantConfig("fp8", None), "bfloat16", False)
    # int4, symmetric or with zero points, is packed where the CPU takes the packed-weight
    # kernel; group-wise int8 never (the kernel scales int8 per column)
    assert caplog.text.count("int4 projections are packed at load") == 2 * pm.available()
    assert "int8 projections of up to 16 bf16 rows run the CPU decode kernel" in caplog.text
    assert "float32 activations are not bf16" in caplog.text
    assert "w8a8 projections use XLA" in caplog.text and "kernel is off" in caplog.text


@pytest.mark.parametrize("method,chunk", [("int8", 1), ("int4", 1), ("fp8", 1), ("int4", None)])
def test_bf16_quantized_model_with_the_kernel_is_like_hf_bf16(method, chunk, tiny_checkpoints,
                                                             tmp_path):
    """A bf16 model quantized at load, run in decode-sized steps (chunk=1: 3 rows a step, every
    projection in the kernel) or whole prompts (29 rows: the bf16 dot on dequantized weights),
    against HF float32 on the dequantized weights: the error stays within the bound
    tests/models/test_bf16_and_shards.py sets for bf16 (2x HF's own bf16 error on the same
    weights, plus 1e-2 of the logit range). (int8 on a CPU that takes the packed-weight kernel
    runs that one instead, every step: its own tests are in test_packed_matmul.py and
    tests/models/test_quantized_models.py.)"""
    import torch

    from jaxserve.weights.loader import load_model
    from tests.models.forward import paged_logits
    from tests.models.test_bf16_and_shards import _rel_err
    from tests.models.test_hf_parity import hf_logits, make_prompts
    from tests.quant_checkpoints import write_dequantized_copy

    path = tiny_checkpoints("Qwen2ForCausalLM")
    deq = write_dequantized_copy(path, str(tmp_path / "deq"), method)
    prompts = [p[:12] for p in make_prompts(500, seed=7)[:3]]
    ref = hf_logits(deq, prompts)
    hf_bf16 = hf_logits(deq, prompts, dtype=torch.bfloat16)
    loaded = load_model(path, dtype="bfloat16", quantization=method, cpu_matvec=True)
    layer = loaded.model.layers[0]
    assert layer.o_proj.matvec and layer.down_proj.matvec
    ours = paged_logits(loaded, prompts, chunk=chunk)
    err, hf_err = _rel_err(ours, ref), _rel_err(hf_bf16, ref)
    assert err <= 2 * hf_err + 1e-2, (err, hf_err)
