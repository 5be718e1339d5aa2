"""The CPU paged-attention kernel (paged_attention.cc): K/V page write + ragged attention.

Same contract as `pallas_kernels.ragged_paged_attention_reference` for the attention, plus the
write of this step's K/V into their slots, in one FFI call per layer. Pages are float (the
model's dtype) or quantized (int8 / fp8 e4m3 rows with their f32 scales, layers/kv_quant.py):
the kernel quantizes this step's K/V itself and reads the quantized bytes block by block.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxserve.cpu_kernels import build
from jaxserve.layers.kv_quant import SCALE_BYTES, is_quantized_page

SOURCE = Path(__file__).with_name("paged_attention.cc")
TARGET = "jaxserve_cpu_paged_attention"
SYMBOL = "JaxserveCpuPagedAttention"
DTYPES = ("bfloat16", "float32")


def ensure_built() -> None:
    """Compile (or load the cached) kernel and register it; raises build.KernelBuildError."""
    build.register(SOURCE, SYMBOL, TARGET)


def write_and_attend(q, k, v, k_pages, v_pages, slot_mapping, block_tables, seq_lens,
                     query_start_loc, *, scale: float, sliding_window: int | None = None,
                     logits_soft_cap: float | None = None, target: str = TARGET):
    """q [T, Hq, D]; k, v [T, Hkv, D]; pages [Hkv, NB, bs, D] in the model's dtype, or int8 /
    uint8 (fp8 e4m3 bits) [Hkv, NB, bs, D + 4] -> (out [T, Hq, D], k_pages, v_pages) with this
    step's K/V written (in place when the cache is donated). K pages are in the kernel's layout
    (`k_pages_layout`). `target`: another registered build of the same source (tests run the
    portable paths through it)."""
    if target == TARGET:
        ensure_built()  # the target must exist before the step is lowered or run
    # q, new K/V and out in one float dtype: the pages' for float pages, q's for quantized ones
    dt = q.dtype if is_quantized_page(k_pages.dtype) else k_pages.dtype
    call = jax.ffi.ffi_call(
        target,
        (jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
         jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={3: 1, 4: 2},
    )
    i32 = np.int32
    out, k_pages, v_pages = call(
        q.astype(dt), k.astype(dt), v.astype(dt), k_pages, v_pages,
        slot_mapping.astype(i32), block_tables.astype(i32), seq_lens.astype(i32),
        query_start_loc.astype(i32),
        scale=np.float32(scale), sliding_window=i32(sliding_window or 0),
        soft_cap=np.float32(logits_soft_cap or 0.0),
    )
    return out.astype(q.dtype), k_pages, v_pages


def k_pages_layout(k_pages: np.ndarray) -> np.ndarray:
    """K pages [Hkv, NB, bs, D] in the usual layout -> the kernel's (each block transposed to
    [D / P, bs, P] with P = 2 for bfloat16, 1 for float32; same shape as the input). Quantized
    rows [Hkv, NB, bs, D + 4] -> per block the values transposed in pairs [D / 2, bs, 2], then
    the bs scales' bytes."""
    if is_quantized_page(k_pages.dtype):
        return _quantized_k_layout(k_pages)
    kvh, nb, bs, d = k_pages.shape
    p = 2 if k_pages.dtype.itemsize == 2 else 1
    t = k_pages.reshape(kvh, nb, bs, d // p, p).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(t).reshape(kvh, nb, bs, d)


def _quantized_k_layout(k_pages: np.ndarray) -> np.ndarray:
    kvh, nb, bs, row = k_pages.shape
    d = row - SCALE_BYTES
    values = k_pages[..., :d].reshape(kvh, nb, bs, d // 2, 2).transpose(0, 1, 3, 2, 4)
    values = values.reshape(kvh, nb, bs * d)  # [.., D / 2, bs, 2]
    scales = k_pages[..., d:].reshape(kvh, nb, bs * SCALE_BYTES)
    return np.ascontiguousarray(np.concatenate([values, scales], -1)).reshape(kvh, nb, bs, row)


def k_pages_from_layout(k_pages: np.ndarray) -> np.ndarray:
    """Inverse of `k_pages_layout` for quantized pages (tests read the kernel's K rows)."""
    kvh, nb, bs, row = k_pages.shape
    d = row - SCALE_BYTES
    flat = k_pages.reshape(kvh, nb, bs * row)
    values = flat[..., :bs * d].reshape(kvh, nb, d // 2, bs, 2).transpose(0, 1, 3, 2, 4)
    values = values.reshape(kvh, nb, bs, d)
    scales = flat[..., bs * d:].reshape(kvh, nb, bs, SCALE_BYTES)
    return np.ascontiguousarray(np.concatenate([values, scales], -1))
