"""Dense projection with the kernel stored [in, out] (HF stores [out, in])."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). Weights are filled by the loader; init here only shapes them."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (in_dim, out_dim), dtype=dtype) * (in_dim**-0.5)
        )  # [in, out]
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype=dtype)) if bias else None  # [out]

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("ti,io->to", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding table [vocab, hidden]; doubles as a tied lm_head."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype=dtype))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], token_ids, axis=0)  # [T, hidden]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("td,vd->tv", x, self.embedding[...])  # [T, vocab]
