"""The same tokens alone, together, under preemption, with/without prefix caching, chunked."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine import SamplingParams
from tests.llm._hf import NEW_TOKENS
from tests.llm.conftest import greedy, token_prompts

ARCH = "LlamaForCausalLM"


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, max_tokens=NEW_TOKENS,
                          ignore_eos=True)


def _run(llm, prompts, params) -> list[list[int]]:
    outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def expected(make_llm, hf_refs):
    """Greedy: HF's tokens. Seeded: this engine's tokens with each request alone."""
    ref = hf_refs(ARCH)
    llm = make_llm(ARCH)
    alone = [_run(llm, [p], [seeded(i)])[0] for i, p in enumerate(ref.prompts)]
    return ref, alone


def _check_all(llm, expected):
    ref, seeded_alone = expected
    assert _run(llm, ref.prompts, greedy(NEW_TOKENS)) == ref.greedy
    assert _run(llm, ref.prompts, [seeded(i) for i in range(len(ref.prompts))]) == seeded_alone


def test_alone_equals_together_equals_hf(make_llm, expected):
    ref, _ = expected
    llm = make_llm(ARCH)
    alone = [_run(llm, [p], greedy(NEW_TOKENS))[0] for p in ref.prompts]
    assert alone == ref.greedy
    _check_all(llm, expected)
    # Greedy and seeded requests interleaved in one batch.
    mixed = [greedy(NEW_TOKENS) if i % 2 else seeded(i) for i in range(len(ref.prompts))]
    got = _run(llm, ref.prompts, mixed)
    for i, toks in enumerate(got):
        assert toks == (ref.greedy[i] if i % 2 else expected[1][i]), i


def test_preemption_keeps_outputs(make_llm, expected):
    # 23 usable blocks of 8 tokens: far fewer than the batch needs at once (~40 blocks).
    llm = make_llm(ARCH, num_kv_blocks=24)
    _check_all(llm, expected)
    assert llm.stats().num_preemptions > 0


def test_chunked_prefill_keeps_outputs(make_llm, expected):
    # 16-token budget: every prompt longer than 16 tokens is split into chunks.
    llm = make_llm(ARCH, max_num_batched_tokens=16)
    _check_all(llm, expected)


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching_on_and_off(make_llm, expected, caching):
    ref, _ = expected
    llm = make_llm(ARCH, enable_prefix_caching=caching)
    _check_all(llm, expected)
    rng = np.random.default_rng(7)
    prefix = rng.integers(4, 400, 45).tolist()
    prompts = [prefix + rng.integers(4, 400, n).tolist() for n in (3, 11, 20)]
    first = llm.generate(token_prompts(prompts[:1]), greedy(), use_tqdm=False)
    rest = llm.generate(token_prompts(prompts[1:]), greedy(), use_tqdm=False)
    cached = [o.num_cached_tokens for o in rest]
    if caching:
        assert all(c >= 40 for c in cached), cached  # 5 full blocks of the shared prefix
        assert llm.stats().prefix_cache_hits > 0
    else:
        assert cached == [0, 0] and llm.stats().prefix_cache_hits == 0
    # Cached or not, the tokens are those of each prompt computed from scratch.
    fresh = make_llm(ARCH, enable_prefix_caching=False)
    want = [_run(fresh, [p], greedy())[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in first + rest] == want


def _count_placeholders(monkeypatch, llm) -> list[int]:
    """Counts the decodes whose token came from the step in flight (async scheduling)."""
    from jaxserve.engine.scheduler_output import PLACEHOLDER_TOKEN_ID

    runner, count = llm.engine.runner, [0]
    dispatch = runner.dispatch

    def counting(scheduler_output, previous):
        count[0] += sum(c.token_ids[-1] == PLACEHOLDER_TOKEN_ID for c in scheduler_output.chunks)
        return dispatch(scheduler_output, previous)

    monkeypatch.setattr(runner, "dispatch", counting)
    return count


@pytest.mark.parametrize("overrides", [{}, {"num_kv_blocks": 24}, {"max_num_batched_tokens": 16}],
                         ids=["plain", "preemption", "chunked"])
def test_async_scheduling_keeps_outputs(make_llm, expected, overrides, monkeypatch):
    """Each decode takes the token of the step still in flight, on device: HF's greedy tokens
    and the seeded tokens of each request alone, also under preemption and chunked prefill."""
    llm = make_llm(ARCH, async_scheduling=True, **overrides)
    count = _count_placeholders(monkeypatch, llm)
    _check_all(llm, expected)
    assert count[0] > 0
    if "num_kv_blocks" in overrides:
        assert llm.stats().num_preemptions > 0


def test_async_scheduling_same_outputs_as_sync_for_each_kind_of_request(make_llm, expected,
                                                                          monkeypatch):
    """Logprobs, prompt logprobs, n = 2, penalties (their histories take the token in flight
    on device), a stop token (one token computed after it is dropped) and an abort: as the
    synchronous engine."""
    ref, _ = expected
    stop = ref.greedy[0][3]
    favoured = next(t for t in range(4, 400) if t not in ref.prompts[0])
    params = [
        greedy(NEW_TOKENS, logprobs=2),
        greedy(NEW_TOKENS, prompt_logprobs=1),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=NEW_TOKENS, ignore_eos=True),
        greedy(NEW_TOKENS, repetition_penalty=2.0, frequency_penalty=1.5),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=[stop]),
        # a biased token wins until its first output, whose penalties then hold it back for
        # the next token: a history missing the token in flight would repeat it at once
        greedy(NEW_TOKENS, logit_bias={favoured: 6.0}, presence_penalty=2.0,
               frequency_penalty=2.0),
    ]
    prompts = token_prompts(ref.prompts[:1] * len(params))
    sync_llm = make_llm(ARCH, async_scheduling=False)
    async_llm = make_llm(ARCH, async_scheduling=True)
    count = _count_placeholders(monkeypatch, async_llm)
    want = sync_llm.generate(prompts, params, use_tqdm=False)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    assert count[0] > 0
    assert got[4].outputs[0].token_ids == ref.greedy[0][:4]
    assert got[3].outputs[0].token_ids != ref.greedy[0]  # the penalties changed the tokens
    assert got[5].outputs[0].token_ids[0] == favoured != got[5].outputs[0].token_ids[1]
    assert got[4].outputs[0].finish_reason == "stop"
    for g, w in zip(got, want):
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.token_ids == wc.token_ids and gc.finish_reason == wc.finish_reason
            for glp, wlp in zip(gc.logprobs or [], wc.logprobs or [], strict=True):
                assert glp.keys() == wlp.keys()
                for t in glp:
                    assert glp[t].logprob == pytest.approx(wlp[t].logprob, abs=1e-5)
        for glp, wlp in zip(g.prompt_logprobs or [], w.prompt_logprobs or [], strict=True):
            assert (glp is None) == (wlp is None)
            if glp is not None:
                assert {t: p.logprob for t, p in glp.items()} == pytest.approx(
                    {t: p.logprob for t, p in wlp.items()}, abs=1e-5)
    # an abort while the request's next step is in flight
    engine = async_llm.engine
    engine.add_request("gone", ref.prompts[0], greedy(NEW_TOKENS))
    engine.add_request("kept", ref.prompts[1], greedy(NEW_TOKENS))
    for _ in range(4):
        engine.step()
    assert engine.scheduler.num_steps_in_flight == 1
    engine.abort_request("gone")
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert final["gone"].outputs[0].finish_reason == "abort"
    assert final["kept"].outputs[0].token_ids == ref.greedy[1]
