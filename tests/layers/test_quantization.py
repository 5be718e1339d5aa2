"""PTQ bit for bit against plain numpy / ml_dtypes references; QuantizedLinear against
x @ dequantized weight; bad settings refused naming the field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.layers.quant_scheme import (
    QuantConfig,
    QuantizationError,
    dequantize,
    online_group,
    quantize,
)
from jaxserve.layers.quantized_linear import REDUCE_MAX_TOKENS, QuantizedLinear, fp8_e4m3_to_f32

DOT_TOKENS = max(REDUCE_MAX_TOKENS.values()) + 3  # past every method's reduce form


def _weight(out_dim=48, in_dim=64, seed=0):
    w = np.random.default_rng(seed).standard_normal((out_dim, in_dim)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale must not be 0 / inf
    w[5, :7] *= 20.0  # an outlier group
    return w


def _ref_int(w, group, qmax, qmin):
    """Textbook symmetric round-to-nearest-even per (row, group), element by element."""
    out_dim, in_dim = w.shape
    q = np.zeros_like(w, dtype=np.int64)
    scales = np.zeros((out_dim, in_dim // group), np.float32)
    for o in range(out_dim):
        for g in range(in_dim // group):
            block = w[o, g * group:(g + 1) * group]
            s = np.float32(np.abs(block).max()) / np.float32(qmax)
            s = np.float32(1.0) if s == 0 else s
            scales[o, g] = s
            q[o, g * group:(g + 1) * group] = np.clip(np.rint(block / s), qmin, qmax)
    deq = (q.astype(np.float32).reshape(out_dim, -1, group) * scales[..., None]).reshape(w.shape)
    return q, scales, deq


def _ref_pack_int4(q):
    """Two values per byte, element 2j in the low nibble, stored q + 8 (bit by bit)."""
    out = np.zeros((q.shape[0], q.shape[1] // 2), np.uint8)
    for o in range(q.shape[0]):
        for j in range(q.shape[1] // 2):
            out[o, j] = int(q[o, 2 * j] + 8) | (int(q[o, 2 * j + 1] + 8) << 4)
    return out


@pytest.mark.parametrize("method, group", [("int8", 64), ("int8", 16), ("int4", 32), ("int4", 64)])
def test_int_quantize_dequantize_bit_for_bit(method, group):
    w = _weight()
    qmax, qmin = (127, -127) if method == "int8" else (7, -8)
    q, scales, deq = _ref_int(w, group, qmax, qmin)
    got = quantize(w, method, group)
    assert np.array_equal(got["scales"], scales)
    if method == "int8":
        assert got["qweight"].dtype == np.int8 and np.array_equal(got["qweight"], q)
    else:
        assert got["qweight"].dtype == np.uint8
        assert np.array_equal(got["qweight"], _ref_pack_int4(q))
    back = dequantize(method, got["qweight"], got["scales"])
    assert back.dtype == np.float32 and np.array_equal(back, deq)
    assert np.abs(back - w).max() <= scales.max() / 2 * (1 + 1e-6)  # half a step at most


def test_fp8_quantize_dequantize_matches_ml_dtypes():
    w = _weight()
    scale = (np.abs(w).max(axis=1, keepdims=True) / np.float32(448.0)).astype(np.float32)
    scale[scale == 0] = 1.0
    ref_q = (w / scale).astype(ml_dtypes.float8_e4m3fn)  # ml_dtypes rounds to nearest even
    got = quantize(w, "fp8", 64)
    assert np.array_equal(got["qweight"], ref_q.view(np.uint8))
    assert np.array_equal(got["scales"], scale)
    assert np.array_equal(dequantize("fp8", got["qweight"], got["scales"]),
                          ref_q.astype(np.float32) * scale)


def test_fp8_decode_in_jax_equals_ml_dtypes_for_every_byte():
    every = np.arange(256, dtype=np.uint8)
    ref = every.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(jax.jit(fp8_e4m3_to_f32)(jnp.asarray(every)))
    finite = np.isfinite(ref)
    assert finite.sum() == 254
    assert np.array_equal(got[finite], ref[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(ref[finite]))  # -0.0 too


@pytest.mark.parametrize("method", ["int4", "fp8", "int8"])
def test_every_stored_byte_decodes_like_numpy(method):
    """Rows holding every byte value 0..255: QuantizedLinear's fused decode (nibble split
    by a rounding add, fp8 by arithmetic) equals the numpy reference for each of them."""
    every = np.arange(256, dtype=np.uint8)
    qweight = np.stack([every, every[::-1]])  # [2, 256]
    if method == "fp8":
        qweight[qweight == 0x7F] = 0x7E  # the two NaN patterns are never stored
        qweight[qweight == 0xFF] = 0xFE
    if method == "int8":
        qweight = qweight.view(np.int8)
    in_dim = 512 if method == "int4" else 256
    lin = QuantizedLinear(in_dim, 2, bias=False, dtype=jnp.float32,
                          quant=QuantConfig(method, None, source="test"))
    lin.qweight.set_value(jnp.asarray(qweight))
    w = dequantize(method, qweight, np.ones((2, 1), np.float32))  # [2, in]
    eye = np.eye(in_dim, dtype=np.float32)  # one token per input: y = w.T exactly
    for tokens in (eye[:REDUCE_MAX_TOKENS[method]], eye):  # reduce form, then the dot
        got = np.asarray(jax.jit(lambda v: lin(v))(jnp.asarray(tokens)))
        assert np.array_equal(got, w.T[:len(tokens)])


def _layer(method, in_dim, out_dim, group, zeros=None, bias=None):
    quant = QuantConfig(method, group, zeros is None, source="test")
    lin = QuantizedLinear(in_dim, out_dim, bias=bias is not None, dtype=jnp.float32, quant=quant)
    arrays = quantize(_weight(out_dim, in_dim, seed=1), method, group or in_dim)
    lin.qweight.set_value(jnp.asarray(arrays["qweight"]))
    lin.scales.set_value(jnp.asarray(arrays["scales"]))
    if zeros is not None:
        lin.zeros.set_value(jnp.asarray(zeros))
    if bias is not None:
        lin.bias.set_value(jnp.asarray(bias))
    return lin, dequantize(method, arrays["qweight"], arrays["scales"], zeros)


@pytest.mark.parametrize("method, group", [("int8", None), ("int8", 32), ("int4", 32),
                                           ("int4", 96), ("fp8", None)])
@pytest.mark.parametrize("tokens", [1, 5, DOT_TOKENS])  # reduce form, then the dot
def test_quantized_linear_equals_matmul_with_dequantized_weight(method, group, tokens):
    in_dim, out_dim = 96, 40
    bias = np.linspace(-1, 1, out_dim).astype(np.float32)
    lin, w = _layer(method, in_dim, out_dim, group, bias=bias)
    x = np.random.default_rng(2).standard_normal((tokens, in_dim)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    got = np.asarray(jax.jit(lambda v: lin(v))(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_asymmetric_zero_points(method):
    in_dim, out_dim, group = 64, 24, 32
    zeros = np.random.default_rng(3).integers(-3, 4, (out_dim, in_dim // group)).astype(np.float32)
    lin, w = _layer(method, in_dim, out_dim, group, zeros=zeros)
    x = np.random.default_rng(4).standard_normal((3, in_dim)).astype(np.float32)
    got = np.asarray(lin(jnp.asarray(x)))
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("tokens", [1, 2, DOT_TOKENS])
def test_w8a8_equals_numpy_per_token_int8_reference(tokens):
    in_dim, out_dim = 96, 40
    w = _weight(out_dim, in_dim, seed=6)
    arrays = quantize(w, "int8", in_dim)
    lin = QuantizedLinear(in_dim, out_dim, bias=False, dtype=jnp.float32,
                          quant=QuantConfig.online("w8a8"))
    lin.qweight.set_value(jnp.asarray(arrays["qweight"]))
    lin.scales.set_value(jnp.asarray(arrays["scales"]))
    x = np.random.default_rng(7).standard_normal((tokens, in_dim)).astype(np.float32)
    x[0] = 0.0  # an all-zero token
    xs = np.abs(x).max(axis=1, keepdims=True) / np.float32(127.0)
    xs[xs == 0] = 1.0
    xq = np.clip(np.rint(x / xs), -127, 127).astype(np.int64)
    acc = xq @ arrays["qweight"].astype(np.int64).T  # exact integer matmul
    want = acc.astype(np.float64) * xs * arrays["scales"][:, 0]
    got = np.asarray(jax.jit(lambda v: lin(v))(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_bfloat16_activations_keep_their_dtype():
    lin, w = _layer("int8", 64, 16, None)
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    got = lin(jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float32), xb @ w.T, rtol=1e-2, atol=1e-2)


def test_online_group_fits_the_dimension():
    assert QuantConfig.online("int4").group_for(4864) == 128
    assert QuantConfig.online("int4").group_for(896) == 128
    assert QuantConfig.online("int4").group_for(96) == 96
    assert online_group(200, 128) == 100
    assert QuantConfig.online("int8").group_for(896) == 896  # per output channel


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(QuantizationError, match="unknown method 'int3'"):
        QuantConfig.online("int3")
    with pytest.raises(QuantizationError, match="group_size"):
        QuantConfig("int4", group_size=1)
    with pytest.raises(QuantizationError, match="int8 activations need"):
        QuantConfig("int4", 32, int8_activations=True)
    with pytest.raises(QuantizationError, match="group_size 128 does not divide the input "
                                                "dimension 96"):
        QuantConfig("int4", 128, source="compressed-tensors:pack-quantized").group_for(96)
    with pytest.raises(QuantizationError, match="tensor 'w.q'.*group size 48 does not divide"):
        quantize(_weight(), "int8", 48, name="w.q")
