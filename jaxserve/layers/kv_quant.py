"""Quantized KV cache (int8 / fp8 e4m3): page dtypes, per-(token, kv head) scales, quantize.

Scale granularity: one float32 scale per (token, kv head), stored in the page row itself: a
quantized page is `[num_kv_heads, num_blocks, block_size, head_dim + 4]` of int8 / fp8, each
row the token's head_dim values then its scale's 4 bytes. Why this and not a scale per block or
a fixed scale per head:
- a page write stays one plain scatter: each token's K/V vector is quantized on its own
  (scale = max |x| / qmax over head_dim) and written with its scale at its slot. A per-block
  scale would have to grow as a partial block fills (chunked prefill and decode append to the
  same block), forcing a re-quantization of the tokens already there; a fixed per-head scale
  needs a calibration set we do not have (vLLM's default without one is 1.0, which clips int8).
- a slot's bytes depend only on that token's K/V, so prefix caching (sharing full blocks by
  hash) and preemption by recompute are unchanged: recomputed or shared blocks hold the same
  bytes whatever else was in the batch.
- the scale in the row (not in an array beside the pages): one scatter writes a token, one
  gather per chunk reads values and scales together, and the cache keeps its per-layer
  (k_pages, v_pages) structure, so the runner, donation and `tp` sharding are unchanged.
  fp8 rows are stored as uint8 bit patterns: XLA:CPU gathers and unpacks those ~1.7x faster
  than float8_e4m3fn arrays.
- the cost is 4 bytes per (token, kv head) on top of head_dim bytes: +6% at head_dim 64,
  +3% at 128 (counted in the KV budget by `bytes_per_token`).
Attention reads the quantized pages and dequantizes one gathered chunk at a time (blockwise
XLA path): scores = (q . k_values) * k_scale, and the softmax weights times v_scale meet
v_values; never a full-precision copy of the cache. The CPU kernel (cpu_kernels/paged_attention)
does the same a block at a time, and writes the pages itself with this module's quantizer, bit
for bit, keeping K's values transposed inside each block (its own layout, read only by it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")  # vLLM's names (fp8 is e4m3)
# fp8 pages hold e4m3 bit patterns as uint8 (XLA:CPU gathers and unpacks those faster)
_PAGE_DTYPES = {"int8": jnp.int8, "fp8": jnp.uint8, "fp8_e4m3": jnp.uint8}
_VALUE_DTYPES = {jnp.dtype(jnp.int8): jnp.int8, jnp.dtype(jnp.uint8): jnp.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": 448.0, "fp8_e4m3": 448.0}  # e4m3fn's largest finite value
SCALE_DTYPE = jnp.float32
SCALE_BYTES = 4  # a float32 scale, stored as the last 4 entries of a page row


def check_kv_cache_dtype(name: str) -> str:
    """The validated name (ValueError naming the field otherwise)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    return name


def is_quantized(name: str) -> bool:
    """Whether a kv_cache_dtype name stores quantized pages (int8 / fp8)."""
    return check_kv_cache_dtype(name) != "auto"


def page_dtype(kv_cache_dtype: str, model_dtype) -> np.dtype:
    """dtype of the K/V pages: the model's for "auto", else int8 / uint8 (fp8 e4m3 bits)."""
    if not is_quantized(kv_cache_dtype):
        return jnp.dtype(model_dtype)
    return jnp.dtype(_PAGE_DTYPES[kv_cache_dtype])


def page_row(kv_cache_dtype: str, head_dim: int) -> int:
    """Entries of one page row: head_dim, + 4 scale bytes when quantized."""
    return head_dim + (SCALE_BYTES if is_quantized(kv_cache_dtype) else 0)


def is_quantized_page(dtype) -> bool:
    """Whether pages of this dtype hold quantized rows (values + scale bytes)."""
    return jnp.dtype(dtype) in _VALUE_DTYPES


def value_dtype(page_dtype_) -> np.dtype:
    """The values' dtype in quantized pages of `page_dtype_`: int8, or float8_e4m3fn."""
    return jnp.dtype(_VALUE_DTYPES[jnp.dtype(page_dtype_)])


def bytes_per_token(kv_cache_dtype: str, model_dtype, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token takes in one layer's K and V (values + scales)."""
    item = page_dtype(kv_cache_dtype, model_dtype).itemsize
    return 2 * num_kv_heads * page_row(kv_cache_dtype, head_dim) * item


def quantize_tokens(x: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """x [T, Hkv, D] -> (values [T, Hkv, D] in `dtype`, scales f32 [T, Hkv]).

    Symmetric: value = x * (1 / scale) with scale = max |x| * (1 / qmax) over head_dim, all in
    f32 (int8 rounds to nearest even and clips to +-127; fp8 clips to +-448 and casts, rounding
    to nearest even). An all-zero vector gets scale 0 and zero values. Dequantized: value *
    scale. The reciprocal is explicit: XLA rewrites x / scale into that anyway, and the CPU
    kernel's quantizer (cpu_kernels/kv_quant.h) follows this rule bit for bit.
    """
    name = "int8" if jnp.dtype(dtype) == jnp.int8 else "fp8"
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) * jnp.float32(1.0 / _QMAX[name])  # [T, Hkv]
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)  # [T, Hkv]
    y = jnp.where(scale[..., None] > 0, xf * inv[..., None], 0.0)
    if name == "int8":
        y = jnp.clip(jnp.round(y), -127.0, 127.0)
    else:
        y = jnp.clip(y, -_QMAX[name], _QMAX[name])
    return y.astype(dtype), scale.astype(SCALE_DTYPE)


def pack_rows(values: jax.Array, scales: jax.Array) -> jax.Array:
    """values [..., D] (int8 / fp8), scales f32 [...] -> page rows [..., D + 4] (int8 / uint8)."""
    page = jnp.int8 if values.dtype == jnp.int8 else jnp.uint8
    raw = lax.bitcast_convert_type(scales.astype(SCALE_DTYPE), page)  # [..., 4]
    return jnp.concatenate([lax.bitcast_convert_type(values, page), raw], axis=-1)


def unpack_rows(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """page rows [..., D + 4] -> (values [..., D] int8 / float8_e4m3fn, scales f32 [...])."""
    values = lax.bitcast_convert_type(rows[..., :-SCALE_BYTES], value_dtype(rows.dtype))
    return values, lax.bitcast_convert_type(rows[..., -SCALE_BYTES:], SCALE_DTYPE)


def dequantize(rows: jax.Array) -> jax.Array:
    """Quantized page rows [..., D + 4] -> float32 values * scales [..., D]."""
    values, scales = unpack_rows(rows)
    return values.astype(jnp.float32) * scales[..., None]
