"""Start-up time of `jaxserve demo` (or an engine with serve's defaults): cold (empty persistent
compilation cache, C++ CPU kernels compiled anew) then warm (the same caches again), each in a
fresh process.

    python benchmarks/startup.py --repeats 3                       # the demo
    python benchmarks/startup.py --model DIR --serve-defaults      # serve's limits, one prompt

Per run it prints one JSON line: wall seconds of the whole process, its CPU seconds (user + sys:
on a shared machine the steadier figure), the engine start-up the CLI reports (`startup_s`), and
the executables start-up made (compiled vs loaded from the persistent cache, from the log).
Then medians per phase and the warm/cold ratio. The load average is printed with each run: wall
times on a loaded machine are not start-up times on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

READY = re.compile(
    r"(\d+) executables ready in ([\d.]+)s \(([^;]*); (\d+) threads\): (\d+) compiled, "
    r"(\d+) from the persistent compilation cache"
)


KERNEL_CACHE = os.path.expanduser("~/.cache/jaxserve/cpu_kernels")  # cpu_kernels/build.py


def _command(args, cache_dir: str) -> list[str]:
    base = [sys.executable, "-m", "jaxserve.cli", "--log-level", "INFO"]
    cache = ["--compilation-cache-dir", cache_dir]
    if args.model is None:
        return base + ["demo", "--max-tokens", "32"] + cache + args.extra
    flags = ["--enable-prompt-logprobs"] if args.serve_defaults else []
    gen = ["generate", args.model, "Hello", "--max-tokens", "8"]
    return base + gen + flags + cache + args.extra


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(args, cache_dir: str, phase: str, repeat: int) -> dict:
    cmd = _command(args, cache_dir)
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    m = READY.search(proc.stderr)
    row = {
        "phase": phase, "repeat": repeat, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "startup_s": stats["startup_s"], "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if m:
        row.update(executables=int(m[1]), warmup_s=float(m[2]), kinds=m[3], threads=int(m[4]),
                   compiled=int(m[5]), from_cache=int(m[6]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the demo)")
    ap.add_argument("--serve-defaults", action="store_true",
                    help="with --model: serve's engine defaults (prompt logprobs on)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("extra", nargs="*", help="more engine flags, after --")
    args = ap.parse_args()
    if args.model is None:  # written once here, so that no run counts writing it
        from jaxserve.demo import ensure_demo_model

        ensure_demo_model()
    rows = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            for phase in ("cold", "warm"):
                if phase == "cold":  # the C++ CPU kernels are compiled again too
                    shutil.rmtree(KERNEL_CACHE, ignore_errors=True)
                rows.append(run_once(args, cache_dir, phase, r))
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for phase in ("cold", "warm"):
        sel = [x for x in rows if x["phase"] == phase]
        summary[phase] = {k: statistics.median(x[k] for x in sel)
                          for k in ("wall_s", "cpu_s", "startup_s", "load_avg_1m")}
        summary[phase].update({k: sel[0][k] for k in ("executables", "compiled", "from_cache",
                                                      "kinds", "threads") if k in sel[0]})
    summary["warm_over_cold_wall"] = round(summary["warm"]["wall_s"] / summary["cold"]["wall_s"], 3)
    result = {"benchmark": "startup", "command": " ".join(_command(args, "<fresh dir>")),
              "cpu_count": os.cpu_count(), "summary": summary, "runs": rows}
    print(f"{'phase':6s} {'wall_s':>8s} {'cpu_s':>8s} {'startup_s':>10s} {'load':>6s}  executables")
    for phase in ("cold", "warm"):
        s = summary[phase]
        print(f"{phase:6s} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s['startup_s']:10.1f} "
              f"{s['load_avg_1m']:6.1f}  {s.get('executables')} ({s.get('kinds')}): "
              f"{s.get('compiled')} compiled, {s.get('from_cache')} from cache")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
