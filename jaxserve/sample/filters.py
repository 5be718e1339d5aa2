"""Top-k / top-p / min-p masks found by exact threshold search instead of a full vocab sort."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

_NUM_BISECT_STEPS = 32  # one per bit of a u32 key: the search is exact


def sortable_keys(x: jax.Array) -> jax.Array:
    """Map f32 to u32 so that integer order equals float order (-inf lowest, +inf highest)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_true(pred: Callable[[jax.Array], jax.Array], num_rows: int) -> jax.Array:
    """Per row, the largest u32 t with pred(t) true; pred is non-increasing in t, pred(0) true."""

    def step(_, bounds):
        lo, hi = bounds  # u32[B] each; the answer lies in [lo, hi]
        span = hi - lo
        mid = lo + span // 2 + (span & 1)  # ceil midpoint without overflow
        ok = pred(mid)  # bool[B]
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros((num_rows,), jnp.uint32)
    hi = jnp.full((num_rows,), 0xFFFFFFFF, jnp.uint32)
    lo, _ = lax.fori_loop(0, _NUM_BISECT_STEPS, step, (lo, hi))
    return lo  # u32[B]


def top_k_mask(keys: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep the top_k largest entries per row, plus everything tied with the k-th (vLLM keeps ties).

    keys: u32[B, V] from sortable_keys; top_k: i32[B], <= 0 or >= V means off.
    """
    num_rows, vocab_size = keys.shape
    k = jnp.where((top_k <= 0) | (top_k >= vocab_size), vocab_size, top_k)  # [B]

    def at_least_k(t):  # u32[B] -> bool[B]
        return jnp.sum(keys >= t[:, None], axis=-1) >= k

    threshold = _largest_true(at_least_k, num_rows)  # u32[B]: the k-th largest key
    return keys >= threshold[:, None]  # bool[B, V]


def _relative_probs(logits: jax.Array) -> jax.Array:
    """exp(logits - row max), 0 where the logit is -inf; rows of all -inf give all zeros."""
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    return jnp.exp(logits - row_max)  # [B, V]


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (ties at the edge kept).

    A token is kept iff the mass of tokens strictly more likely than it is < top_p (vLLM's rule);
    as a threshold: the largest t with mass(key >= t) >= top_p * total. top_p >= 1 means off.
    """
    num_rows = logits.shape[0]
    keys = sortable_keys(logits)  # u32[B, V]
    probs = _relative_probs(logits)  # [B, V], unnormalised
    target = top_p * jnp.sum(probs, axis=-1)  # [B]

    def mass_reaches_target(t):  # u32[B] -> bool[B]
        mass = jnp.sum(jnp.where(keys >= t[:, None], probs, 0.0), axis=-1)
        return mass >= target

    threshold = _largest_true(mass_reaches_target, num_rows)  # u32[B]
    return (keys >= threshold[:, None]) | (top_p >= 1.0)[:, None]  # bool[B, V]


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens whose probability is >= min_p times the most likely token's; min_p <= 0 = off."""
    return _relative_probs(logits) >= min_p[:, None]  # bool[B, V]


def filter_logits(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    """Apply top-k, then top-p on what is left, then min-p; dropped entries become -inf.

    Each search is skipped (lax.cond) when no row of the batch uses it.
    """
    neg_inf = jnp.float32(-jnp.inf)
    num_rows, vocab_size = logits.shape  # [B, V]
    k_active = jnp.any((top_k > 0) & (top_k < vocab_size))
    logits = lax.cond(
        k_active,
        lambda x: jnp.where(top_k_mask(sortable_keys(x), top_k), x, neg_inf),
        lambda x: x,
        logits,
    )
    logits = lax.cond(
        jnp.any(top_p < 1.0),
        lambda x: jnp.where(top_p_mask(x, top_p), x, neg_inf),
        lambda x: x,
        logits,
    )
    return lax.cond(
        jnp.any(min_p > 0.0),
        lambda x: jnp.where(min_p_mask(x, min_p), x, neg_inf),
        lambda x: x,
        logits,
    )
