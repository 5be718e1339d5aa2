"""Tier 1: the Mosaic GPU kernels in jax's Mosaic GPU interpreter (race detection on) vs the
plain-jnp references.

Every case poisons all KV slots outside the sequences with NaN (block 0 included) and points
block-table tails at garbage, so a kernel that reads outside a sequence, or lets 0 * NaN through
P @ V, fails. The configs cover each head_dim, block size (16..128, i.e. 1 to 4 pages per step,
double- and single-buffered) and dtype, GQA groups 1, 2, 4, 7 (padded to 8) and 8, sliding
windows and soft caps; lengths of 1, crossing a block boundary, a whole block, a full block
table, empty padding sequences and padding tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels as pk
from _paged_cases import make_case
from pallas_kernels import _mgpu

INTERPRET = plgpu.InterpretGPUParams(detect_races=True)
TOL = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}
BF16, F16 = jnp.bfloat16, jnp.float16

# (head_dim, block_size, dtype, num_q_heads, num_kv_heads, sliding_window, logits_soft_cap)
DECODE = [
    (64, 16, BF16, 8, 2, None, None),
    (128, 64, F16, 4, 1, 40, None),
    (256, 128, BF16, 2, 2, None, 30.0),
]
RAGGED = [
    (64, 16, BF16, 14, 2, None, None),  # Qwen2.5-0.5B's group of 7
    (128, 32, F16, 4, 1, 20, 30.0),
    (256, 128, F16, 4, 2, 70, None),  # single-buffered (SMEM)
    (256, 64, BF16, 8, 8, None, 5.0),
    (64, 128, BF16, 16, 2, None, None),
]


def _ids(cases):
  return [f"d{d}-bs{b}-{jnp.dtype(t).name}-g{h // k}-w{w}-c{c}" for d, b, t, h, k, w, c in cases]


def _arrays(case):
  return [jnp.asarray(x) for x in (case.q, case.k_pages, case.v_pages, case.block_tables,
                                   case.seq_lens)]


def _assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert not np.isnan(got).any(), "kernel produced NaN"
  np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("d,bs,dtype,hq,hkv,window,cap", DECODE, ids=_ids(DECODE))
def test_decode_kernel_matches_reference(d, bs, dtype, hq, hkv, window, cap):
  case = make_case([1, bs + 1, bs, 3 * bs, 0], [1] * 5, num_q_heads=hq, num_kv_heads=hkv,
                   head_dim=d, block_size=bs, max_blocks=3, dtype=dtype, seed=d + bs)
  kw = dict(sliding_window=window, logits_soft_cap=cap)
  got = pk.paged_attention(*_arrays(case), interpret=INTERPRET, **kw)
  want = pk.paged_attention_reference(*_arrays(case), **kw)
  assert got.shape == case.q.shape and got.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(got[4], np.float32), 0.0)  # seq_len 0 row
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("d,bs,dtype,hq,hkv,window,cap", RAGGED, ids=_ids(RAGGED))
def test_ragged_kernel_matches_reference(d, bs, dtype, hq, hkv, window, cap):
  # a decode, a chunk crossing a block boundary over a cached prefix, a whole prefill, the
  # longest sequence's last chunk (longer than one work item for small groups), an empty
  # padding sequence; plus 3 padding tokens.
  q_lens = [1, 3, bs, 11, 0]
  case = make_case([1, bs + 1, bs, 3 * bs, 0], q_lens, num_q_heads=hq, num_kv_heads=hkv,
                   head_dim=d, block_size=bs, max_blocks=4, dtype=dtype,
                   num_tokens=sum(q_lens) + 3, seed=d * bs)
  qsl = jnp.asarray(case.query_start_loc)
  kw = dict(sliding_window=window, logits_soft_cap=cap, scale=0.1 if cap else None)
  got = pk.ragged_paged_attention(*_arrays(case), qsl, interpret=INTERPRET, **kw)
  want = pk.ragged_paged_attention_reference(*_arrays(case), qsl, **kw)
  np.testing.assert_array_equal(np.asarray(got[-3:], np.float32), 0.0)  # padding tokens
  _assert_close(got, want, dtype)


class _ShortBarrier:
  """plgpu with the K/V barriers expecting one arrival fewer than the page copies give."""

  def __getattr__(self, name):
    return getattr(plgpu, name)

  @staticmethod
  def Barrier(num_arrivals=1, num_barriers=1):
    return plgpu.Barrier(num_arrivals=num_arrivals - (num_arrivals > 1),
                         num_barriers=num_barriers)


def test_interpreter_catches_wrong_barrier_count(monkeypatch):
  """The tier can fail: a kernel whose barrier phase completes before all page copies arrive."""
  case = make_case([1, 17, 48], [1, 1, 1], head_dim=64, block_size=16, max_blocks=4,
                   dtype=BF16, seed=3)
  monkeypatch.setattr(_mgpu, "plgpu", _ShortBarrier())
  with pytest.raises(Exception, match="arrivals pending"):
    pk.paged_attention(*_arrays(case), interpret=INTERPRET).block_until_ready()


def test_kernel_rejects_unsupported_shapes():
  case = make_case([3], [1], head_dim=64, block_size=16, seed=14, dtype=BF16)
  q, k, v, bt, sl = _arrays(case)
  with pytest.raises(ValueError, match="head_dim 32"):
    pk.paged_attention(q[..., :32], k[..., :32], v[..., :32], bt, sl, interpret=INTERPRET)
  with pytest.raises(ValueError, match="dtype float32"):
    pk.paged_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                       bt, sl, interpret=INTERPRET)
  with pytest.raises(ValueError, match="block_size 8"):
    pk.paged_attention(q, k.reshape(2, -1, 8, 64), v.reshape(2, -1, 8, 64), bt, sl,
                       interpret=INTERPRET)
