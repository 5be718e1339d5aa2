"""Paged decode attention (one query per sequence over a block table): kernel + reference."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import _common, _flash
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

# ----------------------------------------------------------------------------------------------
# Reference (plain jnp).
# ----------------------------------------------------------------------------------------------


def paged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens, *, scale=None,
                              sliding_window=None, logits_soft_cap=None):
  """Decode attention in plain jnp: q [S, Hq, D] is the last token of each sequence.

  k_pages, v_pages [Hkv, num_blocks, block_size, D]; block_tables int32 [S, max_blocks];
  seq_lens int32 [S] (incl. the query). Returns [S, Hq, D]; rows with seq_len == 0 are zeros.
  A decode batch is a ragged batch whose chunks all have length 1.
  """
  _common.check_paged_shapes(q, k_pages, v_pages, block_tables, seq_lens)
  if q.shape[0] != block_tables.shape[0]:
    raise ValueError(f"decode q has {q.shape[0]} rows for {block_tables.shape[0]} sequences")
  num_seqs = q.shape[0]
  query_start_loc = jnp.arange(num_seqs + 1, dtype=jnp.int32)  # [S + 1]
  return ragged_paged_attention_reference(
      q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale=scale,
      sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, max_query_len=1)


# ----------------------------------------------------------------------------------------------
# Kernel (flash-decoding). Pallas generic GPU API (Triton-lowered): a stepping stone towards
# Mosaic GPU, see pallas_kernels/_flash.py for why.
# ----------------------------------------------------------------------------------------------

_TARGET_PROGRAMS = 2 * 132  # two waves of an H100's SMs


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of the decode kernel.

  num_kv_splits: flash-decoding partitions of each sequence's KV pages (None: enough programs
  for about two waves of an H100, capped by the block-table width). The KV tile is one page.
  """
  num_kv_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if self.num_kv_splits is not None and self.num_kv_splits < 1:
      raise ValueError(f"num_kv_splits must be >= 1, got {self.num_kv_splits}")

  def splits_for(self, num_seqs: int, num_kv_heads: int, max_blocks: int) -> int:
    if self.num_kv_splits is not None:
      return self.num_kv_splits
    wanted = -(-_TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, max_blocks))


def paged_attention(q, k_pages, v_pages, block_tables, seq_lens, *, scale=None,
                    sliding_window=None, logits_soft_cap=None, interpret=False,
                    block_sizes: DecodeBlockSizes | None = None):
  """Decode attention over a paged KV cache with the Pallas kernel (flash-decoding).

  Same contract as `paged_attention_reference`: q [S, Hq, D] (the last token of each sequence),
  k_pages, v_pages [Hkv, num_blocks, block_size, D], block_tables int32 [S, max_blocks],
  seq_lens int32 [S] -> [S, Hq, D]. All Hq // Hkv query heads of a KV head form one query tile,
  so they share each page read. `interpret=True` runs Pallas's CPU interpreter.
  """
  _common.check_paged_shapes(q, k_pages, v_pages, block_tables, seq_lens)
  _flash.check_kernel_shapes(q, k_pages)
  num_seqs, num_q_heads, head_dim = q.shape
  num_kv_heads = k_pages.shape[0]
  group = num_q_heads // num_kv_heads
  if q.shape[0] != block_tables.shape[0]:
    raise ValueError(f"decode q has {num_seqs} rows for {block_tables.shape[0]} sequences")
  block_sizes = block_sizes or DecodeBlockSizes()
  rows = max(16, _flash.next_pow2(group))
  seq_lens = seq_lens.astype(jnp.int32)
  q_items = q.reshape(num_seqs, num_kv_heads, group, head_dim)
  q_items = jnp.pad(q_items, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # [S, Hkv, M, D]
  meta = jnp.stack([jnp.arange(num_seqs, dtype=jnp.int32), jnp.ones_like(seq_lens),
                    seq_lens - 1], axis=1)  # [S, 3]
  out = _flash.flash_call(
      q_items, meta, k_pages, v_pages, block_tables.astype(jnp.int32), seq_lens, group=group,
      scale=_common.default_scale(head_dim, scale),
      num_splits=block_sizes.splits_for(num_seqs, num_kv_heads, block_tables.shape[1]),
      sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
      num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages, interpret=interpret)
  out = out[:, :, :group].reshape(num_seqs, num_q_heads, head_dim)  # [S, Hq, D]
  return out.astype(q.dtype)
