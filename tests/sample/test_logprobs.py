"""Sampled / prompt logprobs and ranks against numpy, computed from the unmodified logits."""

import numpy as np

from _sample_reference import log_softmax
from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.sampler import prompt_logprobs_jit, sample_jit


def _check_rows(ids, lps, ranks, logits, chosen, k):
    ref = log_softmax(logits)  # float64 [N, V]
    n = len(logits)
    assert ids.shape == lps.shape == ranks.shape == (n, 1 + k)
    np.testing.assert_array_equal(ids[:, 0], chosen)
    np.testing.assert_allclose(lps[:, 0], ref[np.arange(n), chosen], atol=1e-5)
    expected_rank = 1 + (ref > ref[np.arange(n), chosen][:, None]).sum(axis=-1)
    np.testing.assert_array_equal(ranks[:, 0], expected_rank)
    if k:
        top = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(ids[:, 1:], top)
        np.testing.assert_allclose(lps[:, 1:], np.take_along_axis(ref, top, axis=-1), atol=1e-5)
        np.testing.assert_array_equal(ranks[:, 1:], np.tile(np.arange(1, k + 1), (n, 1)))


def test_sample_logprobs_use_raw_logits():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((8, 200)) * 3).astype(np.float32)
    rows = [SamplingRow(temperature=1.0, seed=i, top_k=50) for i in range(4)]
    # bias / penalties change which token is chosen, not the reported logprobs
    rows += [SamplingRow(logit_bias={7: 100.0}), SamplingRow(banned_token_ids=(int(np.argmax(logits[5])),))]
    rows += [SamplingRow(temperature=2.0, repetition_penalty=2.0, output_token_ids=[1, 2]), SamplingRow()]
    out = sample_jit(logits, build_sampling_metadata(rows, 8, 0), num_logprobs=5)
    tokens = np.asarray(out.token_ids)
    assert tokens[4] == 7 and tokens[5] != np.argmax(logits[5])
    _check_rows(np.asarray(out.logprob_token_ids), np.asarray(out.logprobs),
                np.asarray(out.ranks), logits, tokens, 5)
    assert np.asarray(out.ranks)[4, 0] > 1  # token 7 was forced, not the most likely


def test_no_logprobs_when_not_asked():
    out = sample_jit(np.zeros((2, 10), np.float32), build_sampling_metadata([], 2, 0), num_logprobs=0)
    assert out.logprobs is None and out.ranks is None and out.logprob_token_ids is None


def test_rank_counts_only_strictly_better_tokens():
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], np.float32)
    out = prompt_logprobs_jit(logits, np.array([3], np.int32), num_logprobs=2)
    assert np.asarray(out.ranks).tolist() == [[4, 1, 2]]
    out = prompt_logprobs_jit(logits, np.array([4], np.int32), num_logprobs=0)
    assert np.asarray(out.ranks).tolist() == [[1]]


def test_prompt_logprobs():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((37, 120)) * 2).astype(np.float32)
    logits[3, 10:] = -np.inf
    targets = rng.integers(0, 10, size=37).astype(np.int32)
    for k in (0, 3):
        out = prompt_logprobs_jit(logits, targets, num_logprobs=k)
        np.testing.assert_array_equal(np.asarray(out.token_ids), targets)
        _check_rows(np.asarray(out.logprob_token_ids), np.asarray(out.logprobs),
                    np.asarray(out.ranks), logits, targets, k)
