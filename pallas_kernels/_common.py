"""Shared helpers for the paged-attention kernels and references: argument checks and masking."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Quantized KV pages (jaxserve/layers/kv_quant.py's row format): rows [..., D + 4] of int8, or of
# uint8 holding float8_e4m3fn bits; each row its D values, then its f32 scale's 4 bytes.
QUANT_VALUE_DTYPES = {jnp.dtype(jnp.int8): jnp.int8, jnp.dtype(jnp.uint8): jnp.float8_e4m3fn}
SCALE_BYTES = 4


def is_quantized(pages) -> bool:
  """Whether pages hold quantized rows (int8 / e4m3 values + an f32 scale each)."""
  return jnp.dtype(pages.dtype) in QUANT_VALUE_DTYPES


def page_head_dim(pages) -> int:
  """head_dim of pages [..., D] (float) or [..., D + 4] (quantized rows)."""
  return pages.shape[-1] - (SCALE_BYTES if is_quantized(pages) else 0)


def dequantize_rows(rows: jax.Array) -> jax.Array:
  """Quantized rows [..., D + 4] -> f32 [..., D]: values * scale (a NaN scale -> NaN row)."""
  values = jax.lax.bitcast_convert_type(rows[..., :-SCALE_BYTES],
                                        QUANT_VALUE_DTYPES[jnp.dtype(rows.dtype)])
  scales = jax.lax.bitcast_convert_type(rows[..., -SCALE_BYTES:], jnp.float32)  # [...]
  return values.astype(jnp.float32) * scales[..., None]


def default_scale(head_dim: int, scale: float | None) -> float:
  """`scale` if given, else 1/sqrt(head_dim)."""
  return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def check_paged_shapes(q, k_pages, v_pages, block_tables, seq_lens) -> None:
  """Raises ValueError on inconsistent shapes (static checks only)."""
  if q.ndim != 3:
    raise ValueError(f"q must be [tokens, num_q_heads, head_dim], got shape {q.shape}")
  if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
    raise ValueError(
        "k_pages and v_pages must both be [num_kv_heads, num_blocks, block_size, head_dim], "
        f"got {k_pages.shape} and {v_pages.shape}")
  num_kv_heads, head_dim = k_pages.shape[0], page_head_dim(k_pages)
  if k_pages.dtype != v_pages.dtype:
    raise ValueError(f"k_pages and v_pages differ in dtype: {k_pages.dtype} and {v_pages.dtype}")
  if q.shape[2] != head_dim:
    raise ValueError(f"q head_dim {q.shape[2]} != page head_dim {head_dim}")
  if q.shape[1] % num_kv_heads:
    raise ValueError(
        f"num_q_heads {q.shape[1]} must be a multiple of num_kv_heads {num_kv_heads}")
  if block_tables.ndim != 2 or seq_lens.shape != (block_tables.shape[0],):
    raise ValueError(
        f"block_tables must be [num_seqs, max_blocks] and seq_lens [num_seqs], got "
        f"{block_tables.shape} and {seq_lens.shape}")


def check_query_start_loc(query_start_loc, num_seqs: int) -> None:
  if query_start_loc.shape != (num_seqs + 1,):
    raise ValueError(
        f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}], "
        f"got {query_start_loc.shape}")


def check_max_query_len(query_start_loc, max_query_len: int) -> None:
  """When the values are concrete (not traced), raise if a chunk is longer than max_query_len.

  Under jit this cannot be checked; the caller's bucketed bound must hold.
  """
  try:
    qsl = np.asarray(query_start_loc)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  longest = int(np.max(np.diff(qsl), initial=0))
  if longest > max_query_len:
    raise ValueError(f"a query chunk has {longest} tokens > max_query_len={max_query_len}")


def soft_cap(scores: jax.Array, logits_soft_cap: float | None) -> jax.Array:
  """cap * tanh(scores / cap) (Gemma 2 style), or the scores unchanged."""
  if logits_soft_cap is None:
    return scores
  cap = jnp.float32(logits_soft_cap)
  return cap * jnp.tanh(scores / cap)


def key_mask(key_pos: jax.Array, query_pos: jax.Array, sliding_window: int | None) -> jax.Array:
  """Which keys a query may see: causal (key <= query), and within the sliding window.

  The window convention is HF/vLLM's: a query at position p sees keys p - W + 1 .. p (W keys,
  itself included). Arrays broadcast against each other; negative query positions see nothing.
  """
  mask = key_pos <= query_pos
  mask = jnp.logical_and(mask, key_pos >= 0)
  if sliding_window is not None:
    mask = jnp.logical_and(mask, query_pos - key_pos < sliding_window)
  return mask


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax of f32 `scores` over the last axis where `mask` holds; NaN-safe.

  Masked entries (even NaN/inf ones, e.g. from poisoned pages) get probability exactly 0
  (selected with `where`, never multiplied), and a row without any valid key is all zeros.
  """
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  return probs / jnp.where(denom == 0.0, 1.0, denom)
