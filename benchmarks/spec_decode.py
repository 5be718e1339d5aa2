"""Speculative decoding benchmark: n-gram speculation vs the same engine without it, same run.

Copy-heavy workload: each prompt is a random head then a random phrase repeated; greedy,
ignore_eos, fixed output length. Measures 1-request decode speed (each prompt alone) and a
batch of 8, as output tokens/s medians over repeats, the speed-up ratio, and the acceptance
rate / mean acceptance length from LLM.stats(). Also checks that the greedy outputs are equal.

  python benchmarks/spec_decode.py --model random-20m --k 4 --output-len 128 --repeats 3 \\
      --output-json benchmarks/results/cpu_spec_decode_ngram.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import FIRST_TOKEN_ID, resolve_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random-20m", help="demo | random-20m | a checkpoint dir")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=4, help="1-request runs, one per prompt")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--head-len", type=int, default=16)
    p.add_argument("--phrase-len", type=int, default=24)
    p.add_argument("--repeats-in-prompt", type=int, default=5)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def copy_heavy_prompts(n: int, vocab: int, args, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        head = rng.integers(FIRST_TOKEN_ID, vocab, args.head_len).tolist()
        phrase = rng.integers(FIRST_TOKEN_ID, vocab, args.phrase_len).tolist()
        out.append({"prompt_token_ids": head + phrase * args.repeats_in_prompt})
    return out


def timed(llm, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outs


def measure(llm, prompts, batch_prompts, params, repeats: int) -> dict:
    """Output tok/s medians: each prompt alone (b1) and the batch together (b8)."""
    from jaxserve.engine import SamplingParams  # noqa: F401

    b1, b8, outputs = [], [], None
    for _ in range(repeats):
        for p in prompts:
            t, outs = timed(llm, [p], params)
            b1.append(sum(len(c.token_ids) for o in outs for c in o.outputs) / t)
        t, outputs = timed(llm, batch_prompts, params)
        b8.append(sum(len(c.token_ids) for o in outputs for c in o.outputs) / t)
    return {"b1_tok_s": statistics.median(b1), "batch_tok_s": statistics.median(b8),
            "outputs": [o.outputs[0].token_ids for o in outputs]}


def main(argv=None) -> list[dict]:
    import jax

    from jaxserve.engine import SamplingParams
    from jaxserve.llm import LLM

    args = parse_args(argv)
    path = resolve_model(args.model)
    common = dict(dtype=args.dtype, max_model_len=1024, max_num_seqs=args.batch,
                  max_num_batched_tokens=512, show_progress=False, seed=0,
                  compilation_cache_dir=args.compilation_cache_dir)
    spec_cfg = {"method": "ngram", "num_speculative_tokens": args.k,
                "prompt_lookup_max": args.prompt_lookup_max,
                "prompt_lookup_min": args.prompt_lookup_min}
    plain = LLM(path, **common)
    spec = LLM(path, speculative_config=spec_cfg, **common)
    vocab = plain.engine.config.vocab_size
    prompts = copy_heavy_prompts(args.num_prompts, vocab, args)
    batch_prompts = copy_heavy_prompts(args.batch, vocab, args, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for llm in (plain, spec):  # one untimed pass each
        llm.generate(prompts[:1], params, use_tqdm=False)
    before = spec.stats().spec_decoding.copy()
    res_plain = measure(plain, prompts, batch_prompts, params, args.repeats)
    res_spec = measure(spec, prompts, batch_prompts, params, args.repeats)
    after = spec.stats().spec_decoding
    drafts = after.num_drafts - before.num_drafts
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    per_pos = [a - b for a, b in zip(after.num_accepted_tokens_per_pos,
                                     before.num_accepted_tokens_per_pos)]
    row = {
        "workload": f"copy-heavy-{args.head_len}+{args.phrase_len}x{args.repeats_in_prompt}"
                    f"-{args.output_len}-greedy",
        "model": args.model, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "speculative_config": spec_cfg,
        "b1_tok_s_plain": round(res_plain["b1_tok_s"], 2),
        "b1_tok_s_spec": round(res_spec["b1_tok_s"], 2),
        "b1_speedup": round(res_spec["b1_tok_s"] / res_plain["b1_tok_s"], 3),
        f"b{args.batch}_tok_s_plain": round(res_plain["batch_tok_s"], 2),
        f"b{args.batch}_tok_s_spec": round(res_spec["batch_tok_s"], 2),
        f"b{args.batch}_speedup": round(res_spec["batch_tok_s"] / res_plain["batch_tok_s"], 3),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else 0.0,
        "accepted_per_pos": [round(a / drafts, 3) for a in per_pos] if drafts else [],
        "greedy_outputs_equal": res_plain["outputs"] == res_spec["outputs"],
        "repeats": args.repeats,
        "command": "python benchmarks/spec_decode.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
    }
    print(json.dumps(row))
    print(f"\n1 request: {row['b1_tok_s_plain']:.1f} -> {row['b1_tok_s_spec']:.1f} tok/s "
          f"({row['b1_speedup']:.2f}x); batch {args.batch}: {row[f'b{args.batch}_speedup']:.2f}x; "
          f"acceptance {row['acceptance_rate']:.1%}, mean acceptance length "
          f"{row['mean_acceptance_length']:.2f}; greedy equal: {row['greedy_outputs_equal']}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump([row], f, indent=2)
    return [row]


if __name__ == "__main__":
    main()
