"""Tier 3: a deviceless H100 compile (XLA's GPU pipeline, Mosaic GPU -> PTX -> ptxas sm_90a) of
the kernels, on a CPU-only machine. Needs the `test` extra's jax-cuda13 plugin wheels + ptxas."""

from __future__ import annotations

import pytest

import pallas_kernels as pk
from tests import gpu_aot
from tests.pallas_kernels.test_mgpu_lowering import kernel_args

pytestmark = pytest.mark.skipif(gpu_aot.cuda_plugin_missing() is not None,
                                reason=str(gpu_aot.cuda_plugin_missing()))

# Each head_dim and block size once, both dtypes, both buffering depths, window + soft cap.
CONFIGS = [(64, 16, "bfloat16"), (128, 32, "float16"), (128, 64, "bfloat16"),
           (256, 128, "bfloat16"), (256, 64, "float16"), (64, 128, "float16")]


@pytest.mark.parametrize("head_dim,block_size,dtype", CONFIGS,
                         ids=[f"d{d}-bs{b}-{t}" for d, b, t in CONFIGS])
def test_ragged_kernel_compiles_for_h100(head_dim, block_size, dtype):
  args = kernel_args(head_dim, block_size, dtype)
  compiled = gpu_aot.h100_compile(
      lambda *a: pk.ragged_paged_attention(*a, sliding_window=100, logits_soft_cap=30.0), *args)
  assert "mosaic" in compiled.as_text().lower()


def test_decode_kernel_compiles_for_h100():
  args = kernel_args(128, 16, "bfloat16", num_tokens=4, num_q_heads=14)[:5]
  gpu_aot.h100_compile(lambda *a: pk.paged_attention(*a), *args)


def test_compile_catches_smem_overflow():
  """The tier can fail: a double-buffered 128-key tile at head_dim 256 overflows SMEM."""
  args = kernel_args(256, 128, "bfloat16")
  with pytest.raises(ValueError, match="shared memory"):
    gpu_aot.h100_compile(lambda *a: pk.ragged_paged_attention(*a, tiling=pk.Tiling(128, 2)),
                         *args)
