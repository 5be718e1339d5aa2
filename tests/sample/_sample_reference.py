"""Float64 numpy reference of the sampler's filtered distribution, plus sampling test helpers."""

from __future__ import annotations

import math

import numpy as np

from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.sampler import sample_jit

NUM_DRAWS = 8192  # rows per vectorised statistical draw (one compile per metadata variant)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = np.max(z)
    if not np.isfinite(m):
        return np.zeros_like(z)
    e = np.exp(z - m)
    return e / e.sum()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def processed_logits(logits: np.ndarray, row: SamplingRow) -> np.ndarray:
    """Bias / banned ids, then vLLM penalties, in float64."""
    x = np.asarray(logits, np.float64).copy()
    for tok, val in (row.logit_bias or {}).items():
        x[tok] += val
    x[list(row.banned_token_ids)] = -np.inf
    seen = set(row.prompt_token_ids) | set(row.output_token_ids)
    for tok in seen:
        x[tok] = x[tok] / row.repetition_penalty if x[tok] > 0 else x[tok] * row.repetition_penalty
    counts = np.bincount(np.asarray(row.output_token_ids, np.int64), minlength=len(x))
    x -= row.frequency_penalty * counts
    x -= row.presence_penalty * (counts > 0)
    return x


def reference_probs(logits: np.ndarray, row: SamplingRow) -> np.ndarray:
    """The distribution a row samples from: temperature, top-k, top-p, min-p (vLLM rules, ties kept)."""
    x = processed_logits(logits, row)
    v = len(x)
    if row.temperature < 1e-5:
        out = np.zeros(v)
        out[np.argmax(x)] = 1.0
        return out
    z = x / row.temperature
    if 0 < row.top_k < v:
        kth = np.sort(z)[::-1][row.top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    if row.top_p < 1.0:
        p = softmax(z)
        desc = np.sort(p)[::-1]
        exclusive = np.concatenate([[0.0], np.cumsum(desc)[:-1]])
        threshold = desc[exclusive < row.top_p].min()
        z = np.where(p >= threshold, z, -np.inf)
    if row.min_p > 0:
        rel = np.exp(z - np.max(z))
        z = np.where(rel >= row.min_p, z, -np.inf)
    return softmax(z)


def draw_counts(logits: np.ndarray, row: SamplingRow, n: int = NUM_DRAWS, step_seed: int = 0):
    """Sample the same row n times in one call (each row its own key); token counts [V]."""
    md = build_sampling_metadata([row] * n, n, step_seed)
    batch = np.broadcast_to(np.asarray(logits, np.float32), (n, len(logits)))
    tokens = np.asarray(sample_jit(batch, md, num_logprobs=0).token_ids)
    return np.bincount(tokens, minlength=len(logits))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def tv_tolerance(n: int, support: int, delta: float = 1e-6) -> float:
    """Bound on TV(empirical, true) that holds with probability >= 1 - delta.

    E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / n) <= 0.5 * sqrt(support / n) (Cauchy-Schwarz), and
    TV moves by at most 1/n when one draw changes, so McDiarmid gives
    P(TV > E[TV] + t) <= exp(-2 n t^2), i.e. t = sqrt(ln(1/delta) / (2 n)).
    With n = 8192 and a support of ~10 tokens this is ~0.047: a correct sampler fails with
    probability < 1e-6 (and the keys are fixed, so a run is deterministic anyway).
    """
    return 0.5 * math.sqrt(support / n) + math.sqrt(math.log(1 / delta) / (2 * n))


def assert_matches_reference(logits, row, wrong_rows=(), n: int = NUM_DRAWS):
    """Empirical frequencies match the reference within tv_tolerance; tokens outside its support
    never appear; and each plausible-but-wrong variant is > 2 tolerances away (the test has power).
    """
    expected = reference_probs(logits, row)
    support = int((expected > 0).sum())
    tol = tv_tolerance(n, support)
    for wrong in wrong_rows:  # a SamplingRow or a probability vector
        alt = reference_probs(logits, wrong) if isinstance(wrong, SamplingRow) else wrong
        gap = total_variation(expected, alt)
        assert gap > 2 * tol, f"test cannot tell {wrong} apart (gap {gap:.3f}, tol {tol:.3f})"
    counts = draw_counts(logits, row, n)
    outside = counts[expected == 0].sum()
    assert outside == 0, f"{outside} draws outside the support {np.flatnonzero(expected)}"
    tv = total_variation(counts / n, expected)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}\nexpected {expected}\ngot {counts / n}"
    return counts
