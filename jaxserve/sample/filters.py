"""Top-k / top-p / min-p masks: among each row's largest logits (one partial sort) when top-k
bounds the answer there, else by exact threshold search (no full vocab sort either way)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

_NUM_BISECT_STEPS = 32  # one per bit of a u32 key: the search is exact
# Candidate counts for top-k (then top-p) among a row's largest logits (lax.top_k): the
# smallest that exceeds every active k is used. On the 2-core CPU, [64, 32000] f32 rows:
# lax.top_k takes 3.7 / 9.3 ms for 32 / 256 candidates; the threshold searches of top-k and
# top-p took 15 and 12 ms.
_CANDIDATE_COUNTS = (32, 128)


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


def candidate_thresholds(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                         num_candidates: int) -> tuple[jax.Array, jax.Array]:
    """Top-k, then top-p on what is left, resolved among each row's num_candidates largest
    logits: (ok bool[], threshold f32[B]); a row keeps the logits >= its threshold (the masks
    of top_k_mask then top_p_mask, ties kept). ok is False when some row's answer may lie
    beyond its candidates: a k not below them, top-k's k-th value tied past them, or top-p
    without top-k (its kept set may be most of the row). Within top-k's kept set, top-p's
    whole mass is among the candidates.

    logits f32 [B, V]; top_k i32 [B] (<= 0 or >= V: off; else < num_candidates);
    top_p f32 [B] (>= 1: off).
    """
    vocab_size = logits.shape[1]
    c = min(num_candidates, vocab_size)
    # the barrier keeps top_k's result whole: XLA:CPU runs top_k as one TopK call only while
    # nothing else slices the sort it is written as (else: a full sort of every row, 40x slower)
    vals, _ = lax.optimization_barrier(lax.top_k(logits, c))  # [B, C], descending
    k_on = (top_k > 0) & (top_k < vocab_size)  # [B]
    kth = jnp.take_along_axis(vals, jnp.clip(top_k - 1, 0, c - 1)[:, None], axis=1)[:, 0]
    thr_k = jnp.where(k_on, kth, -jnp.inf)  # [B]
    ok_k = ~k_on | ((top_k < c) & (vals[:, c - 1] < thr_k))  # ties end among the candidates
    cand = jnp.where(vals >= thr_k[:, None], vals, -jnp.inf)  # [B, C]: what top-k keeps
    row_max = jnp.where(jnp.isfinite(vals[:, 0]), vals[:, 0], 0.0)
    q = jnp.exp(cand - row_max[:, None])  # [B, C], unnormalised
    target = top_p * jnp.sum(q, axis=-1)  # [B]: top-k's kept mass lies within
    # vLLM's rule keeps a token iff the mass strictly above it is < target. Before the first
    # member of a tie group lies exactly that mass, so the kept candidates are a prefix whose
    # last value is the threshold (the group's other members share it)
    before = jnp.cumsum(q, axis=-1) - q  # [B, C]: mass of the candidates before each
    kept = before < target[:, None]  # [B, C]
    p_on = top_p < 1.0
    ok_p = ~p_on | k_on  # top-p alone may keep tokens past the candidates
    last = jnp.maximum(jnp.sum(kept, axis=-1) - 1, 0)
    thr_p = jnp.take_along_axis(cand, last[:, None], axis=1)[:, 0]
    threshold = jnp.where(p_on, jnp.maximum(thr_k, thr_p), thr_k)
    return jnp.all(ok_k & ok_p), threshold


def _searched(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p by threshold search over whole rows (each skipped when unused)."""
    neg_inf = jnp.float32(-jnp.inf)
    vocab_size = x.shape[1]
    x = lax.cond(
        jnp.any((top_k > 0) & (top_k < vocab_size)),
        lambda x: jnp.where(top_k_mask(sortable_keys(x), top_k), x, neg_inf),
        lambda x: x,
        x,
    )
    return lax.cond(
        jnp.any(top_p < 1.0),
        lambda x: jnp.where(top_p_mask(x, top_p), x, neg_inf),
        lambda x: x,
        x,
    )


def filter_logits(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    """Apply top-k, then top-p on what is left, then min-p; dropped entries become -inf.

    When every row with top-p also has a top-k, and every k is below a candidate count, top-k
    and top-p are resolved among the candidates (candidate_thresholds); otherwise, or when
    ties or mass reach past them, by threshold search over whole rows. Each part is skipped
    (lax.cond) when no row of the batch uses it.
    """
    neg_inf = jnp.float32(-jnp.inf)
    num_rows, vocab_size = logits.shape  # [B, V]
    k_on = (top_k > 0) & (top_k < vocab_size)
    p_on = top_p < 1.0
    largest_k = jnp.max(jnp.where(k_on, top_k, 0))
    bounded = jnp.any(k_on) & jnp.all(~p_on | k_on)

    def among(c):
        def run(x):
            ok, threshold = candidate_thresholds(x, top_k, top_p, c)
            return lax.cond(ok, lambda x: jnp.where(x >= threshold[:, None], x, neg_inf),
                            lambda x: _searched(x, top_k, top_p), x)
        return run

    counts = [c for c in _CANDIDATE_COUNTS if c < vocab_size]
    branches = [among(c) for c in counts] + [lambda x: _searched(x, top_k, top_p)]
    fits = jnp.array([largest_k < c for c in counts] + [True])
    index = jnp.where(bounded, jnp.argmax(fits), len(counts))  # the smallest that fits
    logits = lax.switch(index, branches, logits)
    return lax.cond(
        jnp.any(min_p > 0.0),
        lambda x: jnp.where(min_p_mask(x, min_p), x, neg_inf),
        lambda x: x,
        logits,
    )
