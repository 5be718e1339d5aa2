"""Greedy exactness, seeded reproducibility / batch independence, padding rows, -inf logits."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from _sample_reference import processed_logits
from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.sampler import sample_jit


def _sample(logits, rows, padded_rows, step_seed=0, num_logprobs=0):
    """Sample rows; logits rows past len(logits) (padding) are zeros."""
    md = build_sampling_metadata(rows, padded_rows, step_seed)
    batch = np.zeros((padded_rows, np.shape(logits)[-1]), np.float32)
    batch[: len(logits)] = logits
    return sample_jit(batch, md, num_logprobs=num_logprobs)


def test_greedy_is_exact_argmax_whatever_the_filters():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 5000)).astype(np.float32) * 5
    logits[3, 17] = logits[3, 4000] = logits[3].max() + 1  # tie: first index wins
    rows = [SamplingRow(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9) for _ in range(16)]
    rows += [SamplingRow(temperature=1e-6, seed=i) for i in range(16)]
    tokens = np.asarray(_sample(logits, rows, 32).token_ids)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert tokens[3] == 17


def test_greedy_after_bias_and_penalties_matches_reference():
    rng = np.random.default_rng(1)
    vocab = 300
    logits = rng.standard_normal((16, vocab)).astype(np.float32)
    rows = []
    for b in range(16):
        hist = rng.integers(0, vocab, size=40)
        top = int(np.argmax(logits[b]))
        rows.append(SamplingRow(
            repetition_penalty=1.0 + b / 4, presence_penalty=0.1 * b, frequency_penalty=0.05 * b,
            prompt_token_ids=[top, *hist[:20]], output_token_ids=[top, *hist[20:]],
            logit_bias={int(hist[0]): 0.5 * (b % 3)}, banned_token_ids=(int(hist[1]),),
        ))
    tokens = np.asarray(_sample(logits, rows, 16).token_ids)
    expected = [np.argmax(processed_logits(logits[b], rows[b])) for b in range(16)]
    np.testing.assert_array_equal(tokens, expected)
    assert (tokens != np.argmax(logits, axis=-1)).sum() >= 12  # the processing changed the picks


def test_seeded_key_contract():
    vocab = 1000
    logits = np.random.default_rng(2).standard_normal(vocab).astype(np.float32)
    pairs = [(5, 0), (123, 9), ((7 << 32) + 5, 3)]  # a seed >= 2**32 folds its high half in
    rows = [SamplingRow(temperature=1.0, seed=s, output_index=i) for s, i in pairs]
    tokens = np.asarray(_sample(np.stack([logits] * 3), rows, 4).token_ids)
    for token, row in zip(tokens, rows):
        key = jax.random.key(row.seed & 0xFFFFFFFF)
        if row.seed >> 32:
            key = jax.random.fold_in(key, row.seed >> 32)
        key = jax.random.fold_in(key, row.output_index)
        # one uniform of that key inverts the CDF of softmax(logits) (float64 here)
        u = float(jax.random.uniform(key, (), jnp.float32))
        p = np.exp(logits.astype(np.float64) - logits.max())
        cdf = np.cumsum(p / p.sum())
        assert token == int(np.searchsorted(cdf, u, side="right"))


def test_seeded_rows_independent_of_batch_and_row():
    vocab = 1000
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((12, vocab)).astype(np.float32)
    rows = [
        SamplingRow(temperature=0.8, top_p=0.95, top_k=200, seed=1000 + i, output_index=i * 3)
        for i in range(12)
    ]
    alone = np.asarray(_sample(logits, rows, 16, step_seed=1).token_ids)[:12]

    # Same requests reversed and interleaved with unseeded, greedy and penalised neighbours,
    # in a bigger batch, with another step seed.
    order = list(range(11, -1, -1))
    mixed_rows, mixed_logits, where = [], [], {}
    for i in order:
        where[i] = len(mixed_rows)
        mixed_rows += [rows[i], SamplingRow(temperature=1.0, presence_penalty=0.5,
                                            output_token_ids=[1, 2, 3]), SamplingRow()]
        mixed_logits += [logits[i], rng.standard_normal(vocab), rng.standard_normal(vocab)]
    mixed = np.asarray(_sample(np.stack(mixed_logits), mixed_rows, 64, step_seed=99).token_ids)
    np.testing.assert_array_equal([mixed[where[i]] for i in range(12)], alone)

    # The seed and the position matter: moving output_index changes most tokens.
    moved = [replace(r, output_index=r.output_index + 1) for r in rows]
    shifted = np.asarray(_sample(logits, moved, 16, step_seed=1).token_ids)[:12]
    assert (shifted != alone).sum() >= 9


def test_unseeded_rows_differ_across_rows_and_steps():
    vocab = 1000
    logits = np.zeros((16, vocab), np.float32)  # uniform
    rows = [SamplingRow(temperature=1.0)] * 16
    a = np.asarray(_sample(logits, rows, 16, step_seed=0).token_ids)
    b = np.asarray(_sample(logits, rows, 16, step_seed=1).token_ids)
    again = np.asarray(_sample(logits, rows, 16, step_seed=0).token_ids)
    np.testing.assert_array_equal(a, again)
    assert len(set(a.tolist())) >= 14 and (a != b).sum() >= 14


def test_padding_rows_are_greedy_and_harmless():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((8, 64)).astype(np.float32)
    rows = [SamplingRow(temperature=1.0, seed=7), SamplingRow(), SamplingRow(top_k=2, temperature=2.0, seed=3)]
    padded = np.asarray(_sample(logits, rows, 8).token_ids)
    tight = np.asarray(_sample(logits[:4], rows, 4).token_ids)
    np.testing.assert_array_equal(padded[:3], tight[:3])
    np.testing.assert_array_equal(padded[3:], np.argmax(logits[3:], axis=-1))


def test_neg_inf_logits_never_nan_and_never_sampled():
    rng = np.random.default_rng(5)
    vocab = 64
    logits = rng.standard_normal((8, vocab)).astype(np.float32)
    logits[:, ::2] = -np.inf  # half the vocabulary impossible
    logits[6] = -np.inf
    logits[6, 5] = 0.0  # a single possible token
    logits[7] = -np.inf  # nothing possible at all
    hist = list(range(0, 20))
    rows = [
        SamplingRow(temperature=0.7, top_k=5, top_p=0.5, min_p=0.1, seed=1),
        SamplingRow(temperature=1.0, top_p=0.9, repetition_penalty=1.3, output_token_ids=hist),
        SamplingRow(temperature=1.0, logit_bias={0: 5.0, 3: 1.0}, banned_token_ids=(1,)),
        SamplingRow(temperature=2.0, min_p=0.5),
        SamplingRow(),
        SamplingRow(temperature=1.0, top_k=100),
        SamplingRow(temperature=1.0, top_p=0.3, top_k=3, min_p=0.2, presence_penalty=1.0),
        SamplingRow(temperature=1.0, top_p=0.3, top_k=3, min_p=0.2),
    ]
    out = _sample(logits, rows, 8, num_logprobs=4)
    tokens = np.asarray(out.token_ids)
    assert (tokens[:7] % 2 == 1).all(), tokens  # only odd (finite) tokens; row 2 bans 1
    assert tokens[2] != 1 and tokens[6] == 5
    assert 0 <= tokens[7] < vocab
    for name in ("logprobs", "ranks", "logprob_token_ids"):
        assert not np.isnan(np.asarray(getattr(out, name), np.float64)).any(), name
    assert np.isneginf(np.asarray(out.logprobs)[7]).all()
