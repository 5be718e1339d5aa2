"""The AVX-512 BF16 matmul (dpbf16_matmul.cc): y = x @ W^T in bf16 for decode batches on CPUs
with vdpbf16ps but no AMX tiles (AMD Zen 4 / 5, Intel Cooper Lake)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax

from jaxserve.cpu_kernels import build

SOURCE = Path(__file__).with_name("dpbf16_matmul.cc")
TARGET = "jaxserve_cpu_dpbf16_matmul"
SYMBOL = "JaxserveCpuDpbf16Matmul"
logger = logging.getLogger(__name__)


def cpu_has_avx512_bf16() -> bool:
    """The CPU advertises AVX-512 BF16."""
    return build.cpu_has("avx512_bf16")


def ensure_built() -> None:
    """Compile (or load the cached) kernel and register it; raises build.KernelBuildError."""
    build.register(SOURCE, SYMBOL, TARGET)


@functools.cache
def available() -> bool:
    """Whether this process can run the kernel: the CPU has AVX-512 BF16 and the kernel builds.
    Decided once per process; a build failure is logged as a warning."""
    if not cpu_has_avx512_bf16():
        return False
    try:
        ensure_built()
    except build.KernelBuildError as e:
        logger.warning("linear: the AVX-512 BF16 matmul kernel is unusable: %s", e)
        return False
    return True


def dpbf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x bf16 [T, K], w bf16 [N, K] -> bf16 [T, N] (f32 accumulation)."""
    ensure_built()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype))
    return call(x, w)
