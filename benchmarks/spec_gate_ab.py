"""Speculation gate A/B: the plain engine and each method with the gate off and on, timed in
turn on the same batch (round-robin repeats, so load drifts hit every engine alike).

  python benchmarks/spec_gate_ab.py --model random-20m --draft-model DIR --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.spec_decode import random_copy_prompts  # noqa: E402
from benchmarks.throughput import resolve_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random-20m")
    p.add_argument("--draft-model", default=None, help="adds draft_model (a checkpoint dir)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--disable-by-acceptance", type=float, default=0.1)
    p.add_argument("--disable-by-batch-size", type=int, default=None)
    p.add_argument("--head-len", type=int, default=16)
    p.add_argument("--phrase-len", type=int, default=24)
    p.add_argument("--repeats-in-prompt", type=int, default=5)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from jaxserve.engine import SamplingParams
    from jaxserve.llm import LLM

    args = parse_args(argv)
    path = resolve_model(args.model)
    common = dict(max_model_len=1024, max_num_seqs=args.batch, max_num_batched_tokens=512,
                  show_progress=False, seed=0, compilation_cache_dir=args.compilation_cache_dir)
    methods = {"ngram": {"method": "ngram", "num_speculative_tokens": args.k,
                         "prompt_lookup_max": 4, "prompt_lookup_min": 1}}
    if args.draft_model:
        methods["draft_model"] = {"method": "draft_model", "model": args.draft_model,
                                  "num_speculative_tokens": args.k}
    gates = {"off": {"disable_by_acceptance": 0.0},
             "on": {"disable_by_acceptance": args.disable_by_acceptance,
                    "disable_by_batch_size": args.disable_by_batch_size}}
    engines = {"plain": LLM(path, **common)}
    for m, cfg in methods.items():
        for g, keys in gates.items():
            engines[f"{m}/gate-{g}"] = LLM(path, speculative_config={**cfg, **keys}, **common)
    vocab = engines["plain"].engine.config.vocab_size
    prompts = random_copy_prompts(args.batch, vocab, args, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    outputs = {}
    for name, llm in engines.items():  # untimed pass
        outputs[name] = [o.outputs[0].token_ids
                         for o in llm.generate(prompts, params, use_tqdm=False)]
    tok_s: dict[str, list[float]] = {name: [] for name in engines}
    load = os.getloadavg()
    for _ in range(args.repeats):
        for name, llm in engines.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            tok_s[name].append(sum(len(o.outputs[0].token_ids) for o in outs)
                               / (time.perf_counter() - t0))
    base = statistics.median(tok_s["plain"])
    rows = {}
    for name, llm in engines.items():
        s = llm.stats().spec_decoding
        med = statistics.median(tok_s[name])
        rows[name] = {"tok_s": round(med, 1), "vs_plain": round(med / base, 3),
                      "greedy_equal": outputs[name] == outputs["plain"]}
        if s is not None:
            rows[name].update(acceptance_rate=round(s.acceptance_rate, 4),
                              gated_by_acceptance=s.num_gated_by_acceptance,
                              gated_by_batch_size=s.num_gated_by_batch_size)
        print(f"{name:<22} {med:8.1f} tok/s  x{med / base:.2f}  {rows[name]}", flush=True)
    result = {"batch": args.batch, "output_len": args.output_len, "repeats": args.repeats,
              "model": args.model, "loadavg_at_start": [round(x, 2) for x in load],
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "rows": rows,
              "command": "python benchmarks/spec_gate_ab.py " + " ".join(
                  sys.argv[1:] if argv is None else argv)}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
