"""Exact categorical draws from logits with one uniform number per row (two-level inverse CDF).

A Gumbel-max draw needs one random number per vocabulary entry: on the CPU, generating 32000
threefry numbers per row cost more than the model's matmuls of a 64-row decode step. Inverting
the CDF needs one uniform per row: the running sum over chunks of CHUNK probabilities picks the
chunk, the running sum inside it picks the token. Entries with probability 0 (logits -inf,
filtered out) are never chosen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 128


def sample_from_logits(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """logits f32 [B, V] (-inf = excluded; each row has a finite entry), keys key[B] -> i32 [B].

    Token v is drawn with probability softmax(logits)[v], using one uniform of the row's key."""
    rows, vocab = logits.shape
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], 0 where -inf
    p = jnp.pad(p, ((0, 0), (0, -vocab % CHUNK)))
    chunks = p.reshape(rows, -1, CHUNK)  # [B, NC, C]
    ends = jnp.cumsum(chunks.sum(axis=-1), axis=-1)  # [B, NC]: running sum at each chunk's end
    total = ends[:, -1]  # [B]
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * total  # [B]
    u = jnp.minimum(u, jnp.nextafter(total, jnp.float32(0.0)))  # strictly below the total
    # The first chunk whose end exceeds u: it has a positive sum (a zero chunk ends where the one
    # before it does).
    c = jnp.sum(ends <= u[:, None], axis=-1)  # [B]
    before = jnp.where(c > 0, jnp.take_along_axis(ends, jnp.maximum(c - 1, 0)[:, None], 1)[:, 0],
                       0.0)  # [B]
    inside = jnp.take_along_axis(chunks, c[:, None, None], axis=1)[:, 0]  # [B, C]
    j = jnp.sum(jnp.cumsum(inside, axis=-1) <= (u - before)[:, None], axis=-1)  # [B]
    # Rounding of the running sums can step past the chunk's last positive entry: stop there.
    last = CHUNK - 1 - jnp.argmax(inside[:, ::-1] > 0, axis=-1)  # [B]
    return (c * CHUNK + jnp.minimum(j, last)).astype(jnp.int32)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) for f32 [B, V] (first maximum; a row with NaN gives its first NaN,
    as argmax does) as a max and a min reduction, which XLA:CPU vectorises: its argmax reduces
    (value, index) pairs one by one, ~3x slower on a [64, 32000] block."""
    top = jnp.max(x, axis=-1, keepdims=True)  # [B, 1], NaN if the row has one
    hit = (x == top) | jnp.isnan(x)  # [B, V]
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, idx, x.shape[-1]), axis=-1).astype(jnp.int32)  # [B]
