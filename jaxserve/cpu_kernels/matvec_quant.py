"""Quantized-weight CPU kernels: the few-row matmul and the bf16 dequantization (C++, XLA FFI)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cpu_kernels import build

SOURCE = Path(__file__).with_name("matvec_quant.cc")
TARGET = "jaxserve_cpu_matvec_quant"
SYMBOL = "JaxserveCpuMatvecQuant"
DEQUANT_SOURCE = Path(__file__).with_name("dequant_bf16.cc")
DEQUANT_TARGET = "jaxserve_cpu_dequant_bf16"
DEQUANT_SYMBOL = "JaxserveCpuDequantBf16"
MAX_ROWS = 64  # the kernel's limit on T (it runs 8 rows at a time over cached weight rows)
METHOD_IDS = {"int8": 0, "int4": 1, "fp8": 2}


def ensure_built() -> None:
    """Compile (or load the cached) kernel and register it; raises build.KernelBuildError."""
    build.register(SOURCE, SYMBOL, TARGET)
    build.register(DEQUANT_SOURCE, DEQUANT_SYMBOL, DEQUANT_TARGET)


def matvec_quant(x: jax.Array, qweight: jax.Array, scales: jax.Array,
                 zeros: jax.Array | None, method: str, *, target: str = TARGET) -> jax.Array:
    """x bf16 [T, in] (T <= MAX_ROWS) times the weight that (qweight, scales, zeros) stand for
    (layouts in layers/quant_scheme.py: qweight int8 [out, in] | uint8 [out, in / 2] (int4) |
    uint8 [out, in] (fp8 bits); scales f32 [out, G]; zeros f32 [out, G] or None) -> f32 [T, out].
    `target`: another registered build of the same source (tests run its portable path)."""
    if method not in METHOD_IDS:
        raise ValueError(f"matvec_quant: method {method!r} is not one of {sorted(METHOD_IDS)}")
    if x.dtype != jnp.bfloat16 or x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"matvec_quant: x must be bf16 [T <= {MAX_ROWS}, in], got "
                         f"{x.dtype} {x.shape}")
    if target == TARGET:
        ensure_built()
    out_dim = qweight.shape[0]
    if zeros is None:
        zeros = jnp.zeros((out_dim, 0), jnp.float32)  # [out, 0]: symmetric
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], out_dim), jnp.float32))
    return call(x, qweight, scales.astype(jnp.float32), zeros.astype(jnp.float32),
                method=np.int32(METHOD_IDS[method]))


def dequant_bf16(qweight: jax.Array, scales: jax.Array, zeros: jax.Array | None, method: str,
                 *, target: str = DEQUANT_TARGET) -> jax.Array:
    """The weight (qweight, scales, zeros) stand for as bf16 [out, in], each element
    (value - zero) * scale rounded once (to nearest even)."""
    if method not in METHOD_IDS:
        raise ValueError(f"dequant_bf16: method {method!r} is not one of {sorted(METHOD_IDS)}")
    if target == DEQUANT_TARGET:
        ensure_built()
    out_dim, packed = qweight.shape
    in_dim = packed * 2 if method == "int4" else packed
    if zeros is None:
        zeros = jnp.zeros((out_dim, 0), jnp.float32)  # [out, 0]: symmetric
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((out_dim, in_dim), jnp.bfloat16))
    return call(qweight, scales.astype(jnp.float32), zeros.astype(jnp.float32),
                method=np.int32(METHOD_IDS[method]))
