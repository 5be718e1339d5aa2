"""Seeded sampling is reproducible and batch-independent; n > 1 gives n distinct completions."""

from __future__ import annotations

from jaxserve.engine import SamplingParams
from tests.llm._hf import make_prompts
from tests.llm.conftest import greedy, token_prompts

ARCH = "LlamaForCausalLM"
PROMPTS = make_prompts(400, seed=11, lens=(30, 7, 52, 18))


def sampled(seed=None, n=1, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=10, ignore_eos=True, **kw)


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_seeded_is_reproducible_and_batch_independent(make_llm):
    llm = make_llm(ARCH)
    target = token_prompts(PROMPTS[:1])
    alone = _tokens(llm.generate(target, sampled(seed=5), use_tqdm=False))[0][0]
    again = _tokens(llm.generate(target, sampled(seed=5), use_tqdm=False))[0][0]
    assert alone == again
    # In a batch, in another position, next to unseeded and greedy requests.
    batch = token_prompts(PROMPTS[1:3]) + target + token_prompts(PROMPTS[3:])
    params = [sampled(), greedy(10), sampled(seed=5), sampled(seed=9, top_k=20)]
    got = _tokens(llm.generate(batch, params, use_tqdm=False))
    assert got[2][0] == alone
    other_seed = _tokens(llm.generate(target, sampled(seed=6), use_tqdm=False))[0][0]
    assert other_seed != alone
    greedy_toks = _tokens(llm.generate(target, greedy(10), use_tqdm=False))[0][0]
    assert greedy_toks != alone  # temperature 1.0 over a ~500-token vocab really samples


def test_unseeded_requests_differ(make_llm):
    llm = make_llm(ARCH)
    outs = _tokens(llm.generate(token_prompts([PROMPTS[0]] * 3), sampled(), use_tqdm=False))
    assert len({tuple(o[0]) for o in outs}) == 3


def test_n_completions_distinct_and_seeded_n_reproducible(make_llm):
    llm = make_llm(ARCH)
    target = token_prompts(PROMPTS[2:3])
    out = llm.generate(target, sampled(n=3), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    first = _tokens(llm.generate(target, sampled(seed=42, n=3), use_tqdm=False))[0]
    assert len({tuple(t) for t in first}) == 3
    assert _tokens(llm.generate(target, sampled(seed=42, n=3), use_tqdm=False))[0] == first
    # Also when it shares steps with other requests.
    batch = token_prompts(PROMPTS[:2]) + target
    mixed = _tokens(llm.generate(batch, [greedy(10), sampled(), sampled(seed=42, n=3)],
                                 use_tqdm=False))
    assert mixed[2] == first


def test_n_greedy_gives_identical_copies(make_llm):
    llm = make_llm(ARCH)
    target = token_prompts(PROMPTS[:1])
    single = _tokens(llm.generate(target, greedy(10), use_tqdm=False))[0][0]
    out = _tokens(llm.generate(target, greedy(10, n=2), use_tqdm=False))[0]
    assert out == [single, single]
