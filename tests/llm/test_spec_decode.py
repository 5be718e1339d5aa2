"""Speculative decoding (n-gram) on the real runner: greedy output equals HF transformers and
the same engine without speculation token for token, under preemption, chunked prefill and
prefix caching; seeded sampling reproducible; nothing compiles while serving."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine import SamplingParams
from tests.llm.conftest import greedy, token_prompts
from tests.llm.test_no_recompile import _varied_params, count_backend_compiles

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}


def _copy_heavy_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of ~100 tokens, a repeated phrase after a random head (the last two share a
    prefix); longer than the 32-token budget (chunked prefill)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        phrase = rng.integers(4, vocab, 5 + i).tolist()
        out.append(rng.integers(4, vocab, 24).tolist() + (phrase * 20)[: 70 + i])
    out[-1][:40] = out[-2][:40]
    return out


def check_pressure_workload(plain, spec):
    """6 copy-heavy requests with penalties, logprobs, n > 1 and a stop token through the
    plain and the speculating engine: the same tokens, finish reasons and logprobs, and the
    spec engine preempted and hit its prefix cache. Returns the spec engine's stats."""
    vocab = spec.engine.config.vocab_size
    prompts = token_prompts(_copy_heavy_prompts(vocab, 6))
    params = [greedy(28), greedy(24, logprobs=2), greedy(28, repetition_penalty=1.2),
              greedy(20, presence_penalty=0.5, frequency_penalty=0.3), greedy(28, n=2),
              greedy(28, stop_token_ids=[prompts[5]["prompt_token_ids"][40]])]
    before = spec.stats()
    want, got = (llm.generate(prompts, params, use_tqdm=False) for llm in (plain, spec))
    for a, b in zip(want, got):
        for ca, cb in zip(a.outputs, b.outputs):
            assert cb.token_ids == ca.token_ids
            assert (cb.finish_reason, cb.stop_reason) == (ca.finish_reason, ca.stop_reason)
            if ca.logprobs is not None:
                for ra, rb in zip(ca.logprobs, cb.logprobs):
                    assert list(ra) == list(rb)
                    np.testing.assert_allclose([x.logprob for x in rb.values()],
                                               [x.logprob for x in ra.values()], atol=1e-4)
    after = spec.stats()
    assert after.num_preemptions > before.num_preemptions
    assert after.prefix_cache_hits > before.prefix_cache_hits
    return after


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_greedy_equals_hf(arch, make_llm, hf_refs):
    ref = hf_refs(arch)
    llm = make_llm(arch, speculative_config=SPEC)
    outs = llm.generate(token_prompts(ref.prompts), greedy(12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref.greedy
    assert llm.stats().spec_decoding.num_drafts > 0


def test_greedy_equals_plain_engine_under_pressure(make_llm):
    """Copy-heavy prompts, 6 requests on 4 seats and 32 blocks (two full sequences):
    preemption, chunked prefill and prefix hits; with penalties and logprobs too (processors
    see the drafts as history per position)."""
    plain, spec = make_llm(), make_llm(speculative_config=SPEC, num_kv_blocks=33)
    after = check_pressure_workload(plain, spec)
    s = after.spec_decoding
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # accepted and rejected drafts
    assert len(s.num_accepted_tokens_per_pos) == 4


def test_seeded_sampling_is_reproducible(make_llm):
    spec = make_llm(speculative_config=SPEC)
    vocab = spec.engine.config.vocab_size
    prompts = token_prompts(_copy_heavy_prompts(vocab, 3, seed=1))
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7, max_tokens=24,
                        ignore_eos=True)
    alone = spec.generate(prompts[0], sp, use_tqdm=False)[0].outputs[0].token_ids
    again = spec.generate(prompts[0], sp, use_tqdm=False)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = spec.generate(prompts, [sp, noisy, noisy], use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again == batch


def test_serving_compiles_nothing(make_llm):
    spec = make_llm(speculative_config=SPEC)
    rng = np.random.default_rng(3)
    params = _varied_params(rng)
    vocab = spec.engine.config.vocab_size
    lens = [1, 2, 7, 8, 9, 16, 17, 31, 33, 64, 100, 107, 3]
    prompts = token_prompts([rng.integers(4, 400, n).tolist() for n in lens[:6]]
                            + _copy_heavy_prompts(vocab, len(lens) - 6, seed=2))
    with count_backend_compiles() as seen:
        spec.generate(prompts, params, use_tqdm=False)
        for p, sp in zip(prompts, params):
            spec.generate(p, sp, use_tqdm=False)
    assert seen == [], f"{len(seen)} backend compiles after start-up"
    assert spec.stats().spec_decoding.num_accepted_tokens > 0
