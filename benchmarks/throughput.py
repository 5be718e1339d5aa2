"""Offline throughput benchmark after vLLM's `benchmark_throughput`: jaxserve vs HF static batching.

Random-token prompts, temperature 1.0, fixed output lengths (ignore_eos). One JSON line per
backend, then a table with jaxserve/HF ratios. Start-up (model load, compiles) is timed apart.

  python benchmarks/throughput.py --model random-20m --dataset rand-var --num-prompts 64 \\
      --min-input-len 32 --input-len 512 --min-output-len 16 --output-len 256 --compare hf

`random` uses --input-len / --output-len for every prompt; `rand-var` draws each prompt's
lengths uniformly from [--min-input-len, --input-len] and [--min-output-len, --output-len]
(vLLM's rand-var is 32..1024 / 16..512; scale down on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput_probe import EngineProbe  # noqa: E402

FIRST_TOKEN_ID = 10  # random prompts stay clear of the low special-token ids
RANDOM_20M = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


@dataclass
class Request:
    prompt: list[int]
    output_len: int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo",
                   help="a checkpoint path, 'demo' (the demo model) or 'random-20m' "
                        "(a ~20M-parameter random Llama written to the local cache)")
    p.add_argument("--dataset", choices=("random", "rand-var"), default="random")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--min-input-len", type=int, default=32, help="rand-var only")
    p.add_argument("--min-output-len", type=int, default=16, help="rand-var only")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--backend", choices=("jaxserve", "hf"), default="jaxserve")
    p.add_argument("--compare", choices=("hf",), default=None,
                   help="also run HF transformers static batching in this invocation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: the longest prompt + output, rounded up to a block")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--hf-max-batch-size", type=int, default=16)
    p.add_argument("--compilation-cache-dir", default=None,
                   help="JAX persistent compile cache (default: jaxserve's, under ~/.cache)")
    p.add_argument("--output-json", default=None, help="also write every row to this file")
    return p.parse_args(argv)


def resolve_model(name: str) -> str:
    from jaxserve.demo import DEFAULT_CACHE, DemoShape, ensure_demo_model, write_random_llama

    if name == "demo":
        return ensure_demo_model()
    if name == "random-20m":
        out = os.path.join(DEFAULT_CACHE, "bench-llama-20m")
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            write_random_llama(out, DemoShape(**RANDOM_20M))
        return out
    return name


def make_requests(args, vocab_size: int) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    if args.dataset == "random":
        in_lens = np.full(args.num_prompts, args.input_len)
        out_lens = np.full(args.num_prompts, args.output_len)
    else:
        in_lens = rng.integers(args.min_input_len, args.input_len + 1, args.num_prompts)
        out_lens = rng.integers(args.min_output_len, args.output_len + 1, args.num_prompts)
    return [Request(rng.integers(FIRST_TOKEN_ID, vocab_size, int(i)).tolist(), int(o))
            for i, o in zip(in_lens, out_lens)]


def workload_name(args) -> str:
    if args.dataset == "random":
        return f"rand-{args.input_len}-{args.output_len}"
    return (f"rand-var[{args.min_input_len}..{args.input_len}]"
            f"x[{args.min_output_len}..{args.output_len}]")


def _rates(requests: list[Request], elapsed: float, output_tokens: int, n: int) -> dict:
    prompt_tokens = sum(len(r.prompt) for r in requests)
    return {
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(requests) / elapsed, 3),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 1),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "num_prompt_tokens": prompt_tokens,
        "num_output_tokens": output_tokens,
        "expected_output_tokens": n * sum(r.output_len for r in requests),
    }


def run_jaxserve(args, path: str, requests: list[Request]) -> dict:
    import jax

    from jaxserve.engine import SamplingParams
    from jaxserve.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              seed=args.seed, show_progress=False,
              **({"compilation_cache_dir": args.compilation_cache_dir}
                 if args.compilation_cache_dir else {}))
    startup = time.perf_counter() - t0
    probe = EngineProbe(llm.engine)
    prompts = [{"prompt_token_ids": r.prompt} for r in requests]
    params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True,
                             max_tokens=r.output_len) for r in requests]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0 - probe.overhead_s
    output_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    stats = llm.stats()
    dev = jax.devices()[0]
    return {
        "backend": "jaxserve", "device": f"{dev.platform}:{dev.device_kind}",
        "startup_s": round(startup, 1),
        **_rates(requests, elapsed, output_tokens, args.n),
        "peak_kv_usage": round(probe.kv.peak_blocks / stats.kv_blocks_total, 4),
        "peak_kv_blocks": probe.kv.peak_blocks, "kv_blocks_total": stats.kv_blocks_total,
        "kv_waste_pct": round(probe.kv.waste_pct, 2),
        "num_preemptions": stats.num_preemptions, "num_steps": probe.steps,
        "runner_s": round(probe.runner_s, 3),
        "engine_overhead_s": round(elapsed - probe.runner_s, 3),
        "runner_steps_s": {k: {"steps": n, "seconds": round(t, 3)}
                           for k, (n, t) in probe.by_kind.items()},
        "num_params": int(sum(x.size for x in jax.tree.leaves(llm.engine.runner.state))),
        "engine_args": {k: getattr(llm.engine_args, k) for k in (
            "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching")}
        | {"max_model_len": llm.engine.config.max_model_len,
           "num_kv_blocks": llm.engine.config.num_kv_blocks},
    }


def hf_batches(requests: list[Request], max_batch: int) -> list[list[int]]:
    """Indices sorted by prompt length, cut into batches of up to max_batch."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    return [order[i:i + max_batch] for i in range(0, len(order), max_batch)]


def hf_kv_usage(requests: list[Request], batches: list[list[int]], n: int) -> tuple[float, int]:
    """(waste %, peak slots) of HF's padded per-batch cache, summed over its steps like ours:
    at step t a batch holds rows x (max prompt + t) slots; a row fills its prompt plus the
    tokens it asked for (padding and tokens past its output length are waste)."""
    allocated = filled = peak = 0
    for batch in batches:
        p = np.array([len(requests[i].prompt) for i in batch])
        o = np.array([requests[i].output_len for i in batch])
        width, steps = int(p.max()), int(o.max())
        for t in range(steps):
            allocated += n * len(batch) * (width + t)
            filled += n * int(np.sum(p + np.minimum(t, o)))
        peak = max(peak, n * len(batch) * (width + steps))
    return 100.0 * (1.0 - filled / allocated), peak


def _eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def count_generated(rows: list[list[int]], output_lens: list[int], eos_ids: set[int]) -> int:
    """Tokens HF actually generated for its requests: per row (one per request and sample, in
    order), the new tokens up to and including the first EOS (after it come pads), at most the
    request's own output length (a shorter row in a batch keeps going; that is waste)."""
    assert len(rows) == len(output_lens), (len(rows), len(output_lens))
    total = 0
    for row, want in zip(rows, output_lens):
        ended = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        total += min(ended, want)
    return total


def run_hf(args, path: str, requests: list[Request]) -> dict:
    import torch
    import transformers

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    startup = time.perf_counter() - t0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batches = hf_batches(requests, args.hf_max_batch_size)
    output_tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            width = max(len(requests[i].prompt) for i in batch)
            new = max(requests[i].output_len for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):  # left padding, as decoder-only generate wants
                prompt = requests[i].prompt
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                 min_new_tokens=new, num_return_sequences=args.n,
                                 pad_token_id=pad)
            lens = [requests[i].output_len for i in batch for _ in range(args.n)]
            output_tokens += count_generated(out[:, width:].tolist(), lens,
                                             _eos_ids(model.generation_config))
    elapsed = time.perf_counter() - t0
    waste, peak_slots = hf_kv_usage(requests, batches, args.n)
    return {
        "backend": "hf", "device": "cpu:torch-" + torch.__version__,
        "startup_s": round(startup, 1),
        **_rates(requests, elapsed, output_tokens, args.n),
        "peak_kv_tokens": peak_slots, "kv_waste_pct": round(waste, 2),
        "hf_max_batch_size": args.hf_max_batch_size, "num_batches": len(batches),
        "transformers_version": transformers.__version__,
    }


def print_table(rows: list[dict]) -> None:
    cols = ("backend", "requests_per_s", "total_tokens_per_s", "output_tokens_per_s",
            "kv_waste_pct", "startup_s", "elapsed_s")
    print(" | ".join(f"{c:>20}" for c in cols))
    for row in rows:
        print(" | ".join(f"{str(row.get(c, '-')):>20}" for c in cols))
    by = {r["backend"]: r for r in rows}
    if "jaxserve" in by and "hf" in by:
        ratios = {c: by["jaxserve"][c] / by["hf"][c]
                  for c in ("requests_per_s", "total_tokens_per_s", "output_tokens_per_s")}
        print("jaxserve / hf: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


def main(argv=None) -> list[dict]:
    import jax

    args = parse_args(argv)
    path = resolve_model(args.model)
    from transformers import AutoConfig

    requests = make_requests(args, AutoConfig.from_pretrained(path).vocab_size)
    if args.max_model_len is None:
        longest = max(len(r.prompt) + r.output_len for r in requests)
        args.max_model_len = -(-longest // args.block_size) * args.block_size
    backends = [args.backend] + ([args.compare] if args.compare and args.compare != args.backend
                                 else [])
    common = {"workload": workload_name(args), "dataset": args.dataset,
              "num_prompts": args.num_prompts, "n": args.n, "model": args.model,
              "jax_version": jax.__version__, "seed": args.seed}
    rows = []
    for backend in backends:
        run = run_jaxserve if backend == "jaxserve" else run_hf
        row = {**common, **run(args, path, requests)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print_table(rows)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
