"""Tier 2: every kernel configuration the engine can select lowers for CUDA (Mosaic GPU layout
inference, wgmma shape rules, the SMEM budget), under an abstract H100; no GPU needed."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import _mgpu
from tests import gpu_aot

CONFIGS = list(itertools.product(_mgpu.SUPPORTED_HEAD_DIMS, _mgpu.SUPPORTED_BLOCK_SIZES,
                                 _mgpu.SUPPORTED_DTYPES))
IDS = [f"d{d}-bs{b}-{t}" for d, b, t in CONFIGS]


def kernel_args(head_dim, block_size, dtype, *, num_tokens=16, num_seqs=4, num_q_heads=8,
                num_kv_heads=2, max_blocks=8, num_blocks=64):
  """Abstract arguments of one ragged call (shapes only)."""
  sds = jax.ShapeDtypeStruct
  return (sds((num_tokens, num_q_heads, head_dim), dtype),
          sds((num_kv_heads, num_blocks, block_size, head_dim), dtype),
          sds((num_kv_heads, num_blocks, block_size, head_dim), dtype),
          sds((num_seqs, max_blocks), jnp.int32), sds((num_seqs,), jnp.int32),
          sds((num_seqs + 1,), jnp.int32))


def _lowers(fn, args):
  text = gpu_aot.cuda_lower(fn, *args).as_text()
  assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the lowered module"


@pytest.mark.parametrize("head_dim,block_size,dtype", CONFIGS, ids=IDS)
def test_ragged_lowers_for_cuda(head_dim, block_size, dtype):
  args = kernel_args(head_dim, block_size, dtype)
  _lowers(lambda *a: pk.ragged_paged_attention(*a), args)
  _lowers(lambda *a: pk.ragged_paged_attention(*a, sliding_window=100, logits_soft_cap=30.0),
          args)


@pytest.mark.parametrize("head_dim,block_size,dtype", CONFIGS, ids=IDS)
def test_decode_lowers_for_cuda(head_dim, block_size, dtype):
  args = kernel_args(head_dim, block_size, dtype, num_tokens=4, num_q_heads=14)[:5]
  _lowers(lambda *a: pk.paged_attention(*a, sliding_window=100), args)


def test_every_config_fits_the_smem_budget():
  for head_dim, block_size, dtype in CONFIGS:
    tiling = pk.choose_tiling(head_dim, block_size, dtype)
    assert _mgpu.smem_bytes(head_dim, dtype, tiling) <= _mgpu.SMEM_BUDGET


def test_lowering_catches_smem_overflow():
  """The tier can fail: a double-buffered 128-key tile at head_dim 256 needs ~305 KiB."""
  args = kernel_args(256, 128, "bfloat16")
  assert pk.choose_tiling(256, 128, "bfloat16") == pk.Tiling(128, 1)
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    gpu_aot.cuda_lower(lambda *a: pk.ragged_paged_attention(*a, tiling=pk.Tiling(128, 2)), *args)
