"""Random sampling matches the numpy reference distribution (TV bound, see tv_tolerance)."""

from dataclasses import replace

import numpy as np

from _sample_reference import (
    NUM_DRAWS,
    assert_matches_reference,
    reference_probs,
    softmax,
    total_variation,
    tv_tolerance,
)
from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.sampler import sample_jit

# 16 tokens with well separated probabilities, so each filter's boundary is far from f32 rounding.
BASE_PROBS = np.array(
    [0.21, 0.17, 0.14, 0.11, 0.09, 0.07, 0.055, 0.045, 0.035, 0.025, 0.015, 0.01, 0.008,
     0.004, 0.002, 0.001]
)
LOGITS = np.log(BASE_PROBS / BASE_PROBS.sum()).astype(np.float32) + 3.0  # shifted: raw logits
RANDOM = SamplingRow(temperature=1.0)


def test_plain_and_temperature():
    assert_matches_reference(LOGITS, RANDOM, wrong_rows=[replace(RANDOM, temperature=0.6)])
    hot = replace(RANDOM, temperature=1.8)
    assert_matches_reference(LOGITS, hot, wrong_rows=[RANDOM])


def test_top_k():
    row = replace(RANDOM, temperature=0.8, top_k=4)
    wrong = [replace(row, top_k=3), replace(row, top_k=5), replace(row, top_k=0)]
    assert_matches_reference(LOGITS, row, wrong)


def test_top_p_keeps_the_token_that_crosses_p():
    row = replace(RANDOM, top_p=0.6)  # exclusive mass: .21 .38 .52 .63 -> keeps 4 tokens
    assert reference_probs(LOGITS, row).astype(bool).sum() == 4
    assert_matches_reference(LOGITS, row, [replace(row, top_k=3), replace(row, top_p=1.0)])


def test_top_p_applies_after_temperature():
    row = replace(RANDOM, temperature=2.0, top_p=0.5)
    before = softmax(np.where(reference_probs(LOGITS, replace(RANDOM, top_p=0.5)) > 0,
                              LOGITS / 2.0, -np.inf))  # top-p on T=1 probabilities, then T
    assert_matches_reference(LOGITS, row, [before, replace(row, top_p=1.0)])


def test_min_p():
    row = replace(RANDOM, temperature=0.7, min_p=0.3)
    before = softmax(np.where(reference_probs(LOGITS, replace(RANDOM, min_p=0.3)) > 0,
                              LOGITS / 0.7, -np.inf))  # min-p on T=1 probabilities, then T
    assert_matches_reference(LOGITS, row, [before, replace(row, min_p=0.0)])


def test_top_k_top_p_min_p_together():
    # top-p runs on the top-k renormalised distribution: top-4 then p=0.7 keeps 3 tokens, while
    # p=0.7 alone keeps 5 and top-4 alone keeps 4.
    row = SamplingRow(temperature=1.0, top_k=4, top_p=0.7, min_p=0.05)
    assert reference_probs(LOGITS, row).astype(bool).sum() == 3
    assert_matches_reference(LOGITS, row, [replace(row, top_k=0), replace(row, top_p=1.0)])
    row = SamplingRow(temperature=1.0, top_k=8, top_p=0.95, min_p=0.5)  # min-p is the tightest
    assert_matches_reference(LOGITS, row, [replace(row, min_p=0.0)])


def test_penalties():
    logits = LOGITS - 1.0  # tokens 0-2 have positive logits, the rest negative
    row = SamplingRow(
        temperature=1.0,
        repetition_penalty=2.0,
        presence_penalty=0.8,
        frequency_penalty=0.5,
        prompt_token_ids=[0, 5, 5, 9],
        output_token_ids=[1, 1, 1, 6, 0],
    )
    prompt_as_output = replace(row, prompt_token_ids=[], output_token_ids=[0, 5, 5, 9, 1, 1, 1, 6, 0])
    wrong = [
        replace(row, repetition_penalty=1.0),
        replace(row, presence_penalty=0.0),
        replace(row, frequency_penalty=0.0),
        prompt_as_output,  # presence/frequency wrongly counting the prompt
    ]
    # each wrong variant is ~0.09-0.12 away: 4x the draws to get 2 tolerances below that
    assert_matches_reference(logits, row, wrong, n=4 * NUM_DRAWS)


def test_logit_bias_and_banned_ids():
    row = SamplingRow(temperature=1.0, logit_bias={10: 3.0, 0: -2.0}, banned_token_ids=(1, 2))
    counts = assert_matches_reference(LOGITS, row, [RANDOM, replace(row, banned_token_ids=())])
    assert counts[1] == counts[2] == 0


def test_seeded_rows_follow_the_distribution():
    row = SamplingRow(temperature=0.9, top_p=0.85)
    rows = [replace(row, seed=s, output_index=7) for s in range(NUM_DRAWS)]
    md = build_sampling_metadata(rows, NUM_DRAWS, 0)
    batch = np.broadcast_to(LOGITS, (NUM_DRAWS, len(LOGITS)))
    tokens = np.asarray(sample_jit(batch, md, num_logprobs=0).token_ids)
    expected = reference_probs(LOGITS, row)
    freq = np.bincount(tokens, minlength=len(LOGITS)) / NUM_DRAWS
    assert freq[expected == 0].sum() == 0
    assert total_variation(freq, expected) < tv_tolerance(NUM_DRAWS, int((expected > 0).sum()))
