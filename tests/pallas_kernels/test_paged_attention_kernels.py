"""Pallas kernels (CPU interpreter) against the plain-jnp references.

Every case poisons all KV slots outside the sequences with NaN (block 0 included) and points
block-table tails at garbage, so a kernel that reads outside a sequence fails. The cases cover
every supported head_dim, block size and dtype (pairwise, to keep the interpreter fast), with
lengths of 1, crossing block boundaries, the longest length (a full block table), padding rows
(seq_len 0) and padding tokens past query_start_loc[num_seqs].
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from _paged_cases import make_case

# CPU: Pallas's interpreter. benchmarks/gpu_suite.py sets PALLAS_KERNELS_INTERPRET=0 on a GPU.
INTERPRET = os.environ.get("PALLAS_KERNELS_INTERPRET", "1") != "0"

# Kernel vs reference. The reference works in f32 from the same inputs; the kernel feeds P to
# P @ V in the input dtype (flash-attention practice), and both round the output to the dtype.
TOL = {np.float32: 1e-5, jnp.bfloat16: 3e-2, np.float16: 5e-3}

# (head_dim, block_size, dtype, num_q_heads, num_kv_heads): each head_dim, block size and dtype
# appears at least once, together with GQA groups of 1, 2, 4 and 8.
CONFIGS = [
    (64, 16, np.float32, 8, 2),
    (128, 32, jnp.bfloat16, 4, 1),
    (256, 64, np.float16, 2, 2),
    (64, 128, jnp.bfloat16, 8, 1),
    (128, 16, np.float16, 4, 2),
    (256, 128, np.float32, 4, 2),
]
IDS = [f"d{d}-bs{b}-{jnp.dtype(t).name}-g{h // k}" for d, b, t, h, k in CONFIGS]


def _lengths(block_size, max_blocks):
  """length 1, crossing a block boundary, exactly one block, the longest, a padding row."""
  longest = block_size * max_blocks
  return [1, block_size + 1, block_size, longest, 0]


def _assert_close(got, want, dtype):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert not np.isnan(got).any(), "kernel produced NaN"
  np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])


def _arrays(case):
  return (jnp.asarray(case.q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages),
          jnp.asarray(case.block_tables), jnp.asarray(case.seq_lens))


@pytest.mark.parametrize("head_dim,block_size,dtype,num_q_heads,num_kv_heads", CONFIGS, ids=IDS)
def test_decode_kernel_matches_reference(head_dim, block_size, dtype, num_q_heads,
                                         num_kv_heads):
  seq_lens = _lengths(block_size, max_blocks=3)
  case = make_case(seq_lens, [1] * len(seq_lens), num_q_heads=num_q_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                   max_blocks=3, dtype=dtype, seed=head_dim + block_size)
  got = pk.paged_attention(*_arrays(case), interpret=INTERPRET)
  want = pk.paged_attention_reference(*_arrays(case))
  assert got.shape == case.q.shape and got.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(got[4], np.float32), 0.0)  # seq_len 0 row
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("head_dim,block_size,dtype,num_q_heads,num_kv_heads", CONFIGS, ids=IDS)
def test_ragged_kernel_matches_reference(head_dim, block_size, dtype, num_q_heads,
                                         num_kv_heads):
  seq_lens = _lengths(block_size, max_blocks=2)
  # a decode, a chunk crossing a block boundary over a cached prefix, a whole prefill, the
  # longest sequence's last chunk, an empty padding sequence; plus 3 padding tokens.
  q_lens = [1, 3, block_size, 5, 0]
  case = make_case(seq_lens, q_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, block_size=block_size, max_blocks=2, dtype=dtype,
                   num_tokens=sum(q_lens) + 3, seed=head_dim * block_size)
  qsl = jnp.asarray(case.query_start_loc)
  block_sizes = pk.RaggedBlockSizes(q_rows=16, num_kv_splits=1 + block_size % 3)
  got = pk.ragged_paged_attention(*_arrays(case), qsl, interpret=INTERPRET, block_sizes=block_sizes)
  want = pk.ragged_paged_attention_reference(*_arrays(case), qsl)
  np.testing.assert_array_equal(np.asarray(got[-3:], np.float32), 0.0)  # padding tokens
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("kind", ["decode", "ragged"])
@pytest.mark.parametrize("sliding_window,logits_soft_cap,scale", [(5, None, None),
                                                                  (None, 3.0, 0.2),
                                                                  (19, 2.0, None)])
def test_kernels_window_softcap(kind, sliding_window, logits_soft_cap, scale):
  kw = dict(scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  seq_lens = [45, 1, 17, 0]
  if kind == "decode":
    case = make_case(seq_lens, [1] * 4, num_q_heads=4, num_kv_heads=2, block_size=16,
                     max_blocks=3, seed=11)
    got = pk.paged_attention(*_arrays(case), interpret=INTERPRET,
                             block_sizes=pk.DecodeBlockSizes(num_kv_splits=2), **kw)
    want = pk.paged_attention_reference(*_arrays(case), **kw)
  else:
    case = make_case(seq_lens, [20, 1, 6, 0], num_q_heads=4, num_kv_heads=2, block_size=16,
                     max_blocks=3, num_tokens=30, seed=12)
    qsl = jnp.asarray(case.query_start_loc)
    got = pk.ragged_paged_attention(*_arrays(case), qsl, interpret=INTERPRET, **kw)
    want = pk.ragged_paged_attention_reference(*_arrays(case), qsl, **kw)
  _assert_close(got, want, np.float32)


def test_decode_kernel_many_splits_equals_one_split():
  """Flash-decoding: the LSE merge over KV splits must not change the result."""
  case = make_case([64, 33, 2], [1, 1, 1], block_size=16, max_blocks=4, seed=13)
  one = pk.paged_attention(*_arrays(case), interpret=INTERPRET,
                           block_sizes=pk.DecodeBlockSizes(num_kv_splits=1))
  four = pk.paged_attention(*_arrays(case), interpret=INTERPRET,
                            block_sizes=pk.DecodeBlockSizes(num_kv_splits=4))
  _assert_close(four, one, np.float32)
  _assert_close(one, pk.paged_attention_reference(*_arrays(case)), np.float32)


def test_kernel_rejects_unsupported_shapes():
  case = make_case([3], [1], head_dim=64, block_size=16, seed=14)
  q, k, v, bt, sl = _arrays(case)
  with pytest.raises(ValueError, match="head_dim"):
    pk.paged_attention(q[..., :32], k[..., :32], v[..., :32], bt, sl, interpret=INTERPRET)
  with pytest.raises(ValueError, match="dtype"):
    pk.paged_attention(q.astype(jnp.bfloat16), k, v, bt, sl, interpret=INTERPRET)
