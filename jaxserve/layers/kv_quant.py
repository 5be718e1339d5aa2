"""Quantized KV cache (int8 / fp8 e4m3): page dtypes, per-(token, kv head) scales, quantize.

Scale granularity: one float32 scale per (token, kv head), kept in arrays beside the pages,
`[num_kv_heads, num_blocks, block_size]` (the page layout without head_dim). Why this and not a
scale per block or a fixed scale per head:
- a page write stays a plain scatter: each token's K/V vector is quantized on its own (scale =
  max |x| / qmax over head_dim) and written with its scale at its slot. A per-block scale would
  have to grow as a partial block fills (chunked prefill and decode append to the same block),
  forcing a re-quantization of the tokens already there; a fixed per-head scale needs a
  calibration set we do not have (vLLM's default without one is scale 1.0, which clips int8).
- a slot's bytes depend only on that token's K/V, so prefix caching (sharing full blocks by
  hash) and preemption by recompute are unchanged: recomputed or shared blocks hold the same
  bytes whatever else was in the batch.
- the cost is 4 bytes per (token, kv head) on top of head_dim bytes: +6% at head_dim 64,
  +3% at 128 (counted in the KV budget by `kv_cache_bytes_per_token`).
Attention reads the quantized pages and dequantizes one gathered chunk at a time (blockwise
CPU path), never a full-precision copy of the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")  # vLLM's names (fp8 is e4m3)
_PAGE_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": 448.0, "fp8_e4m3": 448.0}  # e4m3fn's largest finite value
SCALE_DTYPE = jnp.float32


def check_kv_cache_dtype(name: str) -> str:
    """The validated name (ValueError naming the field otherwise)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    return name


def is_quantized(name: str) -> bool:
    return check_kv_cache_dtype(name) != "auto"


def page_dtype(kv_cache_dtype: str, model_dtype) -> np.dtype:
    """dtype of the K/V pages: the model's for "auto", else int8 / float8_e4m3fn."""
    if not is_quantized(kv_cache_dtype):
        return jnp.dtype(model_dtype)
    return jnp.dtype(_PAGE_DTYPES[kv_cache_dtype])


def bytes_per_token(kv_cache_dtype: str, model_dtype, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token takes in one layer's K and V (pages + scales)."""
    per_head = head_dim * page_dtype(kv_cache_dtype, model_dtype).itemsize
    if is_quantized(kv_cache_dtype):
        per_head += jnp.dtype(SCALE_DTYPE).itemsize
    return 2 * num_kv_heads * per_head


def quantize_tokens(x: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """x [T, Hkv, D] -> (values [T, Hkv, D] in `dtype`, scales f32 [T, Hkv]).

    Symmetric: value = x / scale with scale = max |x| * (1 / qmax) over head_dim (int8 rounds to
    nearest and clips to +-127; fp8 casts, which rounds to nearest even). An all-zero vector
    gets scale 0 and zero values. Dequantized: value * scale.
    """
    name = "int8" if jnp.dtype(dtype) == jnp.int8 else "fp8"
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) * jnp.float32(1.0 / _QMAX[name])  # [T, Hkv]
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    y = jnp.where(scale[..., None] > 0, xf / safe, 0.0)
    if name == "int8":
        y = jnp.clip(jnp.round(y), -127.0, 127.0)
    else:
        y = jnp.clip(y, -_QMAX[name], _QMAX[name])
    return y.astype(dtype), scale.astype(SCALE_DTYPE)


def dequantize(values: jax.Array, scales: jax.Array | None) -> jax.Array:
    """values [..., D] (with scales [...]) -> float32 [..., D]; scales None: a plain upcast."""
    out = values.astype(jnp.float32)
    return out if scales is None else out * scales.astype(jnp.float32)[..., None]
