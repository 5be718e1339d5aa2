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
