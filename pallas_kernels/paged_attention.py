"""Paged decode attention (one query per sequence over a block table): kernel + reference."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common, _mgpu
from pallas_kernels.ragged_paged_attention import check_kernel_args, from_tiles, to_tiles
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

# ----------------------------------------------------------------------------------------------
# Reference (plain jnp).
# ----------------------------------------------------------------------------------------------


def paged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens, *, scale=None,
                              sliding_window=None, logits_soft_cap=None):
  """Decode attention in plain jnp: q [S, Hq, D] is the last token of each sequence.

  k_pages, v_pages [Hkv, num_blocks, block_size, D], or quantized rows [.., D + 4] (as the
  ragged reference); block_tables int32 [S, max_blocks]; seq_lens int32 [S] (incl. the query).
  Returns [S, Hq, D]; rows with seq_len == 0 are zeros.
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
# Kernel: Mosaic GPU (Hopper), see pallas_kernels/_mgpu.py. One work item per sequence.
# ----------------------------------------------------------------------------------------------


def paged_attention(q, k_pages, v_pages, block_tables, seq_lens, *, scale=None,
                    sliding_window=None, logits_soft_cap=None, interpret=None,
                    tiling: _mgpu.Tiling | None = None):
  """Decode attention over a paged KV cache with the Mosaic GPU kernel.

  Same contract as `paged_attention_reference`: q [S, Hq, D] (the last token of each sequence),
  k_pages, v_pages [Hkv, num_blocks, block_size, D], block_tables int32 [S, max_blocks],
  seq_lens int32 [S] -> [S, Hq, D]. The Hq // Hkv query heads of a KV head share each page read.
  `interpret`: a `plgpu.InterpretGPUParams` runs the Mosaic GPU interpreter (CPU).
  """
  check_kernel_args(q, k_pages, v_pages, block_tables, seq_lens)
  num_seqs, num_q_heads, head_dim = q.shape
  if num_seqs != block_tables.shape[0]:
    raise ValueError(f"decode q has {num_seqs} rows for {block_tables.shape[0]} sequences")
  group = num_q_heads // k_pages.shape[0]
  tq = _mgpu.ROWS // _mgpu.padded_group(group)
  seq_lens = seq_lens.astype(jnp.int32)
  meta = jnp.stack([jnp.arange(num_seqs, dtype=jnp.int32), (seq_lens > 0).astype(jnp.int32),
                    seq_lens - 1], axis=1)  # [S, 3]
  q_items = jnp.pad(q[:, None], ((0, 0), (0, tq - 1), (0, 0), (0, 0)))  # [S, tq, Hq, D]
  out = _mgpu.flash_call(
      to_tiles(q_items, group), meta, k_pages, v_pages, block_tables.astype(jnp.int32),
      seq_lens, group=group, scale=_common.default_scale(head_dim, scale),
      sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, tiling=tiling,
      interpret=interpret)  # [S, Hkv, ROWS, D]
  return from_tiles(out, group, tq)[:, 0].astype(q.dtype)
