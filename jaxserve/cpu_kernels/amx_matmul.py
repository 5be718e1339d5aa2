"""The AMX tile matmul (amx_matmul.cc): y = x @ W^T in bf16 for decode batches and prefill."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax

from jaxserve.cpu_kernels import build

SOURCE = Path(__file__).with_name("amx_matmul.cc")
TARGET = "jaxserve_cpu_amx_matmul"
SYMBOL = "JaxserveCpuAmxMatmul"
logger = logging.getLogger(__name__)

FLAGS = ("-mamx-tile", "-mamx-bf16")
K_MULTIPLE, N_MULTIPLE = 32, 16  # the kernel's shape limits: x [T, K], w [N, K]


def cpu_has_amx() -> bool:
    """The CPU advertises AMX bf16 tiles."""
    return build.cpu_has("amx_bf16", "amx_tile")


def ensure_built() -> None:
    """Compile (or load the cached) kernel, check that Linux grants the tile registers, and
    register it; raises build.KernelBuildError when either fails."""
    lib = build.load_library(SOURCE, extra_flags=FLAGS)
    if not lib.JaxserveAmxReady():
        raise build.KernelBuildError("Linux refused the AMX tile permission (arch_prctl "
                                     "ARCH_REQ_XCOMP_PERM): kernel too old or AMX disabled")
    build.register(SOURCE, SYMBOL, TARGET, extra_flags=FLAGS)


@functools.cache
def available() -> bool:
    """Whether this process can run the kernel: the CPU has AMX, it builds and Linux grants the
    tiles. Decided once per process; a CPU with AMX that cannot use it is logged as a warning."""
    if not cpu_has_amx():
        logger.info("linear: no AMX tiles on this CPU")
        return False
    try:
        ensure_built()
    except build.KernelBuildError as e:
        logger.warning("linear: the AMX matmul kernel is unusable, XLA's slower matmul runs the "
                       "5-64 row projections: %s", e)
        return False
    return True


def shape_ok(x: jax.Array, w: jax.Array) -> bool:
    """x [T, K] and w [N, K] fit the kernel's tiles."""
    return w.shape[1] % K_MULTIPLE == 0 and w.shape[0] % N_MULTIPLE == 0


def amx_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x bf16 [T, K], w bf16 [N, K] (K % 32 == 0, N % 16 == 0) -> bf16 [T, N]."""
    ensure_built()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype))
    return call(x, w)
