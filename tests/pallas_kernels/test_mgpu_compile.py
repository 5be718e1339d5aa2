"""Tier 3: a deviceless H100 compile of the Mosaic GPU kernels (XLA's GPU pipeline, Mosaic GPU ->
PTX -> ptxas sm_90a) on a CPU-only machine, for one and two GPUs (the engine's shard_map over tp).

Needs the `jax-cuda13-plugin` / `jax-cuda13-pjrt` / `nvidia-cuda-nvcc` wheels of the `test` extra:
without them these tests fail (not skip), since CI installs that extra.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from jaxserve.layers import attention
from pallas_kernels import _mgpu
from tests import gpu_aot
from tests.pallas_kernels.test_mgpu_lowering import kernel_args

BF16 = "bfloat16"
# The engine calls the ragged kernel: every head_dim x block size in bf16, plus f16 where the
# tiling drops to one buffer (head_dim 256, 128-token blocks: the Gemma-like case that overflowed
# shared memory in the retired Triton kernel).
RAGGED = [(d, bs, BF16) for d in _mgpu.SUPPORTED_HEAD_DIMS for bs in _mgpu.SUPPORTED_BLOCK_SIZES]
RAGGED += [(256, 128, "float16"), (64, 16, "float16")]


@pytest.fixture(scope="module", autouse=True)
def _plugin():
  missing = gpu_aot.cuda_plugin_missing()
  if missing:
    pytest.fail(f"tier 3 cannot run: {missing}")


def _kernel_in(compiled) -> bool:
  return "mosaic_gpu" in compiled.as_text()


@pytest.mark.parametrize("head_dim,block_size,dtype", RAGGED,
                         ids=[f"d{d}-bs{b}-{t}" for d, b, t in RAGGED])
def test_ragged_compiles_for_h100(head_dim, block_size, dtype):
  args = kernel_args(head_dim, block_size, dtype)
  compiled = gpu_aot.h100_compile(
      lambda *a: pk.ragged_paged_attention(*a, sliding_window=100, logits_soft_cap=30.0), *args)
  assert _kernel_in(compiled)


def _spilled_bytes(ptxas_info: str) -> int:
  return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", ptxas_info))


# Spill bytes ptxas may report. head_dim 256 keeps two [64, 128] f32 accumulators (one
# [64, 256] plus its P @ V result spilled 568-912 bytes); 16 bytes are left, to look at on a GPU.
MAX_SPILL = {64: 0, 128: 0, 256: 64}


@pytest.mark.parametrize("head_dim", sorted(MAX_SPILL))
def test_ptxas_compiles_for_sm90a_without_register_spills(head_dim):
  """ptxas (run by the compile, not a guess) targets sm_90a and spills (almost) no registers:
  spills are a speed bug that neither the interpreter nor the lowering can see."""
  info = gpu_aot.h100_ptxas_info(
      lambda *a: pk.ragged_paged_attention(*a, sliding_window=64, logits_soft_cap=30.0),
      *kernel_args(head_dim, 64, BF16))
  assert "for 'sm_90a'" in info, info
  assert _spilled_bytes(info) <= MAX_SPILL[head_dim], info


def test_decode_compiles_for_h100():
  args = kernel_args(128, 16, BF16, num_tokens=4, num_q_heads=14)[:5]
  assert _kernel_in(gpu_aot.h100_compile(lambda *a: pk.paged_attention(*a), *args))


def test_compile_catches_smem_overflow():
  """The tier can fail: a double-buffered 128-key tile at head_dim 256 overflows H100 SMEM."""
  args = kernel_args(256, 128, BF16)
  with pytest.raises(Exception, match="shared memory"):
    gpu_aot.h100_compile(lambda *a: pk.ragged_paged_attention(*a, tiling=pk.Tiling(128, 2)),
                         *args)


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_engine_attention_under_shard_map_compiles_for_two_h100(num_kv_heads):
  """The engine's pallas path with tp=2 (q heads split; KV split by head, or replicated when
  kv heads < tp) compiles for a two-GPU topology."""
  mesh = gpu_aot.h100_mesh(2)
  cfg = attention.AttentionConfig(backend="pallas", sliding_window=64, mesh=mesh)
  q, k, v, bt, sl, qsl = kernel_args(64, 16, BF16, num_q_heads=14, num_kv_heads=num_kv_heads)

  def attend(q, k, v, bt, sl, qsl):
    md = attention.AttentionMetadata(
        positions=jnp.zeros(q.shape[:1], jnp.int32), slot_mapping=jnp.zeros(q.shape[:1], jnp.int32),
        block_tables=bt, seq_lens=sl, query_start_loc=qsl)
    return attention.paged_attention(q, k, v, md, cfg, scale=0.125)

  pages = jax.sharding.PartitionSpec("tp") if num_kv_heads % 2 == 0 else jax.sharding.PartitionSpec()
  specs = [jax.sharding.PartitionSpec(None, "tp"), pages, pages] + [jax.sharding.PartitionSpec()] * 3
  compiled = gpu_aot.h100_compile(attend, q, k, v, bt, sl, qsl, num_gpus=2, in_specs=specs)
  assert _kernel_in(compiled)
