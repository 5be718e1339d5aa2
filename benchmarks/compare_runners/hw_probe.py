"""Machine probes for compare.py: memory bandwidth (membw.c, OpenMP) and matmul peaks.

  python hw_probe.py bandwidth THREADS [MIB] -> {"read_gbs_best", "copy_gbs_best", ...}
  python hw_probe.py matmul THREADS      -> jax and torch GFLOP/s, bf16 and f32
Each prints one JSON line. membw.c is compiled with gcc -O3 -march=native -ffast-math -fopenmp into a
cache directory on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def membw_binary() -> str:
    src = os.path.join(HERE, "membw.c")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = os.path.join(tempfile.gettempdir(), f"jaxserve-membw-{digest}")
    if not os.path.isfile(out):
        cmd = ["gcc", "-O3", "-march=native", "-ffast-math", "-fopenmp", src, "-o", out + ".tmp"]
        subprocess.run(cmd, check=True)
        os.replace(out + ".tmp", out)
    return out


def bandwidth(threads: int, mib: int = 512, repeats: int = 7) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="spread")
    out = subprocess.run([membw_binary(), str(mib), str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    row = json.loads(out)
    row.pop("checksum", None)
    return {**row, "method": "membw.c (gcc -O3 -march=native -ffast-math -fopenmp)",
            "loadavg": list(os.getloadavg())}


def _best_gflops(fn, flops: float, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(flops / best / 1e9, 1)


def matmul(threads: int, n: int = 2048) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    flops = 2.0 * n ** 3
    out = {"n": n, "threads": threads, "jax_version": jax.__version__,
           "torch_version": torch.__version__}
    key = jax.random.PRNGKey(0)
    for name, jdt, tdt in (("bf16", jnp.bfloat16, torch.bfloat16),
                           ("f32", jnp.float32, torch.float32)):
        a = jax.random.normal(key, (n, n), jdt)
        b = jax.random.normal(key, (n, n), jdt)
        dot = jax.jit(jnp.dot)
        out[f"jax_{name}_gflops"] = _best_gflops(lambda: dot(a, b).block_until_ready(), flops)
        ta, tb = torch.randn(n, n, dtype=tdt), torch.randn(n, n, dtype=tdt)
        out[f"torch_{name}_gflops"] = _best_gflops(lambda: torch.mm(ta, tb), flops)
    return out


if __name__ == "__main__":
    what, nthreads = sys.argv[1], int(sys.argv[2])
    if what == "bandwidth":
        print(json.dumps(bandwidth(nthreads, *(int(a) for a in sys.argv[3:4]))))
    else:
        print(json.dumps(matmul(nthreads)))
