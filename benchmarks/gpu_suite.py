"""GPU suite: the engine's real GPU attention path on the chip, correctness first, then speed.

  python benchmarks/gpu_suite.py [--model PATH] [--tp N]   # on a Hopper GPU machine

Refuses to run without a GPU ("no GPU", exit status 1): the CPU interpreter's figures mean nothing.
Steps, stopping at the first failure:
  1. correctness on the chip: the Mosaic GPU ragged kernel (exactly what the engine's "pallas"
     backend calls, no interpreter) vs the plain-jnp reference, every head_dim x block size x
     dtype the engine accepts, NaN-poisoned unused pages, decode and mixed prefill batches, with
     and without sliding window / soft cap (catches async TMA/wgmma ordering bugs and driver
     faults the interpreter cannot see);
  2. kernel bandwidth: a decode batch's K/V bytes / kernel time, as a fraction of a device copy
     of the same bytes timed in the same process; the blockwise (XLA) path beside it;
  3. matmul peak: a bf16 [8192^2] matmul's TFLOP/s (the ceiling for prefill);
  4. end to end (with --model): the engine with attention_backend auto (must pick pallas) vs
     blockwise gives the same greedy tokens, and decode tokens/s vs the floor (weights + KV bytes
     per step / copy bandwidth).
Writes benchmarks/results/gpu_suite_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "pallas_kernels"))
RESULTS = ROOT / "benchmarks" / "results"


def require_gpu():
  """The Hopper GPU to measure, or exit 1 saying why (never measure the interpreter)."""
  import jax
  if jax.default_backend() != "gpu":
    sys.exit(f"gpu_suite: no GPU (jax platform {jax.default_backend()!r}); this suite measures "
             "the engine's GPU path and refuses to run on the CPU interpreter")
  device = jax.devices()[0]
  if not str(getattr(device, "compute_capability", "")).startswith("9."):
    sys.exit(f"gpu_suite: {device.device_kind} is not a Hopper GPU (sm_90a): the engine uses "
             "the blockwise path there, the Mosaic GPU kernels do not run")
  return device


def timed(fn, *args, reps=20):
  """Median seconds of fn(*args) (compiled, warmed up)."""
  import numpy as np
  fn(*args).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def check_correctness() -> list[dict]:
  """Step 1: kernel vs reference on the chip; raises AssertionError on the first mismatch."""
  import itertools
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pallas_kernels as pk
  from _paged_cases import make_case
  from pallas_kernels import _mgpu

  rows = []
  for d, bs, dt in itertools.product(_mgpu.SUPPORTED_HEAD_DIMS, _mgpu.SUPPORTED_BLOCK_SIZES,
                                     _mgpu.SUPPORTED_DTYPES):
    for q_lens, window, cap in (([1] * 6, None, None), ([1, 7, bs + 3, 1, 70, 0], 50, 30.0)):
      seq_lens = [1, bs + 9, 3 * bs, 200, 70 + bs, 0]
      case = make_case(seq_lens, q_lens, num_q_heads=14, num_kv_heads=2, head_dim=d,
                       block_size=bs, dtype=jnp.dtype(dt), num_tokens=sum(q_lens) + 5,
                       seed=d + bs)
      args = [jnp.asarray(x) for x in (case.q, case.k_pages, case.v_pages, case.block_tables,
                                       case.seq_lens, case.query_start_loc)]
      kw = dict(sliding_window=window, logits_soft_cap=cap)
      got = np.asarray(jax.jit(lambda *a: pk.ragged_paged_attention(*a, **kw))(*args), np.float32)
      want = np.asarray(pk.ragged_paged_attention_reference(*args, **kw), np.float32)
      err = float(np.nanmax(np.abs(got - want)))
      ok = not np.isnan(got).any() and err <= (3e-2 if dt == "bfloat16" else 5e-3)
      rows.append(dict(head_dim=d, block_size=bs, dtype=dt, window=window, cap=cap,
                       max_abs_err=err, ok=ok))
      assert ok, f"kernel != reference on the chip: {rows[-1]}"
  return rows


def kernel_bandwidth(batch=64, context=4096, heads=(32, 8), head_dim=128, block_size=16):
  """Step 2: decode attention's achieved HBM bandwidth vs a device copy (same bytes)."""
  import jax
  import jax.numpy as jnp
  import pallas_kernels as pk
  from jaxserve.layers.blockwise_attention import blockwise_paged_attention

  hq, hkv = heads
  per_seq = context // block_size
  key = jax.random.PRNGKey(0)
  pages = jax.random.normal(key, (hkv, batch * per_seq + 1, block_size, head_dim), jnp.bfloat16)
  q = jax.random.normal(key, (batch, hq, head_dim), jnp.bfloat16)
  bt = (1 + jnp.arange(batch * per_seq, dtype=jnp.int32)).reshape(batch, per_seq)
  sl = jnp.full((batch,), context, jnp.int32)
  qsl = jnp.arange(batch + 1, dtype=jnp.int32)
  kv_bytes = 2 * pages.size * pages.dtype.itemsize
  kernel = jax.jit(lambda q, k, v: pk.ragged_paged_attention(q, k, v, bt, sl, qsl))
  blockwise = jax.jit(lambda q, k, v: blockwise_paged_attention(q, k, v, bt, sl, qsl))
  copy = jax.jit(lambda k, v: (k + 0, v + 0)[0])  # reads and writes both: 2x the bytes
  t_copy = timed(copy, pages, pages)
  copy_bw = 2 * kv_bytes / t_copy
  out = dict(batch=batch, context=context, heads=heads, head_dim=head_dim, copy_gbps=copy_bw / 1e9)
  for name, fn in (("pallas", kernel), ("blockwise", blockwise)):
    t = timed(fn, q, pages, pages)
    out[name] = dict(ms=t * 1e3, gbps=kv_bytes / t / 1e9, fraction_of_copy=kv_bytes / t / copy_bw)
  return out


def matmul_peak(n=8192):
  """Step 3: bf16 matmul TFLOP/s and its fraction of the H100 SXM dense bf16 peak (989)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  t = timed(jax.jit(lambda a: a @ a), a)
  tflops = 2 * n ** 3 / t / 1e12
  return dict(n=n, tflops=tflops, fraction_of_989=tflops / 989)


def end_to_end(model: str, tp: int, copy_gbps: float) -> dict:
  """Step 4: the engine on the chip: auto picks pallas; same greedy tokens as blockwise;
  decode tokens/s vs the bandwidth floor (each step reads every weight once)."""
  import jax
  from jaxserve import LLM, SamplingParams
  from jaxserve.layers.attention import select_backend

  chosen = select_backend("auto", tp).backend  # what the engine picks on this chip
  assert chosen == "pallas", f"the engine picks {chosen!r}, not the Mosaic GPU kernels"
  params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
  prompts = [{"prompt_token_ids": list(range(100, 100 + 37 * (i + 1)))} for i in range(8)]
  out = dict(auto_backend=chosen)
  tokens = {}
  for backend in ("auto", "blockwise"):
    llm = LLM(model, attention_backend=backend, tensor_parallel_size=tp, max_model_len=2048)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm up
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens[backend] = [r.outputs[0].token_ids for r in res]
    out[backend] = dict(tokens_per_s=len(prompts) * params.max_tokens / dt)
    weight_bytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(llm.engine.runner.state))
    del llm
  floor_step_s = weight_bytes / tp / (copy_gbps * 1e9)  # (prefill time counts against us)
  out["floor_tokens_per_s"] = len(prompts) / floor_step_s
  out["fraction_of_floor"] = out["auto"]["tokens_per_s"] / out["floor_tokens_per_s"]
  out["same_tokens"] = tokens["auto"] == tokens["blockwise"]
  assert out["same_tokens"], "pallas and blockwise greedy tokens differ on the chip"
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", help="HF checkpoint for the end-to-end step")
  parser.add_argument("--tp", type=int, default=1)
  args = parser.parse_args(argv)
  device = require_gpu()
  report = dict(device=device.device_kind)
  report["correctness"] = check_correctness()
  print(f"correctness: {len(report['correctness'])} configs match the reference on the chip")
  report["bandwidth"] = kernel_bandwidth()
  report["matmul"] = matmul_peak()
  print(json.dumps(dict(bandwidth=report["bandwidth"], matmul=report["matmul"]), indent=1))
  if args.model:
    report["end_to_end"] = end_to_end(args.model, args.tp, report["bandwidth"]["copy_gbps"])
    print(json.dumps(report["end_to_end"], indent=1))
  RESULTS.mkdir(exist_ok=True)
  out = RESULTS / f"gpu_suite_{device.device_kind.replace(' ', '_')}.json"
  out.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
