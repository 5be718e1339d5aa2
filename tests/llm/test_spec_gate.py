"""The speculation gate on the real runner: with both rules active, n-gram and draft-model
greedy output equals the engine without speculation, gated decodes are counted, per-request
gate state is gone afterwards and every block is free; the draft model's loop runs only as
many draft steps as the step's most drafts."""

from __future__ import annotations

import numpy as np

from tests.llm.conftest import greedy, token_prompts
from tests.llm.test_spec_decode import _copy_heavy_prompts
from tests.llm.test_spec_draft import draft_spec  # noqa: F401 (fixture)

GATE = {"disable_by_acceptance": 0.6, "disable_by_batch_size": 3}


def _mixed_prompts(vocab: int) -> list[dict]:
    """3 copy-heavy prompts (drafts accepted) and 3 random ones (drafts mostly rejected)."""
    rng = np.random.default_rng(5)
    return token_prompts(_copy_heavy_prompts(vocab, 3, seed=4)
                         + [rng.integers(4, vocab, n).tolist() for n in (12, 30, 7)])


def _check_against_plain(plain, spec, max_tokens: int = 24):
    prompts = _mixed_prompts(spec.engine.config.vocab_size)
    want = plain.generate(prompts, greedy(max_tokens), use_tqdm=False)
    got = spec.generate(prompts, greedy(max_tokens), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    s = spec.stats().spec_decoding
    assert s.num_drafts > 0 and s.num_accepted_tokens > 0
    assert s.num_gated_by_acceptance > 0 and s.num_gated_by_batch_size > 0
    assert spec.engine.scheduler.gate.num_tracked == 0  # finished requests forgotten
    return s


def test_ngram_gate_keeps_greedy_output(make_llm):
    spec = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1, **GATE})
    _check_against_plain(make_llm(), spec)


def test_draft_model_gate_and_short_draft_loop(make_llm, draft_spec):  # noqa: F811
    """Every step's unused draft columns (past the step's most drafts) stay zero: the draft
    loop stopped there (k draws would fill them with tokens)."""
    spec = make_llm(speculative_config={**draft_spec(k=3), **GATE}, num_kv_blocks=33)
    draft = spec.engine.runner.draft
    seen: list[tuple[int, np.ndarray]] = []
    run = draft.run

    def recording_run(executable, token_ids, md, layout, chunks, smd):
        drafts, *rest = run(executable, token_ids, md, layout, chunks, smd)
        seen.append((max(len(c.spec_token_ids) for c in chunks),
                     np.asarray(drafts)[:len(chunks)].copy()))
        return drafts, *rest

    draft.run = recording_run
    try:
        _check_against_plain(make_llm(), spec)
    finally:
        del draft.run
    steps_by_max = {m: [d for mm, d in seen if mm == m] for m in range(4)}
    assert steps_by_max[0] and steps_by_max[3], {m: len(v) for m, v in steps_by_max.items()}
    for m, arrays in steps_by_max.items():
        for drafts in arrays:
            assert not drafts[:, m:].any(), (m, drafts)
