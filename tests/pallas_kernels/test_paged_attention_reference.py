"""The plain-jnp references against an independent naive numpy implementation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from _paged_cases import make_case, naive_ragged, quantize_case

# Tolerances vs the float64 naive loops. f32 math; bf16/f16 only round inputs and the output.
TOL = {np.float32: 2e-5, jnp.bfloat16: 2e-2, np.float16: 4e-3}


def _args(case):
  return (jnp.asarray(case.q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages),
          jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens))


def _check(got, want, dtype):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  assert not np.isnan(got).any()
  np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])


# (seq_lens, q_lens, num_tokens): prefill from empty, chunks over a cached prefix crossing block
# boundaries, decodes (length 1 chunks), a length-1 sequence, an empty padding sequence, padding
# tokens past query_start_loc[S].
RAGGED = [
    ([5], [5], None),
    ([37, 1, 16, 20, 0], [7, 1, 3, 1, 0], 16),
    ([33, 17, 48], [1, 17, 2], None),
]


@pytest.mark.parametrize("max_query_len", [None, 17])
@pytest.mark.parametrize("seq_lens,q_lens,num_tokens", RAGGED)
def test_ragged_reference_matches_naive(seq_lens, q_lens, num_tokens, max_query_len):
  case = make_case(seq_lens, q_lens, num_tokens=num_tokens, max_blocks=4, seed=1)
  got = pk.ragged_paged_attention_reference(*_args(case), jnp.asarray(case.query_start_loc),
                                            max_query_len=max_query_len)
  _check(got, naive_ragged(case), np.float32)


@pytest.mark.parametrize("max_query_len", [None, 8])
@pytest.mark.parametrize("sliding_window,logits_soft_cap,scale", [
    (4, None, None), (None, 5.0, None), (20, 2.0, 0.3), (1, None, None)])
def test_ragged_reference_window_softcap(sliding_window, logits_soft_cap, scale, max_query_len):
  case = make_case([37, 9, 26, 0], [8, 1, 5, 0], num_tokens=16, block_size=8, max_blocks=6,
                   num_q_heads=6, num_kv_heads=3, seed=2)
  kw = dict(scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  got = pk.ragged_paged_attention_reference(*_args(case), jnp.asarray(case.query_start_loc),
                                            max_query_len=max_query_len, **kw)
  _check(got, naive_ragged(case, **kw), np.float32)


def test_sliding_window_ignores_pages_before_the_window():
  """Blocks wholly before every query's window may be freed and reused (NaN): not read."""
  case = make_case([40, 24], [4, 1], block_size=8, seed=3)
  k_pages, v_pages = case.k_pages.copy(), case.v_pages.copy()
  for s, first_needed in ((0, 40 - 4 - 7), (1, 24 - 1 - 7)):
    for b in range(first_needed // 8):
      k_pages[:, case.block_tables[s, b]] = np.nan
      v_pages[:, case.block_tables[s, b]] = np.nan
  poisoned = dataclasses.replace(case, k_pages=k_pages, v_pages=v_pages)
  for mql in (None, 4):
    got = pk.ragged_paged_attention_reference(*_args(poisoned),
                                              jnp.asarray(case.query_start_loc),
                                              sliding_window=8, max_query_len=mql)
    _check(got, naive_ragged(case, sliding_window=8), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_decode_reference_matches_naive(dtype):
  seq_lens = [1, 16, 17, 48, 0, 31]
  case = make_case(seq_lens, [1 if n else 0 for n in seq_lens], block_size=16, max_blocks=4,
                   num_q_heads=8, num_kv_heads=2, head_dim=128, dtype=dtype, seed=4)
  # decode: q has one row per sequence, padding sequences included
  case = dataclasses.replace(case, q=make_case(seq_lens, [1] * 6, num_q_heads=8, head_dim=128,
                                               dtype=dtype, seed=5).q)
  case = dataclasses.replace(case, query_start_loc=np.arange(7, dtype=np.int32))
  got = pk.paged_attention_reference(*_args(case))
  assert got.dtype == jnp.dtype(dtype)
  want = naive_ragged(case)
  assert np.all(want[4] == 0)
  _check(got, want, dtype)


def test_reference_jits_with_padding_and_no_nan():
  case = make_case([0, 0], [0, 0], num_tokens=4, seed=6)
  fn = jax.jit(functools.partial(pk.ragged_paged_attention_reference, max_query_len=2))
  got = fn(*_args(case), jnp.asarray(case.query_start_loc))
  np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_max_query_len_too_small_raises():
  case = make_case([9], [9], seed=7)
  with pytest.raises(ValueError, match="max_query_len"):
    pk.ragged_paged_attention_reference(*_args(case), jnp.asarray(case.query_start_loc),
                                        max_query_len=4)


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("max_query_len,window,cap", [(None, None, None), (17, None, None),
                                                      (8, 7, 5.0)])
def test_references_read_quantized_pages(name, max_query_len, window, cap):
  """Quantized rows (values + f32 scale) in, dequantized per gathered block: the naive loops
  over the dequantized pages. Unused slots hold NaN scales and garbage / NaN values."""
  case = make_case([37, 1, 16, 20, 0], [7, 1, 3, 1, 0], num_tokens=16, max_blocks=4, seed=8)
  k_rows, v_rows, dequantized = quantize_case(case, name)
  assert k_rows.shape[-1] == case.k_pages.shape[-1] + 4
  kw = dict(sliding_window=window, logits_soft_cap=cap)
  got = pk.ragged_paged_attention_reference(
      jnp.asarray(case.q), jnp.asarray(k_rows), jnp.asarray(v_rows),
      jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens),
      jnp.asarray(case.query_start_loc), max_query_len=max_query_len, **kw)
  _check(got, naive_ragged(dequantized, **kw), np.float32)
  decode = dataclasses.replace(case, q=case.q[:5], query_start_loc=np.arange(6, dtype=np.int32))
  got = pk.paged_attention_reference(jnp.asarray(decode.q), jnp.asarray(k_rows),
                                     jnp.asarray(v_rows), jnp.asarray(case.block_tables),
                                     jnp.asarray(case.seq_lens), **kw)
  _check(got, naive_ragged(dataclasses.replace(dequantized, q=decode.q,
                                               query_start_loc=decode.query_start_loc), **kw),
         np.float32)
