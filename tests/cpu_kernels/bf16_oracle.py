"""The float64 oracle the bf16 matmul kernels are checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_matmul(kernel, rows: int, k: int, n: int, atol_per_sqrt_k: float,
                 prepare=None) -> None:
    """kernel(x [rows, k], w [n, k]) on random bf16 values against float64 x @ w^T: f32
    accumulation then one rounding to bf16 (relative 2^-9) of each output. prepare: the
    kernel gets prepare(w) (a weight layout made once at load) instead of w."""
    rng = np.random.default_rng(rows * 1000 + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    y = np.asarray(jax.jit(kernel)(x, w if prepare is None else prepare(w)), np.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(y, want, rtol=2**-8, atol=atol_per_sqrt_k * np.sqrt(k))
