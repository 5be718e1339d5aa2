"""Run prompts through a loaded model in paged steps (test helper over the runtime's packing)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.layers.attention import AttentionMetadata
from jaxserve.runtime.buckets import BucketSpec
from jaxserve.runtime.inputs import prepare_inputs
from jaxserve.runtime.kv_cache import allocate_kv_cache
from jaxserve.runtime.mesh import make_mesh


@dataclass
class Chunk:
    token_ids: list[int]
    start_pos: int
    block_table: list[int]


def paged_logits(loaded, prompts, *, block_size=8, chunk=None, shuffle_seed=0,
                 kv_cache_dtype="auto"):
    """float32 logits [len(prompt), vocab] for every prompt, computed in one or more steps.

    All prompts run together in each step; `chunk` splits every prompt into chunks of that
    many tokens (later chunks attend to the cached earlier ones). Blocks are handed out in a
    shuffled order so block tables are not contiguous. kv_cache_dtype: int8 / fp8 pages.
    """
    cfg = loaded.config
    max_len = max(len(p) for p in prompts)
    blocks_per = -(-max_len // block_size)
    rng = np.random.default_rng(shuffle_seed)
    ids = rng.permutation(np.arange(1, 1 + blocks_per * len(prompts))).tolist()
    tables = [ids[i * blocks_per : (i + 1) * blocks_per] for i in range(len(prompts))]
    kv = allocate_kv_cache(cfg, 1 + blocks_per * len(prompts), block_size, loaded.dtype, make_mesh(1),
                           kv_cache_dtype)
    graphdef, state = nnx.split(loaded.model)
    buckets = BucketSpec.build(4096, 64, blocks_per)

    @jax.jit
    def step(state, kv, token_ids, md):
        model = nnx.merge(graphdef, state)
        hidden, kv = model(token_ids, md, kv)
        return model.compute_logits(hidden), kv

    out = [[] for _ in prompts]
    chunk = chunk or max_len
    for start in range(0, max_len, chunk):
        live = [i for i, p in enumerate(prompts) if start < len(p)]
        chunks = [Chunk(prompts[i][start : start + chunk], start, tables[i]) for i in live]
        inp = prepare_inputs(chunks, block_size, buckets)
        md = AttentionMetadata(
            jnp.asarray(inp.positions), jnp.asarray(inp.slot_mapping),
            jnp.asarray(inp.block_tables), jnp.asarray(inp.seq_lens),
            jnp.asarray(inp.query_start_loc),
        )
        logits, kv = step(state, kv, jnp.asarray(inp.token_ids), md)
        logits = np.asarray(logits)
        for row, i in enumerate(live):
            lo, hi = inp.query_start_loc[row], inp.query_start_loc[row + 1]
            out[i].append(logits[lo:hi])
    return [np.concatenate(parts) for parts in out]
