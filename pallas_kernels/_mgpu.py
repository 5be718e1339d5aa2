"""Mosaic GPU (Hopper) flash-attention body shared by the paged decode and ragged entry points.

Written in the subset jax 0.12's Mosaic GPU interpreter executes (both wgmma operands in SMEM,
a fresh `plgpu.ACC` per matmul), so one kernel is checked on a CPU three ways: the interpreter
(numerics, races, barrier phases), CUDA cross-lowering (layouts, wgmma shapes, SMEM budget) and a
deviceless H100 compile (ptxas).

Work decomposition. A *work item* is up to `tq` consecutive query tokens of one sequence; its
64-row query tile (one wgmma M) stacks those tokens x the GQA group of one KV head, the group
padded to a power of two `gp` (row r = token r // gp, head r % gp), so a group shares every K/V
page read. One CTA (one warpgroup) per (work item, KV head). Each step gathers
`keys_per_step // block_size` pages, each picked by the block table (scalars read from GMEM), by
TMA into consecutive rows of one [keys_per_step, D] SMEM tile (double-buffered when SMEM allows:
step i+1's pages load while step i computes), then Q @ K^T (K^T as a transposed SMEM ref), causal
/ sliding-window mask and soft cap, online softmax in registers, P staged through SMEM, P @ V.
On steps that straddle the item's key range, V rows outside it are zeroed in SMEM first: slots past
a sequence may hold anything (NaN), and 0 * NaN would reach the output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # query rows of one CTA: one wgmma M
SUPPORTED_DTYPES = ("bfloat16", "float16")
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
MAX_GROUP = ROWS
# H100 opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), less 4 KiB kept
# for barriers and Mosaic's own scratch.
SMEM_BUDGET = 232448 - 4096
# Work-item metadata columns: sequence, number of real query tokens, position of the first.
META_SEQ, META_NUM_Q, META_FIRST_POS = 0, 1, 2


class UnsupportedConfig(ValueError):
  """The kernel cannot run this (head_dim, block_size, dtype, group) combination."""


@dataclasses.dataclass(frozen=True)
class Tiling:
  """keys_per_step: keys per flash step (a multiple of 64 and of the block size);
  num_buffers: K/V SMEM stages (2: the next step's pages load while this one computes)."""
  keys_per_step: int
  num_buffers: int


def smem_bytes(head_dim: int, dtype, tiling: Tiling) -> int:
  """Shared memory of one CTA: Q (reused for the output), K and V stages, P."""
  itemsize = jnp.dtype(dtype).itemsize
  t = tiling.keys_per_step
  return itemsize * (ROWS * head_dim + 2 * tiling.num_buffers * t * head_dim + ROWS * t)


def check_supported(head_dim: int, block_size: int, dtype, group: int) -> None:
  """Raises UnsupportedConfig naming the field the kernel does not support."""
  name = jnp.dtype(dtype).name
  if name not in SUPPORTED_DTYPES:
    raise UnsupportedConfig(f"dtype {name} is not supported by the Mosaic GPU attention kernel "
                            f"(supported: {', '.join(SUPPORTED_DTYPES)})")
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise UnsupportedConfig(f"head_dim {head_dim} is not supported by the Mosaic GPU attention "
                            f"kernel (supported: {SUPPORTED_HEAD_DIMS})")
  if block_size not in SUPPORTED_BLOCK_SIZES:
    raise UnsupportedConfig(f"block_size {block_size} is not supported by the Mosaic GPU "
                            f"attention kernel (supported: {SUPPORTED_BLOCK_SIZES})")
  if not 1 <= group <= MAX_GROUP:
    raise UnsupportedConfig(f"GQA group (num_heads // num_kv_heads) {group} is not in "
                            f"[1, {MAX_GROUP}]")


def choose_tiling(head_dim: int, block_size: int, dtype, group: int = 1) -> Tiling:
  """The tiling the engine uses: double-buffered when it fits the SMEM budget, else single."""
  check_supported(head_dim, block_size, dtype, group)
  keys = max(64, block_size)
  for num_buffers in (2, 1):
    tiling = Tiling(keys, num_buffers)
    if smem_bytes(head_dim, dtype, tiling) <= SMEM_BUDGET:
      return tiling
  raise UnsupportedConfig(f"head_dim {head_dim} with block_size {block_size} in "
                          f"{jnp.dtype(dtype).name} needs more than {SMEM_BUDGET} bytes of SMEM")


def padded_group(group: int) -> int:
  """The GQA group padded to a power of two (rows of one query token in a tile)."""
  return 1 << max(0, (group - 1).bit_length())


def _transforms(minor_elems: int, dtype):
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  gp: int  # padded GQA group
  block_size: int
  keys: int  # keys per step
  num_buffers: int
  max_steps: int
  sliding_window: int | None
  logits_soft_cap: float | None
  dtype: jnp.dtype
  head_dim: int

  @property
  def chunk(self) -> int:
    """Output columns per accumulator: head_dim 256 keeps two [64, 128] f32 accumulators, so
    one P @ V result is 64, not 128, registers a thread (else ptxas spills)."""
    return min(self.head_dim, 128)


def _key_range(st: _Static, meta_gmem, sl_gmem, w):
  """Keys the item may see, [kv_lo, kv_hi), and its flash steps [step_lo, step_hi)."""
  seq = meta_gmem[w, META_SEQ]
  num_q = meta_gmem[w, META_NUM_Q]
  first_pos = meta_gmem[w, META_FIRST_POS]
  kv_hi = jnp.where(num_q > 0, jnp.minimum(sl_gmem[seq], first_pos + num_q), 0)
  kv_lo = jnp.int32(0)
  if st.sliding_window is not None:
    kv_lo = jnp.maximum(first_pos - (st.sliding_window - 1), 0)
  step_lo = lax.div(kv_lo, st.keys)
  step_hi = jnp.minimum(lax.div(kv_hi + (st.keys - 1), st.keys), st.max_steps)
  return seq, num_q, first_pos, kv_lo, kv_hi, step_lo, step_hi


def _scores(st: _Static, qk, step, first_pos, num_q):
  """Scaled, capped, masked f32 scores [ROWS, keys] of one step (masked = -inf)."""
  qk = qk * st.scale
  if st.logits_soft_cap is not None:
    qk = st.logits_soft_cap * jnp.tanh(qk * (1.0 / st.logits_soft_cap))
  shape, wg = (ROWS, st.keys), plgpu.Layout.WGMMA
  key = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wg) + step * st.keys
  tok = lax.div(plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wg), st.gp)
  q_pos = tok + first_pos
  ok = (key <= q_pos) & (tok < num_q)
  if st.sliding_window is not None:
    ok = ok & (q_pos - key < st.sliding_window)
  return jnp.where(ok, qk, -jnp.inf)


def _zero_v_outside(st: _Static, v_ref, step, kv_lo, kv_hi):
  """Zeroes V rows whose keys lie outside [kv_lo, kv_hi) (only on steps that straddle it)."""
  @pl.when((step * st.keys < kv_lo) | ((step + 1) * st.keys > kv_hi))
  def _():
    shape = (st.keys, st.head_dim)
    key = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + step * st.keys
    v = v_ref[...]
    v_ref[...] = jnp.where((key >= kv_lo) & (key < kv_hi), v, jnp.zeros_like(v))
    plgpu.commit_smem()


def _body(st: _Static, meta_gmem, sl_gmem, bt_gmem, q_gmem, k_gmem, v_gmem, o_gmem,
          q_smem, k_smem, v_smem, p_smem, q_bar, k_bar, v_bar):
  """One CTA: q_gmem [W, Hkv, ROWS, D]; k/v_gmem [Hkv, num_blocks, bs, D]; o_gmem like q."""
  w, h = lax.axis_index("w"), lax.axis_index("h")
  seq, num_q, first_pos, kv_lo, kv_hi, step_lo, step_hi = _key_range(st, meta_gmem, sl_gmem, w)
  ppb = st.keys // st.block_size  # pages per step

  def issue(step, slot):  # ppb page copies arrive on each barrier (its arrival count)
    for j in range(ppb):
      block = bt_gmem[seq, step * ppb + j]
      rows = pl.ds(j * st.block_size, st.block_size)
      plgpu.copy_gmem_to_smem(k_gmem.at[h, block], k_smem.at[slot, rows], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_gmem.at[h, block], v_smem.at[slot, rows], v_bar.at[slot])

  plgpu.copy_gmem_to_smem(q_gmem.at[w, h], q_smem, q_bar.at[0])
  if st.num_buffers > 1:
    @pl.when(step_lo < step_hi)
    def _():
      issue(step_lo, 0)
  plgpu.barrier_wait(q_bar.at[0])

  def step_fn(i, carry):
    acc, m_i, l_i = carry
    if st.num_buffers > 1:
      slot = lax.rem(i - step_lo, st.num_buffers)

      @pl.when(i + 1 < step_hi)
      def _():
        issue(i + 1, 1 - slot)
    else:
      slot = 0
      issue(i, 0)
    plgpu.barrier_wait(k_bar.at[slot])

    def qk_scope(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]
    qk = pl.run_scoped(qk_scope, plgpu.ACC((ROWS, st.keys), jnp.float32))
    qk = _scores(st, qk, i, first_pos, num_q)
    m_new = jnp.maximum(m_i, qk.max(axis=1))
    alpha = jnp.exp(m_i - m_new)
    p = jnp.exp(qk - lax.broadcast_in_dim(m_new, qk.shape, [0]))
    l_new = l_i * alpha + p.sum(axis=1)
    p_smem[...] = p.astype(st.dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bar.at[slot])
    _zero_v_outside(st, v_smem.at[slot], i, kv_lo, kv_hi)

    new_acc = []
    for j, acc_j in enumerate(acc):  # one column chunk at a time: its P @ V result dies at once
      def pv_scope(acc_ref, j=j):
        plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot, :, pl.ds(j * st.chunk, st.chunk)])
        return acc_ref[...]
      pv = pl.run_scoped(pv_scope, plgpu.ACC((ROWS, st.chunk), jnp.float32))
      new_acc.append(acc_j * lax.broadcast_in_dim(alpha, acc_j.shape, [0]) + pv)
    return tuple(new_acc), m_new, l_new

  wg, red = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
  zeros = plgpu.layout_cast(jnp.full((ROWS, st.chunk), 0.0, jnp.float32), wg)
  init = ((zeros,) * (st.head_dim // st.chunk),
          plgpu.layout_cast(jnp.full((ROWS,), -1e30, jnp.float32), red),  # finite: no inf - inf
          plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), red))
  acc, _, l_i = lax.fori_loop(step_lo, step_hi, step_fn, init)
  l_i = jnp.where(l_i > 0.0, l_i, 1.0)  # rows without keys: acc is 0 -> output 0
  for j, acc_j in enumerate(acc):
    out = acc_j / lax.broadcast_in_dim(l_i, acc_j.shape, [0])
    q_smem[:, pl.ds(j * st.chunk, st.chunk)] = out.astype(st.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_gmem.at[w, h])
  plgpu.wait_smem_to_gmem(0)


def flash_call(q_items, meta, k_pages, v_pages, block_tables, seq_lens, *, group, scale,
               sliding_window, logits_soft_cap, tiling: Tiling | None = None, interpret=None):
  """Runs the kernel over all work items.

  q_items [W, Hkv, ROWS, D] (rows = token * gp + head in group); meta int32 [W, 3];
  k_pages, v_pages [Hkv, num_blocks, bs, D]; block_tables int32 [S, max_blocks];
  seq_lens int32 [S]. Returns [W, Hkv, ROWS, D] in q's dtype. `tiling` None: choose_tiling.
  `interpret`: a `plgpu.InterpretGPUParams` to run in the Mosaic GPU interpreter (CPU).
  """
  num_items, num_kv_heads, rows, head_dim = q_items.shape
  block_size = k_pages.shape[2]
  dtype = q_items.dtype
  if rows != ROWS:
    raise ValueError(f"q_items must have {ROWS} rows per tile, got {rows}")
  tiling = tiling or choose_tiling(head_dim, block_size, dtype, group)
  keys, nbuf = tiling.keys_per_step, tiling.num_buffers
  ppb = keys // block_size
  max_blocks = -(-block_tables.shape[1] // ppb) * ppb
  block_tables = jnp.pad(block_tables, ((0, 0), (0, max_blocks - block_tables.shape[1])))
  st = _Static(scale=float(scale), gp=padded_group(group), block_size=block_size, keys=keys,
               num_buffers=nbuf, max_steps=max_blocks // ppb, sliding_window=sliding_window,
               logits_soft_cap=logits_soft_cap, dtype=jnp.dtype(dtype), head_dim=head_dim)
  tr_d, tr_t = _transforms(head_dim, dtype), _transforms(keys, dtype)
  kernel = plgpu.kernel(
      lambda *refs: _body(st, *refs),
      out_type=jax.ShapeDtypeStruct(q_items.shape, dtype),
      scratch_types=[
          plgpu.SMEM((ROWS, head_dim), dtype, transforms=tr_d),  # q, then the output
          plgpu.SMEM((nbuf, keys, head_dim), dtype, transforms=tr_d),  # k stages
          plgpu.SMEM((nbuf, keys, head_dim), dtype, transforms=tr_d),  # v stages
          plgpu.SMEM((ROWS, keys), dtype, transforms=tr_t),  # p
          plgpu.Barrier(num_barriers=1),
          plgpu.Barrier(num_arrivals=ppb, num_barriers=nbuf),
          plgpu.Barrier(num_arrivals=ppb, num_barriers=nbuf),
      ],
      grid=(num_items, num_kv_heads), grid_names=("w", "h"), interpret=interpret,
  )
  return kernel(meta, seq_lens, block_tables, q_items, k_pages, v_pages)

