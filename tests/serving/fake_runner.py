"""A deterministic stand-in for the model runner: the next token is a hash of the context."""

from __future__ import annotations

import threading
import time

from jaxserve.runtime.runner_output import LogprobsRow, ModelRunnerOutput

FIRST_ORDINARY_TOKEN = 7  # the demo tokenizer's special tokens are ids 0..6


def next_token(context: list[int], vocab_size: int) -> int:
    """A token that depends only on the context (so results are batch-independent)."""
    span = vocab_size - FIRST_ORDINARY_TOKEN
    return FIRST_ORDINARY_TOKEN + (sum(context[-4:]) * 7919 + len(context) * 31) % span


class FakeRunner:
    """`execute(scheduler_output) -> ModelRunnerOutput`, optionally slow or failing."""

    def __init__(self, vocab_size: int, step_delay_s: float = 0.0):
        self.vocab_size = vocab_size
        self.step_delay_s = step_delay_s
        self.fail_steps = 0  # the next this-many steps raise
        self.num_steps = 0
        self.lock = threading.Lock()

    def execute(self, scheduler_output) -> ModelRunnerOutput:
        with self.lock:
            self.num_steps += 1
            if self.fail_steps > 0:
                self.fail_steps -= 1
                raise RuntimeError("fake runner failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        out = ModelRunnerOutput()
        for chunk in scheduler_output.chunks:
            if chunk.sampling_params.prompt_logprobs is not None:
                out.prompt_logprobs[chunk.request_id] = _prompt_rows(
                    chunk, chunk.sampling_params.prompt_logprobs)
            if not chunk.sample:
                continue
            context = list(chunk.prompt_token_ids) + list(chunk.output_token_ids)
            token = next_token(context, self.vocab_size)
            out.sampled[chunk.request_id] = token
            k = chunk.sampling_params.logprobs
            if k is not None:
                top = [token] + [FIRST_ORDINARY_TOKEN + (token + j) % 50 for j in range(1, k + 1)]
                out.logprobs[chunk.request_id] = LogprobsRow(
                    token_ids=[token] + top[:k],
                    logprobs=[-0.25] + [-0.25 - j for j in range(k)],
                    ranks=[1] + list(range(1, k + 1)),
                )
        return out


def _prompt_rows(chunk, k: int) -> list[LogprobsRow]:
    """One row per chunk position p that scores prompt token p + 1: that token at rank
    1 + (id mod 3) (so sometimes outside the top k), then the top k by rank (the prompt token
    at its own rank when within k, made-up other tokens elsewhere); logprob = -rank / 2."""
    prompt = list(chunk.prompt_token_ids)
    rows = []
    for p in range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)):
        if p + 1 >= len(prompt):
            break
        actual = prompt[p + 1]
        rank = 1 + actual % 3
        others = [t for t in range(FIRST_ORDINARY_TOKEN, FIRST_ORDINARY_TOKEN + k + 1)
                  if t != actual]
        top = [actual if j == rank else others.pop(0) for j in range(1, k + 1)]
        rows.append(LogprobsRow(token_ids=[actual] + top,
                                logprobs=[-0.5 * rank] + [-0.5 * j for j in range(1, k + 1)],
                                ranks=[rank] + list(range(1, k + 1))))
    return rows
