"""After start-up, a varied run of requests compiles nothing (counted by jax.monitoring)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from jaxserve.engine import SamplingParams
from tests.llm.conftest import token_prompts

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
ARCH = "LlamaForCausalLM"


@contextlib.contextmanager
def count_backend_compiles():
    """Yields a list that collects one duration per XLA backend compile while open."""
    seen: list[float] = []

    def listener(event: str, duration: float, **_):
        if event == BACKEND_COMPILE:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_listener_sees_a_fresh_compile():
    """The counter itself works: a new jitted function is one backend compile."""
    with count_backend_compiles() as seen:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7, dtype=np.float32)).block_until_ready()
    assert len(seen) == 1


def _varied_params(rng: np.random.Generator) -> list[SamplingParams]:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=20, seed=1),
        dict(temperature=1.0, top_p=0.7, min_p=0.05),
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.7, logprobs=20, prompt_logprobs=5),
        dict(temperature=0.0, prompt_logprobs=0),
        dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3),
        dict(temperature=0.0, repetition_penalty=1.3),
        dict(temperature=0.9, logit_bias={5: 4.0, 17: -100.0}),
        dict(temperature=1.0, n=3, seed=4),
        dict(temperature=0.0, n=2, logprobs=1),
        dict(temperature=1.0, stop=["e", " t"], stop_token_ids=[9]),
        dict(temperature=1.0, min_tokens=4, ignore_eos=False),
    ]
    out = []
    for kw in kinds:
        kw.setdefault("ignore_eos", True)
        out.append(SamplingParams(max_tokens=int(rng.integers(1, 20)), **kw))
    return out


def test_varied_requests_compile_nothing(make_llm):
    llm = make_llm(ARCH)  # start-up (and its compiles) happens before counting
    rng = np.random.default_rng(3)
    params = _varied_params(rng)
    lens = [1, 2, 7, 8, 9, 16, 17, 31, 33, 64, 100, 107, 3]
    prompts = token_prompts([rng.integers(4, 400, n).tolist() for n in lens])
    with count_backend_compiles() as seen:
        outs = llm.generate(prompts, params, use_tqdm=False)  # all together
        for p, sp in zip(prompts, params):  # each alone: decode-only steps of 1..3 rows
            llm.generate(p, sp, use_tqdm=False)
        llm.generate(["The quick brown fox", "Once upon a time"], params[11], use_tqdm=False)
        llm.chat([{"role": "user", "content": "hello"}], params[2], use_tqdm=False)
    assert len(outs) == len(lens)
    assert seen == [], f"{len(seen)} backend compiles after start-up"
