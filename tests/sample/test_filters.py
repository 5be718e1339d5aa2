"""Threshold-search masks (top-k / top-p / min-p) against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sample.filters import min_p_mask, sortable_keys, top_k_mask, top_p_mask


def test_sortable_keys_preserve_order():
    x = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 2.5, 3e38, np.inf], np.float32)
    keys = np.asarray(sortable_keys(jnp.asarray(x))).astype(np.int64)
    assert (np.diff(keys) > 0).all()


def test_top_k_mask_matches_numpy_and_keeps_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(-4, 4, size=(64, 50)).astype(np.float32)  # many ties
    logits[:8, 10:] = -np.inf
    top_k = rng.integers(-1, 60, size=64).astype(np.int32)
    mask = np.asarray(jax.jit(top_k_mask)(sortable_keys(jnp.asarray(logits)), jnp.asarray(top_k)))
    for b in range(64):
        k = top_k[b]
        if 0 < k < 50:
            kth = np.sort(logits[b])[::-1][k - 1]
            expected = logits[b] >= kth
            assert expected.sum() >= k
        else:
            expected = np.ones(50, bool)
        np.testing.assert_array_equal(mask[b], expected, err_msg=f"row {b}, k={k}")


def _numpy_top_p(z, p):
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    desc = np.sort(probs)[::-1]
    exclusive = np.concatenate([[0.0], np.cumsum(desc)[:-1]])
    return probs >= desc[exclusive < p].min(), np.sort(exclusive)


def test_top_p_mask_matches_numpy():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((128, 300)) * 2).astype(np.float32)
    logits[:10, 150:] = -np.inf
    top_p = rng.uniform(0.05, 1.0, size=128).astype(np.float32)
    top_p[:5] = 1.0
    mask = np.asarray(jax.jit(top_p_mask)(jnp.asarray(logits), jnp.asarray(top_p)))
    checked = 0
    for b in range(128):
        if top_p[b] >= 1.0:
            assert mask[b].all()
            continue
        expected, exclusive = _numpy_top_p(logits[b].astype(np.float64), float(top_p[b]))
        if np.min(np.abs(exclusive - top_p[b])) < 1e-5:
            continue  # the boundary is within f32 rounding of top_p: either answer is right
        np.testing.assert_array_equal(mask[b], expected, err_msg=f"row {b}, p={top_p[b]}")
        checked += 1
    assert checked > 100


def test_top_p_keeps_tied_tokens_at_the_edge():
    logits = np.log(np.array([[0.4, 0.2, 0.2, 0.2], [0.5, 0.25, 0.25, 1e-9]], np.float32))
    mask = np.asarray(top_p_mask(jnp.asarray(logits), jnp.asarray([0.5, 0.6], jnp.float32)))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_min_p_mask():
    logits = np.log(np.array([[0.5, 0.25, 0.12, 0.08, 0.05]], np.float32))
    mask = np.asarray(min_p_mask(jnp.asarray(logits), jnp.asarray([0.2], jnp.float32)))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0]])
