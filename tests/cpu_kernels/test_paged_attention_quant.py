"""The C++ CPU attention kernel over a quantized KV cache (int8 / fp8 e4m3 rows + f32 scales).

The kernel quantizes this step's K/V itself: its page bytes must equal what
`kv_quant.quantize_tokens` + `pack_rows` write (bit for bit, ties and fp8 subnormals included).
Its attention must match the plain-jnp reference run on the same quantized bytes (dequantized
there): both compute in f32 from identical values, so the tolerance is f32 rounding (the kernel
scales a score after the dot product, the reference before it). Every slot no sequence owns has
a NaN scale and garbage (int8) or NaN (fp8) values, and the slots the kernel writes start that
way too: a leak turns the output NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.cpu_kernels import paged_attention as cpa
from jaxserve.layers.kv_quant import dequantize, pack_rows, quantize_tokens, value_dtype
from pallas_kernels import ragged_paged_attention_reference
from tests.cpu_kernels.test_paged_attention import _new_token_slots, _portable_target
from tests.pallas_kernels._paged_cases import make_case

BF16 = ml_dtypes.bfloat16
PAGE = {"int8": np.int8, "fp8": np.uint8}
# f32 queries: the same f32 values in both, summed in another order -> ~1e-6; bf16 queries: the
# output is rounded to bf16 (relative 2^-9) after the same f32 math.
TOL = {np.float32: 2e-5, BF16: 1e-2}


def _quantize(x: np.ndarray, name: str) -> np.ndarray:
    """x [..., Hkv, D] (f32 / bf16) -> page rows [..., Hkv, D + 4], by kv_quant.py's quantizer."""
    vals = value_dtype(PAGE[name])
    flat = jnp.asarray(x).reshape(-1, *x.shape[-2:])
    rows = jax.jit(lambda t: pack_rows(*quantize_tokens(t, vals)))(flat)
    return np.asarray(rows).reshape(*x.shape[:-1], x.shape[-1] + 4)


def _poison(rows: np.ndarray, where: np.ndarray, name: str, seed: int) -> np.ndarray:
    """rows [Hkv, NB, bs, D + 4]; slots `where` [NB, bs] get a NaN scale and garbage (int8) or
    NaN (e4m3) values."""
    rows = rows.copy()
    d = rows.shape[-1] - 4
    n = int(where.sum())
    garbage = np.random.default_rng(seed).integers(-128, 128, (rows.shape[0], n, d))
    rows[:, where, :d] = garbage if name == "int8" else 0x7F  # e4m3 NaN
    rows[:, where, d:] = np.full((rows.shape[0], n), np.nan, np.float32)[..., None].view(
        rows.dtype)
    return rows


def _run(case, name, **kw):
    """Pages quantized by kv_quant.py (poisoned outside the sequences and in this step's slots),
    the kernel writes this step's K/V and attends. Returns (out f32, the kernel's K and V pages
    in the usual row layout, the pages kv_quant.py would have written)."""
    kvh, nb, bs, d = case.k_pages.shape
    slots = _new_token_slots(case)
    unused = np.isnan(np.asarray(case.k_pages[0, :, :, 0], np.float32))  # [NB, bs]
    new = np.zeros((nb, bs), bool)
    new.reshape(-1)[slots] = True
    want = []  # what a correct write leaves: every owned slot quantized, the rest poisoned
    for i, pages in enumerate((case.k_pages, case.v_pages)):
        x = np.nan_to_num(pages.astype(np.float32)).transpose(1, 2, 0, 3)  # [NB, bs, Hkv, D]
        rows = _quantize(x, name).transpose(2, 0, 1, 3)  # [Hkv, NB, bs, D + 4]
        want.append(_poison(rows, unused, name, seed=i))
    k_in, v_in = (_poison(w, new, name, seed=7 + i) for i, w in enumerate(want))
    k_new = case.k_pages.reshape(kvh, nb * bs, d)[:, slots].transpose(1, 0, 2)  # [n, Hkv, D]
    v_new = case.v_pages.reshape(kvh, nb * bs, d)[:, slots].transpose(1, 0, 2)
    pad = len(case.q) - len(slots)  # padding tokens write zeros into the null block's slot 0
    k_new = np.concatenate([k_new, np.zeros((pad, kvh, d), k_new.dtype)])
    v_new = np.concatenate([v_new, np.zeros((pad, kvh, d), v_new.dtype)])
    all_slots = np.concatenate([slots, np.zeros(pad, np.int32)])
    fn = jax.jit(lambda *a: cpa.write_and_attend(*a, **kw))
    out, k_pages, v_pages = fn(case.q, k_new, v_new, cpa.k_pages_layout(k_in), v_in, all_slots,
                               case.block_tables, case.seq_lens, case.query_start_loc)
    k_rows = cpa.k_pages_from_layout(np.asarray(k_pages))
    return np.asarray(out, np.float32), k_rows, np.asarray(v_pages), want


def _reference(case, k_rows, v_rows, **kw):
    """The plain-jnp reference over the dequantized bytes (NaN where a scale is NaN)."""
    out = ragged_paged_attention_reference(
        jnp.asarray(case.q), dequantize(jnp.asarray(k_rows)), dequantize(jnp.asarray(v_rows)),
        case.block_tables, case.seq_lens, case.query_start_loc, **kw)
    return np.asarray(out, np.float32)


def _check(case, name, dtype, **kw):
    out, k_rows, v_rows, want = _run(case, name, **kw)
    n = int(case.query_start_loc[-1])
    # the written bytes are kv_quant.py's (block 0, the null block, takes the padding tokens)
    np.testing.assert_array_equal(k_rows[:, 1:].view(np.uint8), want[0][:, 1:].view(np.uint8))
    np.testing.assert_array_equal(v_rows[:, 1:].view(np.uint8), want[1][:, 1:].view(np.uint8))
    assert not np.isnan(out).any()
    assert np.all(out[n:] == 0)  # padding tokens
    kw.pop("target", None)
    ref = _reference(case, want[0], want[1], **kw)
    np.testing.assert_allclose(out[:n], ref[:n], rtol=TOL[dtype], atol=TOL[dtype])
    return out


CASES = [  # (seq_lens, q_lens, extra padding tokens)
    ([37, 20, 200, 1], [1, 5, 40, 1], 3),  # decode rows, a short and a long prefill chunk
    ([64, 16], [64, 16], 0),  # whole prompts, block-aligned
    ([300], [1], 1),  # one long decode row
]


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("block_size,head_dim,heads", [(16, 64, (8, 2)), (32, 128, (4, 4)),
                                                      (8, 64, (6, 3))])
@pytest.mark.parametrize("seq_lens,q_lens,pad", CASES)
def test_kernel_matches_reference_on_quantized_pages(seq_lens, q_lens, pad, block_size, head_dim,
                                                     heads, dtype, name):
    case = make_case(seq_lens, q_lens, num_q_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=head_dim, block_size=block_size,
                     num_tokens=sum(q_lens) + pad, dtype=dtype)
    _check(case, name, dtype, scale=head_dim**-0.5)


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("window,cap", [(7, None), (None, 20.0), (33, 5.0)])
@pytest.mark.parametrize("portable", [False, True])
def test_sliding_window_and_soft_cap(window, cap, portable, name):
    case = make_case([90, 41, 17], [30, 1, 17], num_q_heads=4, num_kv_heads=2, dtype=BF16,
                     num_tokens=50)
    target = dict(target=_portable_target()) if portable else {}
    _check(case, name, BF16, scale=0.125, sliding_window=window, logits_soft_cap=cap, **target)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_portable_build_matches_reference(name):
    """Built without AVX-512 (as on a CPU without it): same bytes, same results."""
    case = make_case([37, 20, 200, 1], [1, 5, 40, 1], num_q_heads=8, num_kv_heads=2,
                     num_tokens=49)
    _check(case, name, np.float32, scale=0.125, target=_portable_target())


def _tie_vectors(name: str) -> np.ndarray:
    """[8, 1, 64] rows whose max is qmax (scale exactly 1.0, so x / scale = x): values halfway
    between two representable ones (round to nearest even), fp8 subnormals and their midpoints,
    negative zeros; plus an all-zero row, one with a huge outlier and one tiny."""
    qmax = 127.0 if name == "int8" else 448.0
    if name == "int8":
        halves = np.arange(-126.5, 127.0, 4.0)  # .5 ties, both parities
    else:  # midpoints of neighbouring e4m3 values, subnormal steps of 2^-9 and their midpoints
        grid = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
                                .astype(np.float32)))
        grid = grid[np.isfinite(grid)]
        halves = (grid[1:] + grid[:-1]) / 2
    rows = np.zeros((8, 64), np.float32)
    for r in range(5):
        pick = np.resize(halves[r::5], 63) * (-1.0) ** np.arange(63)
        rows[r, :63] = pick
        rows[r, 63] = qmax if r % 2 else -qmax
    rows[5] = 0.0  # scale 0
    rows[5, ::3] = -0.0
    rows[6] = np.linspace(-1e-3, 1e-3, 64)
    rows[6, 7] = 3e4  # an outlier
    rows[7] = np.linspace(-1e-30, 2e-30, 64)  # tiny: scale ~1e-32
    return rows[:, None, :]


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_write_is_kv_quant_bit_for_bit(name, dtype):
    """Ties, subnormals, zeros and random rows, written by the kernel (K into its layout, V as
    kv_quant.py's rows): the same bytes as quantize_tokens + pack_rows."""
    rng = np.random.default_rng(2)
    wide = rng.standard_normal((600, 1, 64)) * rng.lognormal(0.0, 3.0, (600, 1, 1))  # scales
    x = np.concatenate([_tie_vectors(name), wide]).astype(dtype)  # spread over ~1e-8 .. 1e8
    t, bs = len(x), 16
    nb = 1 + -(-t // bs)
    slots = np.arange(bs, bs + t, dtype=np.int32)  # blocks 1.. in order
    pages = np.zeros((1, nb, bs, 68), PAGE[name])
    q = np.zeros((t, 1, 64), dtype)
    tables = np.zeros((1, nb), np.int32)
    no_seq = np.zeros(1, np.int32)  # no sequence attends: only the write runs
    fn = jax.jit(lambda *a: cpa.write_and_attend(*a, scale=1.0))
    _, k_pages, v_pages = fn(q, x, -x, pages, pages, slots, tables, no_seq,
                             np.zeros(2, np.int32))
    k_rows = cpa.k_pages_from_layout(np.asarray(k_pages)).reshape(nb * bs, 68)[slots]
    v_rows = np.asarray(v_pages).reshape(nb * bs, 68)[slots]
    np.testing.assert_array_equal(k_rows.view(np.uint8), _quantize(x, name)[:, 0].view(np.uint8))
    np.testing.assert_array_equal(v_rows.view(np.uint8), _quantize(-x, name)[:, 0].view(np.uint8))


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("portable", [False, True])
def test_one_key_reads_back_the_dequantized_v_row_exactly(name, portable):
    """A sequence of one token attends to itself with weight exactly 1: the output is its V row
    as the kernel wrote and widened it, which must equal kv_quant.py's dequantized bytes exactly
    (ties, fp8 subnormals and NaN-free zeros included: the AVX-512 e4m3 widening goes through
    f16 bits and vcvtph2ps, the portable one through a table)."""
    v = _tie_vectors(name)  # [8, 1, 64]
    s, bs = len(v), 16
    slots = np.arange(1, s + 1, dtype=np.int32) * bs  # sequence i in block i + 1
    pages = np.zeros((1, s + 1, bs, 68), PAGE[name])
    q = np.random.default_rng(3).standard_normal((s, 2, 64)).astype(np.float32)
    tables = np.arange(1, s + 1, dtype=np.int32)[:, None]
    target = dict(target=_portable_target()) if portable else {}
    fn = jax.jit(lambda *a: cpa.write_and_attend(*a, scale=0.125, **target))
    out, _, _ = fn(q, np.ones_like(v), v, pages, pages, slots, tables, np.ones(s, np.int32),
                   np.arange(s + 1, dtype=np.int32))
    want = np.asarray(dequantize(jnp.asarray(_quantize(v, name))))  # [8, 1, 64]
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(want, (s, 2, 64)))


def test_refuses_pages_of_the_wrong_row_width():
    case = make_case([20], [1], num_q_heads=2, num_kv_heads=1)
    pages = np.zeros((1, 4, 16, 64), np.int8)  # int8 rows without the 4 scale bytes
    with pytest.raises(Exception, match="page rows disagree"):
        cpa.write_and_attend(case.q, case.q[:, :1], case.q[:, :1], pages, pages,
                             np.zeros(1, np.int32), case.block_tables, case.seq_lens,
                             case.query_start_loc, scale=0.125)
