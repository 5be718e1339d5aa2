"""Shared by every engine runner (stdlib only: it runs in the jaxserve venv and in vLLM's).

A runner is started as `python run_<engine>.py SPEC OUT`: SPEC is the JSON written by
compare.py (checkpoint, dtype, engine options, workloads with their token-id prompts), OUT is
where the runner writes its measured rows as JSON. Engine logs go to stdout/stderr.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

# generate(requests, temperature) -> number of output tokens produced per request
GenerateFn = Callable[[list[dict], float], list[int]]


def load_spec() -> tuple[dict, str]:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SPEC.json OUT.json")
    with open(sys.argv[1]) as f:
        return json.load(f), sys.argv[2]


def _timed(generate: GenerateFn, requests: list[dict], temperature: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    counts = generate(requests, temperature)
    elapsed = time.perf_counter() - t0
    expected = [r["max_tokens"] for r in requests]
    if list(counts) != expected:
        raise RuntimeError(f"engine produced {list(counts)[:8]}... output tokens, "
                           f"asked for {expected[:8]}... (ignore_eos should force them)")
    return elapsed, sum(counts)


def run_workload(generate: GenerateFn, workload: dict) -> dict:
    """Time every repeat of one workload (fresh prompts each repeat); medians of the repeats."""
    temp = workload["temperature"]
    t0 = time.perf_counter()
    generate(workload["warmup"], temp)
    warmup_s = time.perf_counter() - t0
    runs = [_timed(generate, reqs, temp) for reqs in workload["repeats"]]
    elapsed = statistics.median(r[0] for r in runs)
    first = workload["repeats"][0]
    out_toks = sum(r["max_tokens"] for r in first)
    in_toks = sum(len(r["prompt_token_ids"]) for r in first)
    row = {
        "workload": workload["name"], "num_prompts": len(first),
        "num_prompt_tokens": in_toks, "num_output_tokens": out_toks,
        "temperature": temp, "repeats": len(runs), "warmup_s": round(warmup_s, 3),
        "elapsed_s": round(elapsed, 4), "elapsed_s_all": [round(r[0], 4) for r in runs],
        "requests_per_s": round(len(first) / elapsed, 3),
        "output_tokens_per_s": round(out_toks / elapsed, 2),
        "total_tokens_per_s": round((in_toks + out_toks) / elapsed, 2),
    }
    probes = workload.get("prefill_probe")
    if probes:  # decode: the same prompt length with max_tokens=1 times prefill + 1st token
        ttft = statistics.median(_timed(generate, reqs, temp)[0] for reqs in probes)
        decode_steps = out_toks - len(first)
        row["ttft_s"] = round(ttft, 4)
        row["decode_ms_per_token"] = round(1e3 * (elapsed - ttft) / decode_steps, 3)
        row["ms_per_output_token"] = round(1e3 * elapsed / out_toks, 3)
    return row


def run_all(engine: str, generate: GenerateFn, spec: dict, out_path: str, info: dict) -> None:
    """Warm up, run every workload, write {"engine", "info", "rows"} to out_path."""
    t0 = time.perf_counter()
    generate(spec["warmup"], spec["workloads"][0]["temperature"])
    info = {**info, "warmup_s": round(time.perf_counter() - t0, 2)}
    rows = []
    for workload in spec["workloads"]:
        row = run_workload(generate, workload)
        print(f"[{engine}] {json.dumps(row)}", flush=True)
        rows.append(row)
    with open(out_path, "w") as f:
        json.dump({"engine": engine, "info": info, "rows": rows}, f, indent=1)


def kv_block_count(spec: dict, block_size: int, dtype_bytes: int) -> int:
    """KV blocks that fit in the KV-cache budget (GiB) every engine is given."""
    m = spec["model"]
    per_block = 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * m["head_dim"]
    per_block *= block_size * dtype_bytes
    return int(spec["engine"]["kv_cache_gib"] * (1 << 30)) // per_block


def thread_env_summary() -> dict:
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS", "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    return {k: os.environ[k] for k in keys if k in os.environ}
