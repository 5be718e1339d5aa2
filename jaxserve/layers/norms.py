"""RMSNorm in the two flavours HF uses: `w * x` (Llama) and `(1 + w) * x` (Gemma)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, offset: bool, dtype, rngs: nnx.Rngs | None = None):
        # Gemma stores w with the 1 removed (identity = zeros); Llama stores it whole (ones).
        init = jnp.zeros if offset else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype=dtype))  # [dim]
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.offset:
            # Gemma: scale in float32, then cast.
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        # Llama: cast back first, then scale in the model dtype.
        return w * normed.astype(x.dtype)
