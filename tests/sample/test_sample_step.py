"""The serving split (process_logits, then sample_step) picks exactly what sample() picks, and
gives logprob rows only when a row asked for them."""

from dataclasses import replace

import jax
import numpy as np

from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.sampler import process_logits, sample_jit, sample_step

K = 4
step_jit = jax.jit(sample_step, static_argnames=("num_logprobs",))


def _rows(logprobs):
    return [
        SamplingRow(temperature=1.0, seed=3, top_k=20, num_logprobs=logprobs),
        SamplingRow(logit_bias={7: 50.0}),
        SamplingRow(temperature=0.9, seed=8, repetition_penalty=1.5, presence_penalty=1.0,
                    prompt_token_ids=[1, 2], output_token_ids=[3, 3, 4]),
        SamplingRow(banned_token_ids=(5,), temperature=0.0),
        SamplingRow(temperature=1.0, top_p=0.5, min_p=0.1),
    ]


def test_split_matches_sample_with_and_without_logprobs():
    logits = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 3
    logits[3, 5] = 100.0  # banned: must not be picked
    for logprobs in (None, 2):
        md = build_sampling_metadata(_rows(logprobs), 8, step_key_seed=11, penalty_len=16,
                                     bias_len=8)
        want = sample_jit(logits, md, num_logprobs=K)
        processed = jax.jit(process_logits)(logits, md)
        got = step_jit(logits, processed, replace(md, penalties=None, bias=None), num_logprobs=K)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        assert int(got.token_ids[1]) == 7 and int(got.token_ids[3]) != 5
        if logprobs is None:
            assert not np.asarray(got.logprobs).any() and not np.asarray(got.ranks).any()
        else:
            for name in ("logprob_token_ids", "logprobs", "ranks"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
