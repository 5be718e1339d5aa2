"""Ragged paged attention (mixed prefill chunks and decodes over a block table): kernel + ref."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common, _mgpu

# ----------------------------------------------------------------------------------------------
# Reference (plain jnp). This is also the CPU production attention path, so it is written to be
# jit-friendly (static shapes, no host syncs) and to gather each sequence's K/V only once.
# ----------------------------------------------------------------------------------------------


def _gather_pages(pages, block_tables):
  """pages [Hkv, num_blocks, bs, D], block_tables [n, mb] -> [Hkv, n, mb * bs, D] in f32.

  Quantized pages (rows [.., D + 4], see _common) are dequantized as gathered: only the
  gathered blocks, never the whole cache."""
  num_kv_heads, _, block_size, row = pages.shape
  n, max_blocks = block_tables.shape
  gathered = pages[:, block_tables]  # [Hkv, n, mb, bs, row]
  gathered = gathered.reshape(num_kv_heads, n, max_blocks * block_size, row)
  if _common.is_quantized(pages):
    return _common.dequantize_rows(gathered)
  return gathered.astype(jnp.float32)


def _token_to_seq(query_start_loc, num_tokens):
  """For every token: its sequence, its offset in that sequence's chunk, and whether it is real.

  query_start_loc [S + 1] -> (seq_id [T], offset [T], valid [T]).
  """
  num_seqs = query_start_loc.shape[0] - 1
  tok = jnp.arange(num_tokens, dtype=jnp.int32)  # [T]
  seq_id = jnp.searchsorted(query_start_loc[1:], tok, side="right").astype(jnp.int32)
  seq_id = jnp.minimum(seq_id, num_seqs - 1)  # [T]
  offset = tok - query_start_loc[seq_id]  # [T]
  valid = jnp.logical_and(tok >= query_start_loc[0], tok < query_start_loc[num_seqs])
  return seq_id, offset, valid


def _per_sequence(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale,
                  sliding_window, logits_soft_cap, max_query_len):
  """Queries regrouped per sequence into [S, Q, ...] with Q = max_query_len; K/V gathered once."""
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads = k_pages.shape[0]
  group = num_q_heads // num_kv_heads
  num_seqs = block_tables.shape[0]
  big_q = max_query_len

  q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
  ar_q = jnp.arange(big_q, dtype=jnp.int32)  # [Q]
  tok_idx = jnp.clip(query_start_loc[:-1, None] + ar_q[None, :], 0, num_tokens - 1)  # [S, Q]
  q_valid = ar_q[None, :] < q_len[:, None]  # [S, Q]
  q_pos = seq_lens[:, None] - q_len[:, None] + ar_q[None, :]  # [S, Q]
  q_pos = jnp.where(q_valid, q_pos, -1)
  q_seq = q[tok_idx].astype(jnp.float32)  # [S, Q, Hq, D]
  q_seq = q_seq.reshape(num_seqs, big_q, num_kv_heads, group, head_dim)

  k_seq = _gather_pages(k_pages, block_tables)  # [Hkv, S, L, D]
  v_seq = _gather_pages(v_pages, block_tables)  # [Hkv, S, L, D]
  key_pos = jnp.arange(k_seq.shape[2], dtype=jnp.int32)  # [L]
  # V rows no query of the sequence may see are zeroed, so NaN there cannot leak via 0 * NaN.
  lowest = (seq_lens - q_len)[:, None]  # [S, 1]: position of the chunk's first query
  v_ok = key_pos[None, :] < seq_lens[:, None]  # [S, L]
  if sliding_window is not None:
    v_ok = jnp.logical_and(v_ok, key_pos[None, :] > lowest - sliding_window)
  v_seq = jnp.where(v_ok[None, :, :, None], v_seq, 0.0)

  scores = jnp.einsum("sqkgd,ksld->skgql", q_seq, k_seq) * scale  # [S, Hkv, G, Q, L]
  scores = _common.soft_cap(scores, logits_soft_cap)
  mask = _common.key_mask(key_pos, q_pos[:, None, None, :, None], sliding_window)
  probs = _common.masked_softmax(scores, mask)  # [S, Hkv, G, Q, L]
  out_seq = jnp.einsum("skgql,ksld->sqkgd", probs, v_seq)  # [S, Q, Hkv, G, D]
  out_seq = out_seq.reshape(num_seqs, big_q, num_q_heads, head_dim)

  seq_id, offset, valid = _token_to_seq(query_start_loc, num_tokens)
  valid = jnp.logical_and(valid, offset < big_q)
  out = out_seq[seq_id, jnp.clip(offset, 0, big_q - 1)]  # [T, Hq, D]
  return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)


def _per_token(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale,
               sliding_window, logits_soft_cap):
  """Each token gathers its own sequence's K/V: right for decode-heavy batches, no Q bound."""
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads = k_pages.shape[0]
  group = num_q_heads // num_kv_heads

  seq_id, offset, valid = _token_to_seq(query_start_loc, num_tokens)
  q_len = query_start_loc[seq_id + 1] - query_start_loc[seq_id]  # [T]
  q_pos = seq_lens[seq_id] - q_len + offset  # [T]
  q_pos = jnp.where(valid, q_pos, -1)
  q_tok = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)

  k_tok = _gather_pages(k_pages, block_tables[seq_id])  # [Hkv, T, L, D]
  v_tok = _gather_pages(v_pages, block_tables[seq_id])  # [Hkv, T, L, D]
  key_pos = jnp.arange(k_tok.shape[2], dtype=jnp.int32)  # [L]
  mask = _common.key_mask(key_pos[None, :], q_pos[:, None], sliding_window)  # [T, L]
  v_tok = jnp.where(mask[None, :, :, None], v_tok, 0.0)

  scores = jnp.einsum("tkgd,ktld->tkgl", q_tok, k_tok) * scale  # [T, Hkv, G, L]
  scores = _common.soft_cap(scores, logits_soft_cap)
  probs = _common.masked_softmax(scores, mask[:, None, None, :])
  out = jnp.einsum("tkgl,ktld->tkgd", probs, v_tok)  # [T, Hkv, G, D]
  out = out.reshape(num_tokens, num_q_heads, head_dim)
  return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)


def ragged_paged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens,
                                     query_start_loc, *, scale=None, sliding_window=None,
                                     logits_soft_cap=None, max_query_len=None):
  """Causal attention of ragged query chunks over a paged KV cache, in plain jnp (f32 math).

  q [T, Hq, D]; k_pages, v_pages [Hkv, num_blocks, block_size, D] (float), or quantized rows
  [Hkv, num_blocks, block_size, D + 4] (int8 / uint8 e4m3 values + an f32 scale, dequantized as
  gathered); block_tables int32 [S, max_blocks]; seq_lens int32 [S] (incl. the chunk);
  query_start_loc int32 [S + 1]. Returns [T, Hq, D] in q's dtype.

  The queries of sequence s are its last `query_start_loc[s+1] - query_start_loc[s]` tokens.
  Tokens past `query_start_loc[S]` and sequences without keys give zeros. Block-table entries
  past a sequence's length (or wholly before its sliding window) are never read into the result.

  `max_query_len` (static) bounds the longest chunk. When given, queries are regrouped per
  sequence and each sequence's K/V is gathered once (best for prefill); tokens of a longer chunk
  would be dropped, which raises when `query_start_loc` is concrete. When None, every token
  gathers its sequence's K/V (no bound needed; fine for decode-heavy batches).
  """
  _common.check_paged_shapes(q, k_pages, v_pages, block_tables, seq_lens)
  _common.check_query_start_loc(query_start_loc, block_tables.shape[0])
  scale = _common.default_scale(q.shape[-1], scale)
  block_tables = block_tables.astype(jnp.int32)
  seq_lens = seq_lens.astype(jnp.int32)
  query_start_loc = query_start_loc.astype(jnp.int32)
  if max_query_len is None:
    return _per_token(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale,
                      sliding_window, logits_soft_cap)
  max_query_len = int(max_query_len)
  if max_query_len < 1:
    raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
  _common.check_max_query_len(query_start_loc, max_query_len)
  return _per_sequence(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, scale,
                       sliding_window, logits_soft_cap, max_query_len)


# ----------------------------------------------------------------------------------------------
# Kernel: Mosaic GPU (Hopper), see pallas_kernels/_mgpu.py.
# ----------------------------------------------------------------------------------------------


def _work_items(query_start_loc, seq_lens, tokens_per_item, num_items):
  """Splits every sequence's chunk into items of <= tokens_per_item tokens.

  Returns meta int32 [W, 3] (seq, num real tokens, first query position), the first token of
  each item [W], and each sequence's first item [S].
  """
  num_seqs = seq_lens.shape[0]
  q_len = jnp.maximum(query_start_loc[1:] - query_start_loc[:-1], 0)  # [S]
  items_per_seq = (q_len + tokens_per_item - 1) // tokens_per_item  # [S]
  item_end = jnp.cumsum(items_per_seq)  # [S]
  item_start = item_end - items_per_seq  # [S]
  w = jnp.arange(num_items, dtype=jnp.int32)  # [W]
  seq = jnp.minimum(jnp.searchsorted(item_end, w, side="right"), num_seqs - 1).astype(jnp.int32)
  chunk = w - item_start[seq]  # [W]
  real = w < item_end[num_seqs - 1]
  first_tok = chunk * tokens_per_item  # [W], within the sequence's chunk
  num_q = jnp.where(real, jnp.clip(q_len[seq] - first_tok, 0, tokens_per_item), 0)
  first_pos = seq_lens[seq] - q_len[seq] + first_tok
  meta = jnp.stack([seq, num_q, first_pos], axis=1).astype(jnp.int32)  # [W, 3]
  return meta, query_start_loc[seq] + first_tok, item_start


def to_tiles(x, group):
  """[W, tq, Hq, D] -> [W, Hkv, ROWS, D]: rows token * gp + head in group (padding rows 0)."""
  num_items, tq, num_q_heads, head_dim = x.shape
  gp = _mgpu.padded_group(group)
  x = x.reshape(num_items, tq, num_q_heads // group, group, head_dim)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, gp - group), (0, 0)))
  x = x.transpose(0, 2, 1, 3, 4)  # [W, Hkv, tq, gp, D]
  return x.reshape(num_items, num_q_heads // group, tq * gp, head_dim)


def from_tiles(x, group, tq):
  """Inverse of `to_tiles`: [W, Hkv, ROWS, D] -> [W, tq, Hq, D]."""
  num_items, num_kv_heads, _, head_dim = x.shape
  gp = _mgpu.padded_group(group)
  x = x.reshape(num_items, num_kv_heads, tq, gp, head_dim)[:, :, :, :group]
  return x.transpose(0, 2, 1, 3, 4).reshape(num_items, tq, num_kv_heads * group, head_dim)


def check_kernel_args(q, k_pages, v_pages, block_tables, seq_lens):
  """Shape checks, plus what the kernel supports (the reference accepts more)."""
  _common.check_paged_shapes(q, k_pages, v_pages, block_tables, seq_lens)
  if _common.is_quantized(k_pages):
    # Rows of D + 4 bytes (68 at D = 64) are no TMA tile: TMA needs 16-byte global strides, so
    # the kernel would need its own block layout (values [bs, D] then the bs scales) written by
    # a pallas-specific write_kv, plus an SMEM -> register -> bf16 widening before each wgmma.
    raise _mgpu.UnsupportedConfig(
        f"quantized KV pages ({jnp.dtype(k_pages.dtype).name} rows with f32 scales, "
        "kv_cache_dtype int8 / fp8) are not read by the Mosaic GPU attention kernel; the "
        "references and jaxserve's blockwise and cpu backends read them")
  if q.dtype != k_pages.dtype:
    raise ValueError(f"q dtype {q.dtype} != KV cache dtype {k_pages.dtype}")
  _mgpu.check_supported(q.shape[2], k_pages.shape[2], q.dtype, q.shape[1] // k_pages.shape[0])


def ragged_paged_attention(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, *,
                           scale=None, sliding_window=None, logits_soft_cap=None,
                           interpret=None, tiling: _mgpu.Tiling | None = None):
  """Causal attention of ragged query chunks over a paged KV cache: the Mosaic GPU kernel.

  Same contract as `ragged_paged_attention_reference` (decodes are chunks of length 1, so one
  call serves a mixed batch). bf16/f16; head_dim 64/128/256; block size 16..128.
  `interpret`: a `plgpu.InterpretGPUParams` runs the Mosaic GPU interpreter (CPU).
  """
  check_kernel_args(q, k_pages, v_pages, block_tables, seq_lens)
  _common.check_query_start_loc(query_start_loc, block_tables.shape[0])
  num_tokens, num_q_heads, head_dim = q.shape
  num_seqs = block_tables.shape[0]
  group = num_q_heads // k_pages.shape[0]
  tq = _mgpu.ROWS // _mgpu.padded_group(group)  # tokens per work item
  num_items = -(-num_tokens // tq) + num_seqs  # static bound on sum_s cdiv(q_len_s, tq)
  seq_lens = seq_lens.astype(jnp.int32)
  query_start_loc = query_start_loc.astype(jnp.int32)
  meta, first_token, item_start = _work_items(query_start_loc, seq_lens, tq, num_items)

  tok = first_token[:, None] + jnp.arange(tq, dtype=jnp.int32)  # [W, tq]
  tok_ok = jnp.arange(tq)[None, :] < meta[:, 1:2]  # [W, tq]
  q_items = jnp.where(tok_ok[:, :, None, None], q[jnp.clip(tok, 0, num_tokens - 1)], 0)
  out = _mgpu.flash_call(
      to_tiles(q_items, group), meta, k_pages, v_pages, block_tables.astype(jnp.int32),
      seq_lens, group=group, scale=_common.default_scale(head_dim, scale),
      sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, tiling=tiling,
      interpret=interpret)  # [W, Hkv, ROWS, D]
  out = from_tiles(out, group, tq).reshape(num_items * tq, num_q_heads, head_dim)

  seq_id, offset, valid = _token_to_seq(query_start_loc, num_tokens)
  row = (item_start[seq_id] + offset // tq) * tq + offset % tq  # [T]
  out = jnp.where(valid[:, None, None], out[jnp.clip(row, 0, num_items * tq - 1)], 0)
  return out.astype(q.dtype)
