"""One-uniform categorical draws (two-level inverse CDF) against the exact distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _sample_reference import softmax, total_variation, tv_tolerance

from jaxserve.sample.categorical import CHUNK, sample_from_logits

N = 20000  # draws per distribution


def _draw(logits: np.ndarray, n: int = N, seed: int = 0) -> np.ndarray:
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(jax.jit(sample_from_logits)(rows, keys))


def test_draws_follow_softmax_across_chunks():
    # vocab not a multiple of CHUNK, mass spread over several chunks, some entries excluded
    vocab = 3 * CHUNK + 37
    logits = np.random.default_rng(0).standard_normal(vocab) * 2.0
    logits[::7] = -np.inf
    p = softmax(logits)
    counts = np.bincount(_draw(logits), minlength=vocab)
    assert counts[p == 0].sum() == 0  # excluded entries are never drawn
    tol = tv_tolerance(N, int((p > 0).sum()))  # false failure rate 1e-6
    assert total_variation(counts / N, p) < tol
    assert total_variation(np.roll(counts, 1) / N, p) > 2 * tol  # the check has power


def test_peaked_and_edge_distributions():
    vocab = 2 * CHUNK
    for hot in (0, CHUNK - 1, CHUNK, vocab - 1):  # first / last entry of a chunk
        logits = np.full(vocab, -np.inf)
        logits[hot] = 0.0
        assert set(_draw(logits, 256).tolist()) == {hot}
    logits = np.full(vocab, -np.inf)
    logits[[3, vocab - 1]] = [0.0, np.log(3.0)]  # 1 : 3 across chunks, zeros in between
    counts = np.bincount(_draw(logits), minlength=vocab)
    assert counts.sum() == counts[3] + counts[vocab - 1]
    assert abs(counts[vocab - 1] / N - 0.75) < 0.02


def test_same_key_same_draw_whatever_the_batch():
    logits = np.random.default_rng(1).standard_normal((4, 500)).astype(np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(4))
    together = np.asarray(sample_from_logits(jnp.asarray(logits), keys))
    alone = [int(sample_from_logits(jnp.asarray(logits[i:i + 1]), keys[i:i + 1])[0])
             for i in range(4)]
    assert together.tolist() == alone


def test_first_argmax_is_argmax():
    from jaxserve.sample.categorical import first_argmax

    x = np.random.default_rng(2).standard_normal((6, 300)).astype(np.float32)
    x[1, [5, 200]] = 9.0  # a tie: the first wins
    x[2, 17] = np.nan  # NaN wins, as in argmax
    x[3, :] = -np.inf  # everything filtered
    x[4, [3, 9]] = np.nan
    x[5, -1] = np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(x)), np.argmax(x, axis=-1))
