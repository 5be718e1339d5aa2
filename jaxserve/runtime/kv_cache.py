"""KV cache arrays: per layer K and V pages [num_kv_heads, num_blocks, block_size, head_dim]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: str) -> int:
    """Bytes one block takes over all layers, K and V."""
    per_layer = 2 * config.num_kv_heads * block_size * config.head_dim
    return per_layer * config.num_layers * jnp.dtype(dtype).itemsize


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: str, mesh: Mesh):
    """Zeroed pages for every layer, split over `tp` by kv head (replicated when too few heads)."""
    tp = mesh.shape["tp"]
    spec = P("tp", None, None, None) if config.num_kv_heads % tp == 0 and tp > 1 else P()
    sharding = NamedSharding(mesh, spec)
    shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return tuple((make(), make()) for _ in range(config.num_layers))
