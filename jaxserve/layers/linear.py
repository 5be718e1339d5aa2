"""Dense projection whose weight layout follows what XLA:CPU's matmul reads fastest per dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rows_major(dtype) -> bool:
    """True: store the weight [out, in] as HF does (param `weight`); False: [in, out] (`kernel`).

    XLA:CPU 0.12 runs these matmuls in YNNPACK. Its bf16 kernel repacks the weight on every call
    whatever the layout, and from [out, in] the bf16 matvecs took ~20% less CPU (perf: the pack
    is most of a decode matvec). Its f32 kernel reads [in, out] as it is, with no packing pass,
    while [out, in] is repacked every call: f32 keeps [in, out].
    """
    return jnp.dtype(dtype) != jnp.float32


class Linear(nnx.Module):
    """y = x @ W (+ bias); W is `weight` [out, in] or `kernel` [in, out] (see rows_major)."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (out_dim, in_dim), dtype=dtype) * (in_dim**-0.5)
        self.rows_major = rows_major(dtype)
        if self.rows_major:
            self.weight = nnx.Param(init)  # [out, in]
        else:
            self.kernel = nnx.Param(init.T)  # [in, out]
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype=dtype)) if bias else None  # [out]

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rows_major:
            y = jnp.einsum("ti,oi->to", x, self.weight[...])  # [T, out]
        else:
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
