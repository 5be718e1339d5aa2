"""Paged-attention kernel benchmark: decode HBM bandwidth and prefill TFLOP/s vs XLA baselines.

Decode (batch x context, GQA, bf16, block 16 and 64): achieved HBM bandwidth (K/V bytes read +
q/out bytes) as a fraction of a device-to-device copy measured in the same run. Prefill: the
ragged kernel's causal TFLOP/s as a fraction of a bf16 matmul measured in the same run. Each has
the reference (plain XLA) path beside it. One JSON line per config, then a table; the JSON goes
to benchmarks/results/kernels_<device>.json.

  python benchmarks/kernels.py            # GPU sizes (needs a GPU)
  python benchmarks/kernels.py --small    # tiny sizes in the Pallas CPU interpreter: a smoke
                                          # test only; its figures are not written to results/
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import pallas_kernels as pk  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Sizes:
  batch: int
  context: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  block_sizes: tuple[int, ...]
  prefill_seqs: int
  prefill_len: int
  matmul_dim: int
  iters: int


GPU = Sizes(batch=64, context=2048, num_q_heads=32, num_kv_heads=8, head_dim=128,
            block_sizes=(16, 64), prefill_seqs=4, prefill_len=2048, matmul_dim=8192, iters=20)
SMALL = Sizes(batch=2, context=48, num_q_heads=4, num_kv_heads=2, head_dim=64,
              block_sizes=(16,), prefill_seqs=1, prefill_len=32, matmul_dim=128, iters=1)


def time_fn(fn, *args, iters: int) -> float:
  """Median seconds per call of a jitted fn (after a compile/warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _cache(key, num_kv_heads, num_blocks, block_size, head_dim, dtype):
  k1, k2 = jax.random.split(key)
  shape = (num_kv_heads, num_blocks, block_size, head_dim)  # [Hkv, num_blocks, bs, D]
  return (jax.random.normal(k1, shape, dtype), jax.random.normal(k2, shape, dtype))


def _block_tables(key, num_seqs, blocks_per_seq, num_blocks):
  """Shuffled, disjoint pages per sequence; block 0 stays the null block."""
  perm = jax.random.permutation(key, jnp.arange(1, num_blocks, dtype=jnp.int32))
  return perm[:num_seqs * blocks_per_seq].reshape(num_seqs, blocks_per_seq)  # [S, mb]


def copy_bandwidth(nbytes: int, iters: int) -> float:
  """Bytes/s of a device-to-device copy (read + write) of an nbytes bf16 buffer."""
  x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
  return 2 * nbytes / time_fn(copy, x, iters=iters)


def bench_decode(sz: Sizes, block_size: int, interpret: bool) -> dict:
  dtype = jnp.bfloat16
  blocks_per_seq = sz.context // block_size
  num_blocks = sz.batch * blocks_per_seq + 1
  keys = jax.random.split(jax.random.key(block_size), 3)
  k_pages, v_pages = _cache(keys[0], sz.num_kv_heads, num_blocks, block_size, sz.head_dim, dtype)
  block_tables = _block_tables(keys[1], sz.batch, blocks_per_seq, num_blocks)
  seq_lens = jnp.full((sz.batch,), sz.context, jnp.int32)
  q = jax.random.normal(keys[2], (sz.batch, sz.num_q_heads, sz.head_dim), dtype)
  kernel = jax.jit(functools.partial(pk.paged_attention, interpret=interpret))
  reference = jax.jit(pk.paged_attention_reference)
  args = (q, k_pages, v_pages, block_tables, seq_lens)
  kv_bytes = 2 * sz.batch * sz.context * sz.num_kv_heads * sz.head_dim * 2
  nbytes = kv_bytes + 2 * q.size * 2 + block_tables.size * 4
  t_kernel = time_fn(kernel, *args, iters=sz.iters)
  t_ref = time_fn(reference, *args, iters=sz.iters)
  copy_bw = copy_bandwidth(kv_bytes, sz.iters)
  return dict(bench="decode", block_size=block_size, batch=sz.batch, context=sz.context,
              bytes=nbytes, kernel_s=t_kernel, reference_s=t_ref, copy_bytes_per_s=copy_bw,
              kernel_bw_fraction=nbytes / t_kernel / copy_bw,
              reference_bw_fraction=nbytes / t_ref / copy_bw)


def matmul_flops(dim: int, iters: int) -> float:
  """FLOP/s of a bf16 [dim, dim] @ [dim, dim] matmul (f32 accumulation)."""
  a = jnp.ones((dim, dim), jnp.bfloat16)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
  return 2 * dim ** 3 / time_fn(mm, a, a, iters=iters)


def bench_prefill(sz: Sizes, block_size: int, interpret: bool) -> dict:
  dtype = jnp.bfloat16
  blocks_per_seq = sz.prefill_len // block_size
  num_blocks = sz.prefill_seqs * blocks_per_seq + 1
  keys = jax.random.split(jax.random.key(7 + block_size), 3)
  k_pages, v_pages = _cache(keys[0], sz.num_kv_heads, num_blocks, block_size, sz.head_dim, dtype)
  block_tables = _block_tables(keys[1], sz.prefill_seqs, blocks_per_seq, num_blocks)
  seq_lens = jnp.full((sz.prefill_seqs,), sz.prefill_len, jnp.int32)
  qsl = jnp.arange(sz.prefill_seqs + 1, dtype=jnp.int32) * sz.prefill_len
  num_tokens = sz.prefill_seqs * sz.prefill_len
  q = jax.random.normal(keys[2], (num_tokens, sz.num_q_heads, sz.head_dim), dtype)
  kernel = jax.jit(functools.partial(pk.ragged_paged_attention, interpret=interpret))
  reference = jax.jit(functools.partial(pk.ragged_paged_attention_reference,
                                        max_query_len=sz.prefill_len))
  args = (q, k_pages, v_pages, block_tables, seq_lens, qsl)
  # causal: each query sees (position + 1) keys; QK^T and PV are 2 FLOPs per MAC each.
  visible = sz.prefill_len * (sz.prefill_len + 1) // 2
  flops = 4 * sz.prefill_seqs * visible * sz.num_q_heads * sz.head_dim
  t_kernel = time_fn(kernel, *args, iters=sz.iters)
  t_ref = time_fn(reference, *args, iters=sz.iters)
  mm = matmul_flops(sz.matmul_dim, sz.iters)
  return dict(bench="prefill", block_size=block_size, seqs=sz.prefill_seqs,
              length=sz.prefill_len, flops=flops, kernel_s=t_kernel, reference_s=t_ref,
              matmul_flops_per_s=mm, kernel_tflops=flops / t_kernel / 1e12,
              reference_tflops=flops / t_ref / 1e12, kernel_matmul_fraction=flops / t_kernel / mm,
              reference_matmul_fraction=flops / t_ref / mm)


def _table(rows: list[dict]) -> str:
  lines = [f"{'bench':8} {'block':>5} {'kernel ms':>10} {'ref ms':>10} {'kernel frac':>12} "
           f"{'ref frac':>9}  (decode: of copy BW; prefill: of bf16 matmul)"]
  for r in rows:
    frac = "bw_fraction" if r["bench"] == "decode" else "matmul_fraction"
    lines.append(f"{r['bench']:8} {r['block_size']:5d} {r['kernel_s'] * 1e3:10.3f} "
                 f"{r['reference_s'] * 1e3:10.3f} {r['kernel_' + frac]:12.3f} "
                 f"{r['reference_' + frac]:9.3f}")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny sizes in the CPU interpreter (smoke test, not a result)")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON output path")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  if not args.small and device.platform != "gpu":
    parser.error(f"full sizes need a GPU (found {device.platform}); use --small on CPU")
  sz = SMALL if args.small else GPU
  interpret = args.small
  rows = []
  for block_size in sz.block_sizes:
    for bench in (bench_decode, bench_prefill):
      row = bench(sz, block_size, interpret)
      row.update(device=device.device_kind, jax=jax.__version__, interpret=interpret,
                 small=args.small, kernel_lowering="pallas-triton (stepping stone)")
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(_table(rows))
  out = args.out
  if out is None:
    name = f"kernels_{device.device_kind.replace(' ', '_')}.json"
    out = pathlib.Path(tempfile.gettempdir()) / name if args.small else RESULTS / name
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=1) + "\n")
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
