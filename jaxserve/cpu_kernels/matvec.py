"""The CPU decode matmul kernel (matvec.cc): y = x @ W^T for a few bf16 rows, W read once."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxserve.cpu_kernels import build

SOURCE = Path(__file__).with_name("matvec.cc")
TARGET = "jaxserve_cpu_matvec"
SYMBOL = "JaxserveCpuMatvec"
MAX_ROWS = 8  # the kernel's limit on T; more rows go to XLA's matmul


def ensure_built() -> None:
    """Compile (or load the cached) kernel and register it; raises build.KernelBuildError."""
    build.register(SOURCE, SYMBOL, TARGET)


def matvec(x: jax.Array, w: jax.Array, *, target: str = TARGET) -> jax.Array:
    """x bf16 [T, K] (T <= MAX_ROWS), w bf16 [N, K] -> bf16 [T, N] (f32 accumulation).
    `target`: another registered build of the same source (tests run its portable path)."""
    if target == TARGET:
        ensure_built()
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype))
    return call(x, w)
