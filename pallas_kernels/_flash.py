"""The flash-attention kernel body shared by the decode and ragged paged-attention entry points.

STEPPING STONE: this kernel is written with Pallas's generic GPU API (``pl.pallas_call`` +
``BlockSpec``, lowered by Triton on the GPU, run by ``interpret=True`` on the CPU). The target is
Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``), but jax 0.10.2's Mosaic GPU CPU interpreter
(``InterpretGPUParams``) cannot yet run flash attention: it has no rule for ``layout_cast`` (so no
layout-annotated iota for masks), its ``wgmma`` reads only untransposed SMEM operands (no
``transpose_ref`` for Q @ K^T) and rejects a register LHS (needed for P @ V). A Mosaic GPU port is
the next step once the interpreter (or a GPU machine for testing) allows it.

Work decomposition. A *work item* is up to ``tq`` consecutive query tokens of one sequence; its
query tile stacks those tokens x the GQA group of one KV head into ``q_rows`` rows, so a group
shares every K/V page read. The grid is (kv head, work item, KV split): each program walks the
pages of its KV split (flash-decoding) with an online softmax and writes a normalised partial
output + its log-sum-exp; the splits are merged outside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common

try:  # jax 0.10 / 0.11: the Triton compiler params moved names over time.
  from jax.experimental.pallas import triton as _pl_triton
  _TritonParams = getattr(_pl_triton, "CompilerParams", None) or getattr(
      _pl_triton, "TritonCompilerParams", None)
except ImportError:  # pragma: no cover - Triton lowering removed
  _TritonParams = None

# Work-item metadata columns: sequence index, number of real query tokens, position of the first.
META_SEQ, META_NUM_Q, META_FIRST_POS = 0, 1, 2


def _kernel(meta_ref, seq_lens_ref, block_tables_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
            scale, group, block_size, num_splits, max_blocks, sliding_window, logits_soft_cap,
            precision):
  """One (kv head, work item, split) program. Refs (after BlockSpecs):

  q_ref [M, D]; k_ref, v_ref [num_blocks, block_size, D] (this kv head); o_ref [M, D] f32;
  lse_ref [M] f32; meta_ref [W, 3], seq_lens_ref [S], block_tables_ref [S, max_blocks] int32.
  """
  item, split = pl.program_id(1), pl.program_id(2)
  seq = meta_ref[item, META_SEQ]
  num_q = meta_ref[item, META_NUM_Q]
  first_pos = meta_ref[item, META_FIRST_POS]
  seq_len = seq_lens_ref[seq]
  # Keys this item may see: [kv_lo, kv_hi).
  kv_hi = jnp.where(num_q > 0, jnp.minimum(seq_len, first_pos + num_q), 0)
  kv_lo = jnp.int32(0)
  if sliding_window is not None:
    kv_lo = jnp.maximum(first_pos - sliding_window + 1, 0)
  page_lo = kv_lo // block_size
  page_hi = jnp.minimum((kv_hi + block_size - 1) // block_size, max_blocks)
  num_pages = jnp.maximum(page_hi - page_lo, 0)
  per_split = (num_pages + num_splits - 1) // num_splits
  start = page_lo + split * per_split
  end = jnp.minimum(start + per_split, page_hi)

  q = q_ref[...]  # [M, D]
  rows = q.shape[0]
  row_tok = jnp.arange(rows, dtype=jnp.int32) // group  # [M]
  q_pos = first_pos + row_tok  # [M]
  row_ok = row_tok < num_q  # [M]

  def body(page, carry):
    m_prev, l_prev, acc = carry  # [M], [M], [M, D]
    block = block_tables_ref[seq, page]
    k = k_ref[block]  # [block_size, D]
    v = v_ref[block]  # [block_size, D]
    key_pos = page * block_size + jnp.arange(block_size, dtype=jnp.int32)  # [bs]
    key_ok = (key_pos >= kv_lo) & (key_pos < kv_hi)  # [bs]
    # Zero V outside the item's keys (select, not multiply): NaN there must not reach P @ V.
    v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale  # [M, bs]
    if logits_soft_cap is not None:
      s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    mask = row_ok[:, None] & key_ok[None, :] & (key_pos[None, :] <= q_pos[:, None])
    if sliding_window is not None:
      mask = mask & (q_pos[:, None] - key_pos[None, :] < sliding_window)
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))  # [M]
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)  # [M]; 0 while m_prev is -inf
    p = jnp.where(mask, jnp.exp(s - m_safe[:, None]), 0.0)  # [M, bs]
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)  # [M, D]
    return m_new, l_new, acc * alpha[:, None] + pv

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(start, end, body, init)
  has_keys = l > 0.0
  o_ref[...] = acc / jnp.where(has_keys, l, 1.0)[:, None]
  lse_ref[...] = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)


def merge_splits(o, lse):
  """Log-sum-exp merge of KV-split partials. o [..., P, M, D], lse [..., P, M] -> [..., M, D]."""
  lse_max = jnp.max(lse, axis=-2, keepdims=True)  # [..., 1, M]
  lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
  weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - lse_max), 0.0)  # [..., P, M]
  total = jnp.sum(weight, axis=-2)  # [..., M]
  out = jnp.sum(jnp.where(weight[..., None] > 0, o * weight[..., None], 0.0), axis=-3)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def flash_call(q_items, meta, k_pages, v_pages, block_tables, seq_lens, *, group, scale,
               num_splits, sliding_window, logits_soft_cap, num_warps, num_stages, interpret):
  """Runs the kernel over all work items and merges the KV splits.

  q_items [W, Hkv, M, D]; meta int32 [W, 3]; k_pages, v_pages [Hkv, num_blocks, bs, D];
  block_tables int32 [S, max_blocks]; seq_lens int32 [S]. Returns [W, Hkv, M, D] float32.
  """
  num_items, num_kv_heads, rows, head_dim = q_items.shape
  _, num_blocks, block_size, _ = k_pages.shape
  max_blocks = block_tables.shape[1]
  precision = lax.Precision.HIGHEST if q_items.dtype == jnp.float32 else None
  kernel = functools.partial(
      _kernel, scale=scale, group=group, block_size=block_size, num_splits=num_splits,
      max_blocks=max_blocks, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
      precision=precision)
  whole = lambda x: pl.BlockSpec(x.shape, lambda h, w, p: (0,) * x.ndim)
  pages = pl.BlockSpec((None, num_blocks, block_size, head_dim), lambda h, w, p: (h, 0, 0, 0))
  compiler_params = None
  if _TritonParams is not None:
    compiler_params = _TritonParams(num_warps=num_warps, num_stages=num_stages)
  o, lse = pl.pallas_call(
      kernel,
      grid=(num_kv_heads, num_items, num_splits),
      in_specs=[whole(meta), whole(seq_lens), whole(block_tables),
                pl.BlockSpec((None, None, rows, head_dim), lambda h, w, p: (w, h, 0, 0)),
                pages, pages],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, head_dim), lambda h, w, p: (w, h, p, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda h, w, p: (w, h, p, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_items, num_kv_heads, num_splits, rows, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((num_items, num_kv_heads, num_splits, rows), jnp.float32),
      ],
      compiler_params=compiler_params,
      interpret=interpret,
      name="paged_flash_attention",
  )(meta, seq_lens, block_tables, q_items, k_pages, v_pages)
  if num_splits == 1:
    return o[:, :, 0]
  return merge_splits(o, lse)


def check_kernel_shapes(q, k_pages) -> None:
  """Static checks of what the kernel supports (the references accept more)."""
  head_dim = k_pages.shape[-1]
  block_size = k_pages.shape[2]
  if head_dim not in _common.SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim {head_dim} not in {_common.SUPPORTED_HEAD_DIMS}")
  if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
    raise ValueError(f"block_size {block_size} must be a power of two in [16, 128]")
  if q.dtype != k_pages.dtype:
    raise ValueError(f"q dtype {q.dtype} != KV cache dtype {k_pages.dtype}")
  if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _common.SUPPORTED_DTYPES]:
    raise ValueError(f"dtype {q.dtype} not supported")


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())
