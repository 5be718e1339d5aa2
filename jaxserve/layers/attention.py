"""Attention over the paged KV cache: metadata pytree, K/V page writes, backend dispatch."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxserve.layers.blockwise_attention import blockwise_paged_attention
from jaxserve.layers.kv_quant import dequantize, is_quantized, quantize_tokens

logger = logging.getLogger(__name__)

Backend = Literal["reference", "blockwise", "pallas"]
BACKENDS = ("reference", "blockwise", "pallas")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of the flat (bucket-padded) token axis lives in the paged cache.

    Sequences 0..num_seqs-1 own query tokens query_start_loc[s]:query_start_loc[s+1]; padding
    tokens sit past query_start_loc[-1] and write into the reserved null block 0.
    """

    positions: jax.Array  # int32 [num_tokens]
    slot_mapping: jax.Array  # int32 [num_tokens]: block_id * block_size + offset
    block_tables: jax.Array  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: jax.Array  # int32 [num_seqs]: context length incl. this step's tokens; 0 = padding
    query_start_loc: jax.Array  # int32 [num_seqs + 1]
    max_query_len: int = dataclasses.field(default=0, metadata=dict(static=True))  # bucketed bound


@dataclass(frozen=True)
class AttentionConfig:
    """Static attention settings fixed when a model is built."""

    backend: Backend = "reference"
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    interpret: bool = False  # run Pallas kernels in the CPU interpreter (tests)


def select_backend(requested: str = "auto") -> AttentionConfig:
    """Choose the attention backend once, at start-up, and log the choice.

    auto: the Pallas kernels on GPU, the blockwise XLA loops elsewhere. "reference" is the plain
    jnp reference (gathers K/V at the padded width: simple, slow). "pallas" off a GPU runs the
    kernels in Pallas's CPU interpreter (correct but slow: for tests).
    """
    platform = jax.default_backend()
    if requested == "auto":
        backend: Backend = "pallas" if platform == "gpu" else "blockwise"
    elif requested in BACKENDS:
        backend = requested  # type: ignore[assignment]
    else:
        raise ValueError(
            f"attention_backend: {requested!r} is not one of auto, {', '.join(BACKENDS)}"
        )
    interpret = backend == "pallas" and platform != "gpu"
    logger.info(
        "attention backend: %s%s (platform %s)",
        backend, " in the CPU interpreter" if interpret else "", platform,
    )
    return AttentionConfig(backend=backend, interpret=interpret)


KVLayer = tuple  # (k_pages, v_pages) or, quantized, (k_pages, v_pages, k_scales, v_scales)


def write_kv(kv: KVLayer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVLayer:
    """Scatter this step's k, v [num_tokens, num_kv_heads, head_dim] into their slots.

    kv: k_pages, v_pages [num_kv_heads, num_blocks, block_size, head_dim], and for a quantized
    cache (int8 / fp8 pages) k_scales, v_scales f32 [num_kv_heads, num_blocks, block_size]:
    each token is quantized with its own scale per kv head (see layers/kv_quant.py). Written
    in place when the cache is donated to the jitted step. Returns the same structure.
    """
    k_pages, v_pages = kv[0], kv[1]
    kvh, nb, bs, d = k_pages.shape
    quantized = len(kv) == 4
    out, scales = [], []
    for pages, x in ((k_pages, k), (v_pages, v)):
        if quantized:
            x, s = quantize_tokens(x, pages.dtype)  # [T, Hkv, D], [T, Hkv]
            scales.append(s.T)  # [Hkv, T]
        flat = pages.reshape(kvh, nb * bs, d).at[:, slot_mapping].set(
            x.transpose(1, 0, 2).astype(pages.dtype)
        )
        out.append(flat.reshape(kvh, nb, bs, d))
    for old, s in zip(kv[2:], scales):
        out.append(old.reshape(kvh, nb * bs).at[:, slot_mapping].set(s).reshape(kvh, nb, bs))
    return tuple(out)


def check_kv_backend(backend: str, kv_cache_dtype: str) -> None:
    """A quantized KV cache is read by the blockwise and reference backends; the Pallas kernels
    read float pages only, so that pairing is refused at start-up (not dequantized per step)."""
    if backend == "pallas" and is_quantized(kv_cache_dtype):
        raise ValueError(
            f"kv_cache_dtype: {kv_cache_dtype!r} is not supported by the pallas attention "
            "backend yet (its kernels read float pages); use kv_cache_dtype='auto', or "
            "attention_backend 'blockwise' / 'reference'"
        )


def paged_attention(
    q: jax.Array,
    kv: KVLayer,
    md: AttentionMetadata,
    cfg: AttentionConfig,
    scale: float,
) -> jax.Array:
    """Causal attention of q [num_tokens, num_heads, head_dim] over the paged context.

    kv as `write_kv` returns it. The blockwise path dequantizes each gathered chunk of a
    quantized cache; the reference (plain jnp, tests) dequantizes the layer's pages first.
    """
    kwargs = dict(
        scale=scale, sliding_window=cfg.sliding_window, logits_soft_cap=cfg.logits_soft_cap
    )
    k_pages, v_pages = kv[0], kv[1]
    k_scales, v_scales = kv[2:] if len(kv) == 4 else (None, None)
    if cfg.backend == "pallas":
        if k_scales is not None:
            check_kv_backend("pallas", "int8" if k_pages.dtype == jnp.int8 else "fp8")
        return pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc,
            interpret=cfg.interpret, **kwargs,
        )
    if cfg.backend == "blockwise":
        return blockwise_paged_attention(
            q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc,
            k_scales=k_scales, v_scales=v_scales, **kwargs
        )
    if md.max_query_len:
        kwargs["max_query_len"] = md.max_query_len
    if k_scales is not None:
        k_pages, v_pages = dequantize(k_pages, k_scales), dequantize(v_pages, v_scales)
    return pallas_kernels.ragged_paged_attention_reference(
        q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc, **kwargs
    )
