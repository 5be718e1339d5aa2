"""Token-id workloads for compare.py: the same seeded prompts for every engine.

decode   1 request, fixed input / output (single-stream latency vs the bandwidth floor)
mixed    N requests, input and output lengths uniform in ranges (continuous batching)
prefix   N requests sharing one long prefix plus a few unique tokens (prefix caching)

Each workload first runs an untimed warm-up of the same shape on its own prompts (engines
that compile or autotune per shape do it there). Every repeat draws fresh prompts (and a fresh
shared prefix), so a prefix cache never carries over from one repeat to the next; repeat r of
a workload is the same for every engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.compare_models import FIRST_PROMPT_ID

WORKLOADS = ("decode", "mixed", "prefix")
# Before its timed repeats each workload runs once untimed on its own prompts (so a prefix
# cache gains nothing): up to 16 requests of the same shape, at most 8 tokens out.
WARMUP_STREAM, WARMUP_MAX_REQUESTS, WARMUP_MAX_TOKENS = 1000, 16, 8


@dataclass(frozen=True)
class WorkloadConfig:
    decode_input: int = 128
    decode_output: int = 256
    mixed_num_prompts: int = 64
    mixed_input: tuple[int, int] = (32, 256)
    mixed_output: tuple[int, int] = (16, 128)
    prefix_num_prompts: int = 32
    prefix_len: int = 512
    prefix_unique: int = 16
    prefix_output: int = 64
    temperature: float = 1.0
    repeats: int = 1
    decode_repeats: int = 3


def _ids(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(FIRST_PROMPT_ID, vocab, int(n)).tolist()


def _requests(name: str, cfg: WorkloadConfig, vocab: int, rng: np.random.Generator) -> list[dict]:
    if name == "decode":
        return [{"prompt_token_ids": _ids(rng, vocab, cfg.decode_input),
                 "max_tokens": cfg.decode_output}]
    if name == "mixed":
        lo, hi = cfg.mixed_input
        olo, ohi = cfg.mixed_output
        ins = rng.integers(lo, hi + 1, cfg.mixed_num_prompts)
        outs = rng.integers(olo, ohi + 1, cfg.mixed_num_prompts)
        return [{"prompt_token_ids": _ids(rng, vocab, i), "max_tokens": int(o)}
                for i, o in zip(ins, outs)]
    if name == "prefix":
        shared = _ids(rng, vocab, cfg.prefix_len)
        return [{"prompt_token_ids": shared + _ids(rng, vocab, cfg.prefix_unique),
                 "max_tokens": cfg.prefix_output} for _ in range(cfg.prefix_num_prompts)]
    raise ValueError(f"workload: unknown {name!r} (choose from {', '.join(WORKLOADS)})")


def describe(name: str, cfg: WorkloadConfig) -> str:
    if name == "decode":
        return f"1 request, {cfg.decode_input} in / {cfg.decode_output} out"
    if name == "mixed":
        return (f"{cfg.mixed_num_prompts} requests, in uniform {cfg.mixed_input[0]}.."
                f"{cfg.mixed_input[1]} / out uniform {cfg.mixed_output[0]}..{cfg.mixed_output[1]}")
    return (f"{cfg.prefix_num_prompts} requests, {cfg.prefix_len}-token shared prefix + "
            f"{cfg.prefix_unique} unique / {cfg.prefix_output} out")


def build(names: list[str], cfg: WorkloadConfig, vocab: int, seed: int) -> list[dict]:
    """The workloads as the runners read them (ignore_eos is always on)."""
    out = []
    for w, name in enumerate(names):
        reps = cfg.decode_repeats if name == "decode" else cfg.repeats
        repeats = [_requests(name, cfg, vocab, np.random.default_rng([seed, w, r]))
                   for r in range(reps)]
        warm = _requests(name, cfg, vocab, np.random.default_rng([seed, w, WARMUP_STREAM]))
        workload = {"name": name, "description": describe(name, cfg),
                    "temperature": cfg.temperature, "repeats": repeats,
                    "warmup": [dict(r, max_tokens=min(r["max_tokens"], WARMUP_MAX_TOKENS))
                               for r in warm[:WARMUP_MAX_REQUESTS]]}
        if name == "decode":  # same input length, 1 output token: prefill + first token
            workload["prefill_probe"] = [
                [{"prompt_token_ids": _ids(np.random.default_rng([seed, w, r, 1]), vocab,
                                           cfg.decode_input), "max_tokens": 1}]
                for r in range(reps)]
        out.append(workload)
    return out


def warmup_requests(vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 999])
    return [{"prompt_token_ids": _ids(rng, vocab, 24), "max_tokens": 4} for _ in range(2)]


def longest_sequence(workloads: list[dict]) -> int:
    return max(len(r["prompt_token_ids"]) + r["max_tokens"]
               for w in workloads for reqs in w["repeats"] for r in reqs)
