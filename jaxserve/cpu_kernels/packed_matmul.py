"""The packed-weight bf16 matmul (packed_matmul.cc): y = x @ W^T for any row count, with W
packed once at load into panels of 16 output columns (CPUs with AVX-512 BF16 but no AMX)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cpu_kernels import amx_matmul, build
from jaxserve.cpu_kernels import dpbf16_matmul

SOURCE = Path(__file__).with_name("packed_matmul.cc")
TARGET = "jaxserve_cpu_packed_matmul"
SYMBOL = "JaxserveCpuPackedMatmul"
GLU_TARGET = "jaxserve_cpu_packed_glu_matmul"
GLU_SYMBOL = "JaxserveCpuPackedGluMatmul"
PANEL = 16  # output columns per panel: one 64-byte vector of bf16 pairs
logger = logging.getLogger(__name__)


def ensure_built() -> None:
    """Compile (or load the cached) kernel and register it; raises build.KernelBuildError."""
    build.register(SOURCE, SYMBOL, TARGET)
    build.register(SOURCE, GLU_SYMBOL, GLU_TARGET)


@functools.cache
def available() -> bool:
    """Whether bf16 weights are packed for this kernel: the CPU has AVX-512 BF16 and no AMX
    (with AMX the tile kernel reads the weight as stored), and the kernel builds. Decided once
    per process; a build failure is logged as a warning."""
    if not dpbf16_matmul.cpu_has_avx512_bf16() or amx_matmul.available():
        return False
    try:
        ensure_built()
    except build.KernelBuildError as e:
        logger.warning("linear: the packed-weight matmul kernel is unusable: %s", e)
        return False
    return True


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    """The packed layout of a [n, k] weight: [ceil(n / 16), ceil(k / 2), 32]."""
    return (-(-n // PANEL), -(-k // 2), 2 * PANEL)


@jax.jit
def pack(w: jax.Array) -> jax.Array:
    """bf16 w [N, K] -> wp [ceil(N/16), ceil(K/2), 32] with wp[p, j, 2c:2c+2] =
    w[16p + c, 2j:2j+2] (zero past N and K). One jitted transpose per weight shape (XLA's is
    ~10x numpy's on these 2-byte elements; the small model's 85 weights pack in ~0.1 s)."""
    n, k = w.shape
    p, k2, _ = packed_shape(n, k)
    padded = jnp.pad(jnp.asarray(w, jnp.bfloat16), ((0, p * PANEL - n), (0, 2 * k2 - k)))
    # [P, 16, K2, 2] -> [P, K2, 16, 2]
    return padded.reshape(p, PANEL, k2, 2).transpose(0, 2, 1, 3).reshape(p, k2, 2 * PANEL)


def unpack(wp: np.ndarray, n: int, k: int) -> np.ndarray:
    """The inverse of pack: wp [ceil(N/16), ceil(K/2), 32] -> w [n, k]."""
    p, k2, _ = wp.shape
    return wp.reshape(p, k2, PANEL, 2).transpose(0, 2, 1, 3).reshape(p * PANEL, 2 * k2)[:n, :k]


@jax.jit
def interleave(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The gated kernel's weight: packed gate and up [P, K2, 32] -> [2P, K2, 32] with gate panel
    i at 2i and up panel i at 2i + 1."""
    return jnp.stack([gate, up], axis=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def packed_matmul(x: jax.Array, wp: jax.Array, n: int, out_dtype=None) -> jax.Array:
    """x bf16 [T, K], wp = pack(w [n, K]) -> [T, n] (f32 accumulation) in out_dtype: bf16 (the
    default) or f32 (no rounding: logits)."""
    ensure_built()
    out = jnp.dtype(out_dtype or x.dtype)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), out))
    return call(x, wp)


def packed_glu_matmul(x: jax.Array, wp: jax.Array, m: int) -> jax.Array:
    """x bf16 [T, K], wp = interleave(pack(gate [m, K]), pack(up [m, K])) -> bf16 [T, m]:
    silu(x @ gate^T) * (x @ up^T), in f32 until the one rounding."""
    ensure_built()
    call = jax.ffi.ffi_call(GLU_TARGET, jax.ShapeDtypeStruct((x.shape[0], m), x.dtype))
    return call(x, wp)
