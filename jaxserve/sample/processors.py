"""Logits processors applied before greedy / random selection: sparse logit bias and penalties."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.sample.metadata import PenaltyInputs, SparseBias


def _drop_invalid(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """Map padding (-1) and out-of-range ids to vocab_size, which a mode="drop" scatter skips."""
    valid = (token_ids >= 0) & (token_ids < vocab_size)
    return jnp.where(valid, token_ids, vocab_size)


def apply_logit_bias(logits: jax.Array, bias: SparseBias) -> jax.Array:
    """logits[b, id] += value for each (id, value) of row b; banned ids carry -inf."""
    num_rows, vocab_size = logits.shape  # [B, V]
    ids = _drop_invalid(bias.token_ids, vocab_size)  # [B, K]
    rows = jnp.arange(num_rows)[:, None]  # [B, 1]
    return logits.at[rows, ids].add(bias.values, mode="drop")


def apply_penalties(
    logits: jax.Array,
    penalties: PenaltyInputs,
    repetition_penalty: jax.Array,
    frequency_penalty: jax.Array,
    presence_penalty: jax.Array,
) -> jax.Array:
    """vLLM semantics: repetition over prompt + output tokens, frequency / presence over output.

    repetition: a seen token's logit is divided by the penalty when positive, else multiplied.
    frequency: minus penalty * (times the token was generated); presence: minus penalty once.
    """
    num_rows, vocab_size = logits.shape  # [B, V]
    hist_len = penalties.token_ids.shape[1]
    ids = _drop_invalid(penalties.token_ids, vocab_size)  # [B, L]
    in_prompt = jnp.arange(hist_len)[None, :] < penalties.prompt_lens[:, None]  # [B, L]
    output_ids = jnp.where(in_prompt, vocab_size, ids)  # [B, L]
    rows = jnp.arange(num_rows)[:, None]  # [B, 1]
    seen = jnp.zeros((num_rows, vocab_size), bool).at[rows, ids].set(True, mode="drop")
    counts = jnp.zeros((num_rows, vocab_size), jnp.float32)
    counts = counts.at[rows, output_ids].add(1.0, mode="drop")  # [B, V]

    rep = repetition_penalty[:, None]  # [B, 1]
    repeated = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, repeated, logits)
    logits = logits - frequency_penalty[:, None] * counts
    return logits - presence_penalty[:, None] * (counts > 0).astype(jnp.float32)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Structured outputs: tokens whose bit is clear become -inf.

    logits: [B, V]; bitmask: i32[B, ceil(V / 32)], bit t % 32 of word t // 32 set = token t
    allowed (llguidance's / xgrammar's packed layout); rows of all ones leave logits as they are.
    """
    num_rows, vocab_size = logits.shape  # [B, V]
    shifts = jnp.arange(32, dtype=jnp.uint32)  # [32]
    words = bitmask.astype(jnp.uint32)  # [B, W]
    bits = (words[:, :, None] >> shifts[None, None, :]) & jnp.uint32(1)  # [B, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size] == 1  # [B, V]
    return jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
