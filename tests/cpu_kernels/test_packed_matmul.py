"""The packed-weight bf16 matmul against float64 math on the same bf16 values, its panel layout
against an index-by-index reference, and the Linear / Embedding that pack their weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxserve.cpu_kernels import dpbf16_matmul as dp
from jaxserve.cpu_kernels import matvec as mv
from jaxserve.cpu_kernels import packed_matmul as pm
from jaxserve.layers import linear

from .bf16_oracle import check_matmul

needs_packed = pytest.mark.skipif(not pm.available(),
                                  reason="this CPU has no AVX-512 BF16, or has AMX")


def _packed(x, w):
    return pm.packed_matmul(x, pm.pack(np.asarray(w)), w.shape[0])


def test_pack_puts_each_pair_in_its_panel_lane():
    n, k = 37, 9  # a partial last panel and an odd K
    w = np.arange(n * k, dtype=np.float32).reshape(n, k).astype(ml_dtypes.bfloat16)
    wp = np.asarray(pm.pack(w))
    assert wp.shape == pm.packed_shape(n, k) == (3, 5, 32)
    for p in range(3):
        for j in range(5):
            for c in range(16):
                for h in range(2):
                    row, col = 16 * p + c, 2 * j + h
                    want = w[row, col] if row < n and col < k else 0
                    assert wp[p, j, 2 * c + h] == want, (p, j, c, h)
    np.testing.assert_array_equal(pm.unpack(wp, n, k), w)


@needs_packed
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 33, 64, 65, 130, 300])
@pytest.mark.parametrize("k,n", [(896, 1152), (32, 16), (4864, 50), (7, 13), (289, 101)])
def test_matches_float_math(rows, k, n):
    check_matmul(lambda x, wp: pm.packed_matmul(x, wp, n), rows, k, n, atol_per_sqrt_k=1e-4,
                 prepare=lambda w: pm.pack(np.asarray(w)))


@needs_packed
def test_nan_and_inf_stay_in_their_row_and_column():
    x = jnp.ones((20, 65), jnp.bfloat16).at[17, 64].set(jnp.nan)  # odd K: NaN in the last pair
    w = jnp.ones((50, 65), jnp.bfloat16).at[5, 0].set(jnp.inf)
    y = np.asarray(_packed(x, w), np.float32)
    assert np.isnan(y[17]).all()
    others = np.delete(y, 17, axis=0)
    assert np.isinf(others[:, 5]).all() and np.isfinite(np.delete(others, 5, axis=1)).all()


@needs_packed
def test_rounds_each_output_once_to_nearest_even():
    # 1 + 2^-8 + 2^-9 is exact in f32; bf16 keeps 7 fraction bits: it rounds up to 1 + 2^-7
    x = jnp.asarray([[1.0, 2**-8, 2**-9, 0.0]] * 3, jnp.bfloat16)
    w = jnp.ones((2, 4), jnp.bfloat16)
    y = np.asarray(_packed(x, w), np.float32)
    assert (y == np.float32(1 + 2**-7)).all()


@needs_packed
def test_refuses_a_weight_packed_for_another_shape():
    x = jnp.ones((4, 64), jnp.bfloat16)
    wp = pm.pack(np.ones((48, 32), ml_dtypes.bfloat16))  # K 32, not 64
    with pytest.raises(Exception, match="packed"):
        jax.block_until_ready(pm.packed_matmul(x, wp, 48))


@needs_packed
def test_packed_linear_runs_the_kernel_for_every_row_count():
    layer = linear.Linear(64, 40, bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matvec=True)
    layer.bias.set_value(jnp.arange(40, dtype=jnp.bfloat16))
    w = np.asarray(layer.weight[...])
    assert layer.pack() and layer.weight[...].shape == pm.packed_shape(40, 64)
    assert not layer.pack()  # once
    for rows in (1, 8, 9, 64, 65, 512):
        x = jax.random.normal(jax.random.key(rows), (rows, 64), jnp.bfloat16)
        text = jax.jit(lambda a: layer(a)).lower(x).as_text()
        assert pm.TARGET in text and dp.TARGET not in text and mv.TARGET not in text, rows
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.arange(40)
        np.testing.assert_allclose(np.asarray(layer(x), np.float32), want, rtol=2**-7, atol=0.05)


@needs_packed
def test_only_cpu_kernel_weights_are_packed():
    off = linear.Linear(64, 40, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matvec=False)
    assert not off.pack() and off.weight[...].shape == (40, 64)
    f32 = linear.Linear(64, 40, bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0), matvec=True)
    w = np.asarray(f32.kernel[...]).T  # f32 keeps [in, out] until packed
    assert f32.pack() and f32.kernel[...].shape == pm.packed_shape(40, 64, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (9, 64), jnp.float32)
    np.testing.assert_allclose(np.asarray(f32(x)), np.asarray(x, np.float64) @ w.T, rtol=1e-5,
                               atol=1e-5)


def test_f32_pack_puts_each_value_in_its_panel_lane():
    w = np.arange(37 * 9, dtype=np.float32).reshape(37, 9)
    wp = np.asarray(pm.pack(w))
    assert wp.shape == pm.packed_shape(37, 9, np.float32) == (3, 9, 16)
    assert wp[2, 4, 3] == w[35, 4] and wp[2, 4, 5] == 0  # column 37 is padding
    np.testing.assert_array_equal(pm.unpack(wp, 37, 9), w)


@needs_packed
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 65])
@pytest.mark.parametrize("k,n", [(896, 1152), (7, 13), (289, 101)])
def test_f32_matches_float_math(rows, k, n):
    rng = np.random.default_rng(rows * 7 + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    y = np.asarray(jax.jit(pm.packed_matmul, static_argnums=2)(x, pm.pack(w), n))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5,
                               atol=2e-6 * np.sqrt(k))


@needs_packed
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_packed_embedding_looks_up_rows_exactly_and_attends(dtype):
    vocab, dim = 37, 24  # a partial last panel
    emb = linear.Embedding(vocab, dim, dtype=dtype, rngs=nnx.Rngs(1), matvec=True)
    table = np.asarray(emb.embedding[...])
    assert emb.pack()
    ids = jnp.asarray([0, 15, 16, 36, 5, 36], jnp.int32)
    rows = np.asarray(jax.jit(lambda i: emb(i))(ids))
    np.testing.assert_array_equal(rows, table[np.asarray(ids)])
    x = jax.random.normal(jax.random.key(0), (3, dim), dtype)
    want = np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
    logits = emb.attend(x)
    assert logits.dtype == jnp.float32  # from the f32 sums, not rounded to bf16
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-4 * np.sqrt(dim))


def _silu(v):
    return v / (1 + np.exp(-v))


@needs_packed
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows", [1, 4, 6, 7, 13, 64, 65, 200])
@pytest.mark.parametrize("k,m", [(896, 4864), (33, 40), (64, 16)])
def test_glu_matches_float_math(rows, k, m, dtype):
    rng = np.random.default_rng(rows + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    gate, up = (np.asarray(rng.standard_normal((m, k)), dtype) for _ in range(2))
    wp = pm.interleave(pm.pack(gate), pm.pack(up))
    y = np.asarray(jax.jit(pm.packed_glu_matmul, static_argnums=2)(x, wp, m), np.float32)
    xf = np.asarray(x, np.float64)
    g, u = xf @ np.asarray(gate, np.float64).T, xf @ np.asarray(up, np.float64).T
    # f32 sums of k terms each, then silu(g) * u rounded once to bf16
    tol = 1e-4 * np.sqrt(k) * (np.abs(g) + np.abs(u) + 1)
    np.testing.assert_array_less(np.abs(y - _silu(g) * u), 2**-8 * np.abs(_silu(g) * u) + tol)


@needs_packed
def test_glu_keeps_nan_in_its_row():
    x = jnp.ones((9, 32), jnp.bfloat16).at[3, 7].set(jnp.nan)
    w = pm.pack(np.full((20, 32), 0.01, ml_dtypes.bfloat16))
    y = np.asarray(pm.packed_glu_matmul(x, pm.interleave(w, w), 20), np.float32)
    assert np.isnan(y[3]).all() and np.isfinite(np.delete(y, 3, axis=0)).all()


def _int8_weight(rng, n, k):
    """q int8 [n, k] over the full range and per-column scales f32 [n] spanning 2^6."""
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    scales = (2.0 ** rng.uniform(-12, -6, n)).astype(np.float32)
    return q, scales


def test_int8_panels_and_scales_layout():
    n, k = 37, 9
    q = np.arange(n * k).reshape(n, k).astype(np.int8)
    wp = np.asarray(pm.pack(jnp.asarray(q)))
    assert wp.dtype == np.int8 and wp.shape == pm.packed_shape(n, k, jnp.int8) == (3, 5, 32)
    np.testing.assert_array_equal(pm.unpack(wp, n, k), q)
    scales = np.arange(n, dtype=np.float32) + 1
    sp = np.asarray(pm.pack_scales(jnp.asarray(scales)))
    assert sp.shape == (3, 16)
    np.testing.assert_array_equal(sp.reshape(-1), np.concatenate([scales, np.zeros(11)]))


# rows 1-8: one register block per tile, the int8 pairs widened in registers; 9 on: the tile's
# panels widened to bf16 once into a per-thread buffer
@needs_packed
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 64, 65, 300])
@pytest.mark.parametrize("k,n", [(896, 1152), (7, 13), (289, 101), (4864, 50)])
def test_int8_matches_float_math(rows, k, n):
    """y = (x @ q^T) * scale: bf16 x times the integers are exact products, f32 sums scaled
    once, so against float64 only summation order differs (f32 out: no rounding)."""
    rng = np.random.default_rng(rows * 13 + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    q, scales = _int8_weight(rng, n, k)
    y = np.asarray(jax.jit(pm.packed_matmul, static_argnums=(2, 3))(
        x, pm.pack(jnp.asarray(q)), n, jnp.float32, pm.pack_scales(jnp.asarray(scales))))
    exact = np.asarray(x, np.float64) @ q.T.astype(np.float64)  # [rows, n], integer weights
    bound = 2e-7 * np.sqrt(k) * (np.abs(np.asarray(x, np.float64)) @ np.abs(q.T) + 1)
    np.testing.assert_array_less(np.abs(y - exact * scales), bound * scales)
    bf16 = np.asarray(pm.packed_matmul(x, pm.pack(jnp.asarray(q)), n, None,
                                       pm.pack_scales(jnp.asarray(scales))), np.float32)
    np.testing.assert_array_less(np.abs(bf16 - y), 2**-8 * np.abs(y) + 1e-30)  # one rounding


# 1-7: 6 x 4 blocks; from 12 rows: 12 x 2 blocks, and a tail of 1-11 rows (20: 8, 23: 11)
@needs_packed
@pytest.mark.parametrize("rows", [1, 6, 7, 13, 20, 23, 65])
@pytest.mark.parametrize("k,m", [(896, 4864), (33, 40)])
def test_int8_glu_matches_float_math(rows, k, m):
    """Gate and up each keep their own scales through the interleaving."""
    rng = np.random.default_rng(rows + 3 * k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    (qg, sg), (qu, su) = _int8_weight(rng, m, k), _int8_weight(rng, m, k)
    wp = pm.interleave(pm.pack(jnp.asarray(qg)), pm.pack(jnp.asarray(qu)))
    sp = pm.interleave(pm.pack_scales(jnp.asarray(sg)), pm.pack_scales(jnp.asarray(su)))
    y = np.asarray(jax.jit(pm.packed_glu_matmul, static_argnums=2)(x, wp, m, sp), np.float32)
    xf = np.asarray(x, np.float64)
    g, u = (xf @ qg.T.astype(np.float64)) * sg, (xf @ qu.T.astype(np.float64)) * su
    tol = 1e-6 * np.sqrt(k) * (np.abs(g) + np.abs(u) + 1e-3)
    np.testing.assert_array_less(np.abs(y - _silu(g) * u), 2**-8 * np.abs(_silu(g) * u) + tol)


@needs_packed
def test_int8_panels_refuse_missing_scales_and_f32_x():
    q = pm.pack(jnp.ones((32, 16), jnp.int8))
    x = jnp.ones((2, 16), jnp.bfloat16)
    with pytest.raises(Exception, match="s must be float32"):
        jax.block_until_ready(pm.packed_matmul(x, q, 32))  # no scales
    with pytest.raises(Exception, match="x bfloat16 and wp int8"):
        jax.block_until_ready(pm.packed_matmul(x.astype(jnp.float32), q, 32, None,
                                               pm.pack_scales(jnp.ones((32,)))))


@needs_packed
@pytest.mark.parametrize("rows", [1, 5, 9, 64, 130])
@pytest.mark.parametrize("k,n", [(896, 1152), (7, 13), (289, 101)])
def test_fp8_matches_float_math(rows, k, n):
    """float8_e4m3fn bits (every finite byte, subnormals and both zeros included) decode exactly
    to bf16: against float64 on the decoded values only summation order differs."""
    rng = np.random.default_rng(rows * 5 + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    bits = rng.integers(0, 256, (n, k)).astype(np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x01  # no NaN patterns (0x7f / 0xff): a subnormal instead
    values = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float64)  # [n, k]
    scales = (2.0 ** rng.uniform(-8, -2, n)).astype(np.float32)
    y = np.asarray(jax.jit(pm.packed_matmul, static_argnums=(2, 3))(
        x, pm.pack(jnp.asarray(bits)), n, jnp.float32, pm.pack_scales(jnp.asarray(scales))))
    xf = np.asarray(x, np.float64)
    bound = 2e-7 * np.sqrt(k) * (np.abs(xf) @ np.abs(values.T) + 1e-6)
    np.testing.assert_array_less(np.abs(y - (xf @ values.T) * scales), bound * scales)


def _int4_weight(rng, n, k, group):
    """Stored int4 bytes uint8 [n, k / 2] (inputs 2j, 2j + 1 in the low, high nibble, each
    value + 8), their values [n, k] in -8..7 and group scales f32 [n, k / group]."""
    values = rng.integers(-8, 8, (n, k))
    stored = (values + 8).astype(np.uint8)
    q = stored[:, 0::2] | (stored[:, 1::2] << 4)
    scales = (2.0 ** rng.uniform(-8, -2, (n, k // group))).astype(np.float32)
    return q, values, scales


@needs_packed
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64, 130])
@pytest.mark.parametrize("k,n,group", [(896, 1152, 128), (64, 13, 32), (256, 101, 256),
                                       (4864, 50, 128)])
def test_int4_matches_float_math(rows, k, n, group):
    """Each group of inputs summed exactly in f32 (bf16 x times small integers), then scaled by
    its own scale: against float64, only summation order differs."""
    rng = np.random.default_rng(rows * 11 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    q, values, scales = _int4_weight(rng, n, k, group)
    wp, sp = pm.pack(jnp.asarray(q), lanes=True), pm.pack_scales(jnp.asarray(scales))
    assert wp.shape == (-(-n // 16), k // 2, 16) and sp.shape == (-(-n // 16), k // group, 16)
    np.testing.assert_array_equal(pm.unpack(np.asarray(wp), n, k // 2), q)
    np.testing.assert_array_equal(pm.unpack_scales(np.asarray(sp), n), scales)
    y = np.asarray(jax.jit(pm.packed_matmul, static_argnums=(2, 3))(x, wp, n, jnp.float32, sp))
    w = (values.reshape(n, -1, group) * scales[:, :, None]).reshape(n, k)  # float64
    xf = np.asarray(x, np.float64)
    bound = 2e-7 * np.sqrt(k) * (np.abs(xf) @ np.abs(w.T) + 1e-6)
    np.testing.assert_array_less(np.abs(y - xf @ w.T), bound)


# 5 rows: a 5 x 4 block; 30: two 12 x 2 blocks (quantized gated steps of 12 rows on) + 6 rows;
# 21: one 12 x 2 block + 9 rows (6 + 3)
@needs_packed
@pytest.mark.parametrize("rows", [5, 21, 30])
def test_int4_glu_keeps_each_projections_group_scales(rows):
    rng = np.random.default_rng(4)
    k, m, group = 256, 40, 64
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    (qg, vg, sg), (qu, vu, su) = (_int4_weight(rng, m, k, group) for _ in range(2))
    wp = pm.interleave(pm.pack(jnp.asarray(qg), lanes=True), pm.pack(jnp.asarray(qu), lanes=True))
    sp = pm.interleave(pm.pack_scales(jnp.asarray(sg)), pm.pack_scales(jnp.asarray(su)))
    y = np.asarray(pm.packed_glu_matmul(x, wp, m, sp), np.float32)
    xf = np.asarray(x, np.float64)
    g = xf @ (vg.reshape(m, -1, group) * sg[:, :, None]).reshape(m, k).T
    u = xf @ (vu.reshape(m, -1, group) * su[:, :, None]).reshape(m, k).T
    np.testing.assert_array_less(np.abs(y - _silu(g) * u),
                                 2**-8 * np.abs(_silu(g) * u) + 1e-4 * (np.abs(g) + np.abs(u)))


def _asymmetric(kind, rng, n, k, group):
    """(stored bytes, lanes, values [n, k] as the kernel reads them (int4: nibble - 8), scales
    [n, G], zero points [n, G] in value units) of an asymmetric weight w = (value - z) * s."""
    if kind == "int8":
        q = rng.integers(-128, 128, (n, k)).astype(np.int8)
        zeros = rng.integers(-128, 128, (n, 1)).astype(np.float32)
        return q, False, q.astype(np.float64), (2.0 ** rng.uniform(-12, -6, (n, 1))), zeros
    q, values, scales = _int4_weight(rng, n, k, group)
    zeros = rng.integers(-8, 8, scales.shape).astype(np.float32)
    return q, True, values.astype(np.float64), scales, zeros


@needs_packed
@pytest.mark.parametrize("rows", [1, 2, 9, 65])
@pytest.mark.parametrize("kind,k,n,group", [("int8", 896, 1152, None), ("int8", 7, 13, None),
                                            ("int8", 289, 101, None), ("int4", 896, 1152, 128),
                                            ("int4", 64, 13, 32)])
def test_asymmetric_weights_match_float_math(rows, kind, k, n, group):
    """w = (value - z) * s: the kernel takes z times each row's sum of x over the group from the
    group's sums before scaling them; against float64 on the dequantized weight, the error is
    f32 summation's over both terms."""
    rng = np.random.default_rng(rows * 7 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    q, lanes, values, scales, zeros = _asymmetric(kind, rng, n, k, group)
    scales = scales.astype(np.float32)
    per_col = (lambda a: a[:, 0]) if kind == "int8" else (lambda a: a)
    y = np.asarray(jax.jit(pm.packed_matmul, static_argnums=(2, 3))(
        x, pm.pack(jnp.asarray(q), lanes=lanes), n, jnp.float32,
        pm.pack_scales(jnp.asarray(per_col(scales))), pm.pack_scales(jnp.asarray(per_col(zeros)))))
    g = scales.shape[1]
    w = ((values.reshape(n, g, -1) - zeros[:, :, None]) * scales[:, :, None]).reshape(n, k)
    xf = np.asarray(x, np.float64)
    magnitude = (np.abs(values.reshape(n, g, -1)) + np.abs(zeros[:, :, None])) * scales[:, :, None]
    bound = 2e-7 * np.sqrt(k) * (np.abs(xf) @ magnitude.reshape(n, k).T + 1e-6)
    np.testing.assert_array_less(np.abs(y - xf @ w.T), bound)


@needs_packed
@pytest.mark.parametrize("rows", [5, 21])  # 21: a 12 x 2 block, then 6 + 3 rows
@pytest.mark.parametrize("kind,group", [("int8", None), ("int4", 64)])
def test_asymmetric_glu_keeps_each_projections_zero_points(kind, group, rows):
    rng = np.random.default_rng(9)
    k, m = 256, 40
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    per_col = (lambda a: a[:, 0]) if kind == "int8" else (lambda a: a)
    parts, ref = [], []
    for _ in range(2):
        q, lanes, values, scales, zeros = _asymmetric(kind, rng, m, k, group)
        scales = scales.astype(np.float32)
        parts.append((pm.pack(jnp.asarray(q), lanes=lanes),
                      pm.pack_scales(jnp.asarray(per_col(scales))),
                      pm.pack_scales(jnp.asarray(per_col(zeros)))))
        g = scales.shape[1]
        w = ((values.reshape(m, g, -1) - zeros[:, :, None]) * scales[:, :, None]).reshape(m, k)
        ref.append(np.asarray(x, np.float64) @ w.T)
    (wg, sg, zg), (wu, su, zu) = parts
    y = np.asarray(pm.packed_glu_matmul(x, pm.interleave(wg, wu), m, pm.interleave(sg, su),
                                        pm.interleave(zg, zu)), np.float32)
    gate, up = ref
    np.testing.assert_array_less(np.abs(y - _silu(gate) * up),
                                 2**-8 * np.abs(_silu(gate) * up)
                                 + 1e-4 * (np.abs(gate) + np.abs(up)))


@needs_packed
def test_zero_points_must_be_shaped_as_the_scales():
    q = pm.pack(jnp.ones((32, 16), jnp.int8))
    x = jnp.ones((2, 16), jnp.bfloat16)
    s = pm.pack_scales(jnp.ones((32,)))
    with pytest.raises(Exception, match="z \\(zero points\\) must be"):
        jax.block_until_ready(pm.packed_matmul(x, q, 32, None, s, jnp.zeros((3,), jnp.float32)))


@needs_packed
@pytest.mark.parametrize("rows", [5, 21, 30])
def test_fp8_glu_keeps_each_projections_scales(rows):
    rng = np.random.default_rng(rows)
    k, m = 96, 40
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    parts, ref = [], []
    for _ in range(2):
        bits = rng.integers(0, 256, (m, k)).astype(np.uint8)
        bits[(bits & 0x7F) == 0x7F] = 0x01  # no NaN patterns
        scales = (2.0 ** rng.uniform(-8, -2, m)).astype(np.float32)
        parts.append((pm.pack(jnp.asarray(bits)), pm.pack_scales(jnp.asarray(scales))))
        values = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
        ref.append((np.asarray(x, np.float64) @ values.T) * scales)
    (wg, sg), (wu, su) = parts
    y = np.asarray(pm.packed_glu_matmul(x, pm.interleave(wg, wu), m, pm.interleave(sg, su)),
                   np.float32)
    gate, up = ref
    np.testing.assert_array_less(np.abs(y - _silu(gate) * up),
                                 2**-8 * np.abs(_silu(gate) * up)
                                 + 1e-4 * (np.abs(gate) + np.abs(up)))


def test_group_panels_layout_and_when_weights_are_grouped():
    """grouped[g, j, i] is plain panel 8g + i's vector j; ungroup_panels and unpack undo it."""
    n, k = 512, 9  # 32 panels: 4 groups
    q = np.arange(n * k).reshape(n, k).astype(np.int8)
    plain = np.asarray(pm.pack(jnp.asarray(q)))  # [32, 5, 32]
    grouped = np.asarray(pm.group_panels(jnp.asarray(plain), pm.GROUP))
    assert grouped.shape == (4, 5, 8, 32)
    for g in range(4):
        for j in range(5):
            for i in range(8):
                np.testing.assert_array_equal(grouped[g, j, i], plain[8 * g + i, j])
    np.testing.assert_array_equal(pm.ungroup_panels(grouped), plain)
    np.testing.assert_array_equal(pm.unpack(grouped, n, k), q)
    assert pm.panel_group((32, 448, 32)) == 8  # int8 [512, 896]: 14 KB panels
    assert pm.panel_group((608, 448, 16)) == 8  # int4 [9728, 896]
    assert pm.panel_group((56, 2432, 32)) == 1  # [896, 4864]: 76 KB panels read fast as they are
    assert pm.panel_group((24, 448, 32)) == 1  # 3 groups: too few to share out
    assert pm.panel_group((36, 448, 32)) == 1  # not whole groups


def _quantized_case(kind, rng, n, k):
    """(packed panels, panel scales, panel zeros or None) of a random weight of `kind`."""
    if kind in ("int8", "int8-asym", "int4", "int4-asym"):
        q, lanes, _, scales, zeros = _asymmetric(kind[:4], rng, n, k, 32)
        per_col = (lambda a: a[:, 0]) if kind.startswith("int8") else (lambda a: a)
        z = pm.pack_scales(jnp.asarray(per_col(zeros))) if kind.endswith("asym") else None
        return (pm.pack(jnp.asarray(q), lanes=lanes),
                pm.pack_scales(jnp.asarray(per_col(scales).astype(np.float32))), z)
    bits = rng.integers(0, 256, (n, k)).astype(np.uint8)  # fp8
    bits[(bits & 0x7F) == 0x7F] = 0x01
    return pm.pack(jnp.asarray(bits)), pm.pack_scales(jnp.asarray(rng.uniform(0.1, 1, n))), None


# 1-3 rows: one block per group; 4-6: two 4-panel blocks, the first prefetching the group; 7-8
# (ungated): 8 x 3, 8 x 3, 8 x 2 blocks across the group; from 12 rows (gated): 12 x 2 blocks
@needs_packed
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 7, 8, 9, 13, 21, 65])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int8-asym", "fp8", "int4", "int4-asym"])
def test_grouped_panels_compute_what_plain_panels_do_bit_for_bit(kind, glu, rows):
    """Every output column sums its pairs in the same order in both layouts; the plain layout
    is checked against float math above."""
    rng = np.random.default_rng(rows + 7 * glu)
    k = 128 if kind.startswith("int4") else 97  # int8 / fp8: an odd K (a half-empty last pair)
    n = 256 if glu else 512  # 32 panels (gated: 16 gate + 16 up), 4 groups of 8
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    if glu:
        (wg, sg, zg), (wu, su, zu) = (_quantized_case(kind, rng, n, k) for _ in range(2))
        plain, scales = pm.interleave(wg, wu), pm.interleave(sg, su)
        zeros = None if zg is None else pm.interleave(zg, zu)
        run = lambda wp: pm.packed_glu_matmul(x, wp, n, scales, zeros)  # noqa: E731
    else:
        plain, scales, zeros = _quantized_case(kind, rng, n, k)
        run = lambda wp: pm.packed_matmul(x, wp, n, jnp.float32, scales, zeros)  # noqa: E731
    assert pm.panel_group(plain.shape) == pm.GROUP
    want = np.asarray(run(plain))
    got = np.asarray(run(pm.group_panels(plain, pm.GROUP)))
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


@needs_packed
def test_grouped_panels_hold_quantized_weights_in_groups_of_8():
    x = jnp.ones((2, 16), jnp.bfloat16)
    s = pm.pack_scales(jnp.ones((512,)))
    q = pm.pack(jnp.ones((512, 16), jnp.int8))  # [32, 8, 32]
    with pytest.raises(Exception, match="grouped panels"):
        jax.block_until_ready(pm.packed_matmul(x, pm.group_panels(q, 4), 512, None, s))
    bf16 = pm.group_panels(pm.pack(jnp.ones((512, 16), jnp.bfloat16)), 8)
    with pytest.raises(Exception, match="grouped panels"):
        jax.block_until_ready(pm.packed_matmul(x, bf16, 512))
