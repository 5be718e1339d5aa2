"""KV cache arrays: per layer K and V pages [num_kv_heads, num_blocks, block_size, head_dim]
(int8 / fp8 rows of head_dim + 4 when quantized: the values and their scale, see kv_quant)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.layers.kv_quant import bytes_per_token, page_dtype, page_row


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: str,
                   kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes over all layers, K and V (values and, quantized, scales)."""
    per_token = bytes_per_token(kv_cache_dtype, dtype, config.num_kv_heads, config.head_dim)
    return per_token * block_size * config.num_layers


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: str,
                      mesh: Mesh, kv_cache_dtype: str = "auto"):
    """Zeroed pages for every layer, split over `tp` by kv head (replicated when too few heads).
    kv_cache_dtype int8 / fp8: quantized pages, see layers/kv_quant.py."""
    tp = mesh.shape["tp"]
    spec = P("tp", None, None, None) if config.num_kv_heads % tp == 0 and tp > 1 else P()
    sharding = NamedSharding(mesh, spec)
    shape = (config.num_kv_heads, num_blocks, block_size,
             page_row(kv_cache_dtype, config.head_dim))
    make = jax.jit(lambda: jnp.zeros(shape, page_dtype(kv_cache_dtype, dtype)),
                   out_shardings=sharding)
    return tuple((make(), make()) for _ in range(config.num_layers))
