"""Rotary embedding: the rotation HF Llama applies, with its cos / sin tables computed once per
token (not once per element of a [tokens, heads, dim] input)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import RopeConfig
from jaxserve.layers.rotary import apply_rotary, inverse_frequencies


def _rotate_by_definition(x: np.ndarray, positions: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """x [T, H, D] (float64): pairs (i, i + D/2) rotated by angle position * inv[i]."""
    half = x.shape[-1] // 2
    angle = positions[:, None, None] * inv[None, None, :]  # [T, 1, D/2]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           a * np.sin(angle) + b * np.cos(angle)], axis=-1)


def test_rotation_matches_its_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6, 64)).astype(np.float32)
    positions = np.array([0, 1, 2, 7, 100, 513, 2047, 9], np.int32)
    inv = inverse_frequencies(RopeConfig(theta=10000.0), 64)
    got = np.asarray(jax.jit(lambda x, p: apply_rotary(x, p, inv))(x, positions), np.float64)
    want = _rotate_by_definition(x.astype(np.float64), positions.astype(np.float64),
                                 inv.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_cos_and_sin_are_evaluated_per_token_not_per_element():
    """XLA fuses elementwise producers into their consumer: without a barrier it evaluated cos
    and sin once per element of x [T, H, D], H times the work (~25 us per call at 8 tokens)."""
    x = jax.ShapeDtypeStruct((8, 6, 64), jnp.float32)
    positions = jax.ShapeDtypeStruct((8,), jnp.int32)
    inv = inverse_frequencies(RopeConfig(theta=10000.0), 64)
    hlo = jax.jit(lambda x, p: apply_rotary(x, p, inv)).lower(x, positions).compile().as_text()
    # the computations that evaluate cos / sin, and the shape each produces
    roots = [re.search(r"ROOT \S+ = (f32\[[\d,]*\])", comp).group(1)
             for comp in hlo.split("\n\n") if re.search(r" (?:cosine|sine)\(", comp)]
    assert len(roots) == 2 and set(roots) == {"f32[8,64]"}, roots
