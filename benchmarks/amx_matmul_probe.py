"""AMX matmul probe: the AMX tile kernel against XLA's bf16 matmul (and the matvec kernel for few
rows) on the small model's projection shapes, in the same process.

Each timed call runs all 12 layers' worth of one projection (distinct weights, so they stream
from memory as in a decode step); the variants alternate and the best of --repeats is kept.
Prints one JSON object; ratios are XLA time over kernel time (> 1: the kernel is faster).

  PYTHONPATH=. python benchmarks/amx_matmul_probe.py --rows 1 4 8 16 32 64 128 512
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cpu_kernels import amx_matmul, dpbf16_matmul, matvec

# (name, out, in) of the small model's projections (Qwen2.5-0.5B widths)
SHAPES = (("q", 896, 896), ("kv", 128, 896), ("gate/up", 4864, 896), ("down", 896, 4864),
          ("lm_head", 32000, 896))
LAYERS = 12


def _best(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def probe(rows: list[int], repeats: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for name, n, k in SHAPES:
        copies = 1 if name == "lm_head" else LAYERS
        ws = [jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16) for _ in range(copies)]
        variants = {"xla": lambda x, w: jnp.einsum("tk,nk->tn", x, w),
                    "amx": amx_matmul.amx_matmul, "dpbf16": dpbf16_matmul.dpbf16_matmul,
                    "matvec": matvec.matvec}
        calls = {v: jax.jit(lambda x, ws, f=f: [f(x, w) for w in ws]) for v, f in variants.items()}
        for t in rows:
            x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
            use = [v for v in calls if (v != "matvec" or t <= matvec.MAX_ROWS)
                   and (v != "amx" or amx_matmul.available())
                   and (v != "dpbf16" or dpbf16_matmul.available())]
            times = {v: float("inf") for v in use}
            for _ in range(repeats):  # alternate the variants, keep each one's best
                for v in use:
                    times[v] = min(times[v], _best(calls[v], (x, ws), 1))
            weight_gb = copies * n * k * 2 / 1e9
            row = {"shape": name, "out": n, "in": k, "rows": t, "weights_mb": weight_gb * 1e3,
                   **{f"{v}_ms": round(s * 1e3, 3) for v, s in times.items()},
                   **{f"{v}_GBps": round(weight_gb / s, 1) for v, s in times.items()},
                   **{f"xla_over_{v}": round(times["xla"] / s, 2) for v, s in times.items()
                      if v != "xla"}}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128, 512])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not amx_matmul.available():
        print("amx_matmul_probe: no AMX tiles on this CPU: XLA against the matvec kernel only",
              flush=True)
    rows = probe(args.rows, args.repeats)
    result = {"command": "benchmarks/amx_matmul_probe.py " + " ".join(
                  f"--rows {' '.join(map(str, args.rows))} --repeats {args.repeats}".split()),
              "loadavg_1_5_15": list(os.getloadavg()), "jax": jax.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
