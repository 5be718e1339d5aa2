"""Speculative decoding benchmark: n-gram and draft-model speculation vs the same engine without
it, in the same run.

Workloads (greedy, ignore_eos, fixed output length):
  copy   each prompt a head then a phrase repeated (copy-heavy: n-gram's case). With
         --model trained, real held-out Python source (a snippet repeated); otherwise random ids.
  code   (--model trained only) held-out Python source the fixture was not trained on.
Measures 1-request decode speed (each prompt alone) and a batch of --batch, as output tokens/s
medians over repeats; the plain engine and every method alternate pass by pass, and each
speed-up is the median over repeats of a method's pass over the plain pass just before it.
Also the acceptance rate and mean acceptance length from LLM.stats(), and whether the greedy
outputs are equal.

  python benchmarks/spec_decode.py --model trained --methods ngram,draft_model \\
      --workloads copy,code --output-json benchmarks/results/cpu_spec_decode_trained.json
  python benchmarks/spec_decode.py --model random-20m --methods ngram --workloads copy
  python benchmarks/spec_decode.py --model random-20m --gates off,on --disable-by-batch-size 8

--gates: each method runs once per gate setting: off (disable_by_acceptance 0, no batch-size
rule) and on (--disable-by-acceptance, --disable-by-batch-size).
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
    p.add_argument("--model", default="random-20m",
                   help="trained (benchmarks/trained_models.py) | demo | random-20m | a dir")
    p.add_argument("--draft-model", default=None,
                   help="draft checkpoint dir (default with --model trained: its draft)")
    p.add_argument("--methods", default="ngram", help="comma list: ngram, draft_model")
    p.add_argument("--workloads", default="copy", help="comma list: copy, code")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--gates", default="on", help="comma list: off, on (see above)")
    p.add_argument("--disable-by-acceptance", type=float, default=0.1)
    p.add_argument("--disable-by-batch-size", type=int, default=None)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=4, help="1-request runs, one per prompt")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--head-len", type=int, default=16)
    p.add_argument("--phrase-len", type=int, default=24)
    p.add_argument("--repeats-in-prompt", type=int, default=5)
    p.add_argument("--code-prompt-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def random_copy_prompts(n: int, vocab: int, args, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        head = rng.integers(FIRST_TOKEN_ID, vocab, args.head_len).tolist()
        phrase = rng.integers(FIRST_TOKEN_ID, vocab, args.phrase_len).tolist()
        out.append({"prompt_token_ids": head + phrase * args.repeats_in_prompt})
    return out


def held_out_stream(tokenizer) -> np.ndarray:
    """Token ids of stdlib files the fixture was not trained on (those past its corpus)."""
    from benchmarks.trained_models import corpus_files, load_corpus

    seen = len(load_corpus())
    ids: list[int] = []
    for path in corpus_files()[seen:seen + 40]:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    return np.asarray(ids, np.int64)


def code_prompts(stream: np.ndarray, n: int, args, seed: int, copy: bool) -> list[dict]:
    """Windows of held-out source; copy: a head, then a snippet repeated (copy-heavy)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in rng.integers(0, len(stream) - 4 * args.code_prompt_len, n):
        if copy:
            head = stream[start: start + args.head_len].tolist()
            s = start + args.head_len
            phrase = stream[s: s + args.phrase_len].tolist()
            ids = head + phrase * args.repeats_in_prompt
        else:
            ids = stream[start: start + args.code_prompt_len].tolist()
        out.append({"prompt_token_ids": [int(t) for t in ids]})
    return out


def timed(llm, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outs


def timed_pass(llm, prompts, batch_prompts, params) -> dict:
    """One pass: output tok/s of each prompt alone (median: b1) and of the batch together."""
    b1 = []
    for p in prompts:
        t, outs = timed(llm, [p], params)
        b1.append(sum(len(c.token_ids) for o in outs for c in o.outputs) / t)
    t, outputs = timed(llm, batch_prompts, params)
    return {"b1_tok_s": statistics.median(b1),
            "batch_tok_s": sum(len(c.token_ids) for o in outputs for c in o.outputs) / t,
            "outputs": [o.outputs[0].token_ids for o in outputs]}


def spec_counters(before, after) -> dict:
    """Speculation counters between two LLM.stats().spec_decoding snapshots."""
    drafts = after.num_drafts - before.num_drafts
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    per_pos = [a - b for a, b in zip(after.num_accepted_tokens_per_pos,
                                     before.num_accepted_tokens_per_pos)]
    return dict(
        gated_by_acceptance=after.num_gated_by_acceptance - before.num_gated_by_acceptance,
        gated_by_batch_size=after.num_gated_by_batch_size - before.num_gated_by_batch_size,
        acceptance_rate=round(accepted / drafted, 4) if drafted else 0.0,
        mean_acceptance_length=round(1 + accepted / drafts, 3) if drafts else 0.0,
        accepted_per_pos=[round(a / drafts, 3) for a in per_pos] if drafts else [])


def median_of(passes: list[dict], key: str) -> float:
    return statistics.median(p[key] for p in passes)


def median_ratio(spec: list[dict], plain: list[dict], key: str) -> float:
    """Median over repeats of spec / plain, each pair measured back to back (a shared
    machine's speed drifts between passes more than within one)."""
    return statistics.median(a[key] / b[key] for a, b in zip(spec, plain))


def _spec_configs(args, draft_path):
    """label -> speculative_config: one per method and gate setting."""
    gates = {"off": {"disable_by_acceptance": 0.0, "disable_by_batch_size": None},
             "on": {"disable_by_acceptance": args.disable_by_acceptance,
                    "disable_by_batch_size": args.disable_by_batch_size}}
    out = {}
    for gate in args.gates.split(","):
        if gate not in gates:
            raise SystemExit(f"--gates: unknown setting {gate!r} (off, on)")
        for method, cfg in _method_configs(args, draft_path).items():
            out[f"{method}/gate-{gate}"] = {**cfg, **gates[gate]}
    return out


def _method_configs(args, draft_path):
    out = {}
    for method in args.methods.split(","):
        if method == "ngram":
            out[method] = {"method": "ngram", "num_speculative_tokens": args.k,
                           "prompt_lookup_max": args.prompt_lookup_max,
                           "prompt_lookup_min": args.prompt_lookup_min}
        elif method == "draft_model":
            if draft_path is None:
                raise SystemExit("--draft-model: required for draft_model (or --model trained)")
            out[method] = {"method": "draft_model", "model": draft_path,
                           "num_speculative_tokens": args.k}
        else:
            raise SystemExit(f"--methods: unknown method {method!r}")
    return out


def _workloads(args, path, vocab, tokenizer):
    trained = args.model == "trained"
    stream = held_out_stream(tokenizer) if trained else None
    out = {}
    for name in args.workloads.split(","):
        if name == "copy" and not trained:
            out[f"copy-random-{args.head_len}+{args.phrase_len}x{args.repeats_in_prompt}"] = (
                random_copy_prompts(args.num_prompts, vocab, args),
                random_copy_prompts(args.batch, vocab, args, seed=1))
        elif name in ("copy", "code") and trained:
            copy = name == "copy"
            label = (f"copy-code-{args.head_len}+{args.phrase_len}x{args.repeats_in_prompt}"
                     if copy else f"code-{args.code_prompt_len}")
            out[label] = (code_prompts(stream, args.num_prompts, args, 0, copy),
                          code_prompts(stream, args.batch, args, 1, copy))
        else:
            raise SystemExit(f"--workloads: {name!r} (code needs --model trained)")
    return out


def main(argv=None) -> list[dict]:
    import jax

    from jaxserve.engine import SamplingParams
    from jaxserve.llm import LLM

    args = parse_args(argv)
    draft_path = args.draft_model
    if args.model == "trained":
        from benchmarks.trained_models import ensure_trained, trained_info

        dirs = ensure_trained()
        path, draft_path = dirs["target"], draft_path or dirs["draft"]
        fixture = {role: trained_info(d) for role, d in dirs.items()}
    else:
        path, fixture = resolve_model(args.model), None
    common = dict(dtype=args.dtype, max_model_len=1024, max_num_seqs=args.batch,
                  max_num_batched_tokens=args.max_num_batched_tokens, show_progress=False,
                  seed=0,
                  compilation_cache_dir=args.compilation_cache_dir)
    plain = LLM(path, **common)
    engines = {m: LLM(path, speculative_config=cfg, **common)
               for m, cfg in _spec_configs(args, draft_path).items()}
    vocab = plain.engine.config.vocab_size
    workloads = _workloads(args, path, vocab, plain.engine.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for llm in (plain, *engines.values()):  # one untimed pass each
        llm.generate(next(iter(workloads.values()))[0][:1], params, use_tqdm=False)
    load = os.getloadavg()
    rows, b = [], args.batch
    for wname, (prompts, batch_prompts) in workloads.items():
        snapshots = {m: llm.stats().spec_decoding.copy() for m, llm in engines.items()}
        passes = {name: [] for name in ("plain", *engines)}
        for _ in range(args.repeats):  # plain and every method alternate, pass by pass
            for name, llm in (("plain", plain), *engines.items()):
                passes[name].append(timed_pass(llm, prompts, batch_prompts, params))
        base = passes["plain"]
        for method, llm in engines.items():
            res = passes[method]
            counters = spec_counters(snapshots[method], llm.stats().spec_decoding)
            row = {
                "label": method,
                "workload": f"{wname}-{args.output_len}-greedy", "model": args.model,
                "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                "speculative_config": llm.engine.config.speculative.__dict__,
                "b1_tok_s_plain": round(median_of(base, "b1_tok_s"), 2),
                "b1_tok_s_spec": round(median_of(res, "b1_tok_s"), 2),
                "b1_speedup": round(median_ratio(res, base, "b1_tok_s"), 3),
                f"b{b}_tok_s_plain": round(median_of(base, "batch_tok_s"), 2),
                f"b{b}_tok_s_spec": round(median_of(res, "batch_tok_s"), 2),
                f"b{b}_speedup": round(median_ratio(res, base, "batch_tok_s"), 3),
                **counters,
                "greedy_outputs_equal": base[-1]["outputs"] == res[-1]["outputs"],
                "repeats": args.repeats,
                "trained_fixture": fixture,
                "loadavg_at_start": [round(x, 2) for x in load],
                "command": "python benchmarks/spec_decode.py " + " ".join(
                    sys.argv[1:] if argv is None else argv),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'workload':<34} {'method':<24} {'b1 plain':>9} {'b1 spec':>8} {'x':>6} "
          f"{'b' + str(b) + ' x':>6} {'accept':>7} {'len':>5} equal")
    for r in rows:
        print(f"{r['workload']:<34} {r['label']:<24} "
              f"{r['b1_tok_s_plain']:>9.1f} {r['b1_tok_s_spec']:>8.1f} {r['b1_speedup']:>6.2f} "
              f"{r[f'b{b}_speedup']:>6.2f} {r['acceptance_rate']:>7.1%} "
              f"{r['mean_acceptance_length']:>5.2f} {r['greedy_outputs_equal']}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
