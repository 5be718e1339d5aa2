"""Logprobs of chosen tokens plus the top-k, with vLLM ranks, from unmodified logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def safe_log_softmax(logits: jax.Array) -> jax.Array:
    """log_softmax over the last axis that gives -inf (not NaN) for a row of all -inf."""
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [N, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    shifted = logits - row_max  # [N, V]
    total = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)  # [N, 1]
    log_total = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)
    return shifted - log_total


def gather_logprobs(
    logprobs: jax.Array, token_ids: jax.Array, num_logprobs: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows of [chosen token, top-1, ..., top-num_logprobs].

    logprobs: f32[N, V]; token_ids: i32[N]. Returns ids i32[N, 1+k], logprobs f32[N, 1+k],
    ranks i32[N, 1+k]; the chosen token's rank is 1 + the number of strictly more likely tokens,
    the top-k columns have ranks 1..k.
    """
    num_rows, vocab_size = logprobs.shape
    token_ids = jnp.clip(token_ids, 0, vocab_size - 1).astype(jnp.int32)  # [N]
    chosen_lp = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)  # [N, 1]
    chosen_rank = 1 + jnp.sum(logprobs > chosen_lp, axis=-1, dtype=jnp.int32)  # [N]
    top_lp, top_ids = lax.top_k(logprobs, num_logprobs)  # [N, k] each
    top_ranks = jnp.broadcast_to(
        jnp.arange(1, num_logprobs + 1, dtype=jnp.int32), (num_rows, num_logprobs)
    )
    ids = jnp.concatenate([token_ids[:, None], top_ids.astype(jnp.int32)], axis=-1)
    lps = jnp.concatenate([chosen_lp, top_lp], axis=-1)
    ranks = jnp.concatenate([chosen_rank[:, None], top_ranks], axis=-1)
    return ids, lps, ranks
