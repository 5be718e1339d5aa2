"""KV cache arrays: per layer K and V pages [num_kv_heads, num_blocks, block_size, head_dim]
(+ per-(token, kv head) scales [num_kv_heads, num_blocks, block_size] when quantized)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.layers.kv_quant import SCALE_DTYPE, bytes_per_token, is_quantized, page_dtype


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: str,
                   kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes over all layers, K and V (pages, and scales when quantized)."""
    per_token = bytes_per_token(kv_cache_dtype, dtype, config.num_kv_heads, config.head_dim)
    return per_token * block_size * config.num_layers


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: str,
                      mesh: Mesh, kv_cache_dtype: str = "auto"):
    """Zeroed pages (and scales) for every layer, split over `tp` by kv head (replicated when
    too few heads). kv_cache_dtype int8 / fp8: 4 arrays per layer, see layers/kv_quant.py."""
    tp = mesh.shape["tp"]
    split = config.num_kv_heads % tp == 0 and tp > 1
    shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
    pages = jax.jit(lambda: jnp.zeros(shape, page_dtype(kv_cache_dtype, dtype)),
                    out_shardings=NamedSharding(mesh, P("tp", None, None, None) if split else P()))
    if not is_quantized(kv_cache_dtype):
        return tuple((pages(), pages()) for _ in range(config.num_layers))
    scales = jax.jit(lambda: jnp.zeros(shape[:3], SCALE_DTYPE),
                     out_shardings=NamedSharding(mesh, P("tp", None, None) if split else P()))
    return tuple((pages(), pages(), scales(), scales()) for _ in range(config.num_layers))
