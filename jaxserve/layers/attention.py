"""Attention over the paged KV cache: metadata pytree, K/V page writes, backend dispatch."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

import pallas_kernels
from pallas_kernels import interpret_compat
from jaxserve.cpu_kernels import build as cpu_build
from jaxserve.cpu_kernels import paged_attention as cpu_attention
from jaxserve.layers.blockwise_attention import blockwise_paged_attention
from jaxserve.layers.kv_quant import (
    is_quantized,
    is_quantized_page,
    pack_rows,
    quantize_tokens,
    value_dtype,
)

logger = logging.getLogger(__name__)

Backend = Literal["reference", "blockwise", "pallas", "cpu"]
BACKENDS = ("reference", "blockwise", "pallas", "cpu")


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

    @classmethod
    def abstract(cls, t: int, s: int, w: int, decode_only: bool) -> AttentionMetadata:
        """Shape-only metadata of a step bucket (t tokens, s sequences, w blocks each), for
        lowering the step programs ahead of time."""
        i32 = jnp.int32
        return cls(
            positions=jax.ShapeDtypeStruct((t,), i32),
            slot_mapping=jax.ShapeDtypeStruct((t,), i32),
            block_tables=jax.ShapeDtypeStruct((s, w), i32),
            seq_lens=jax.ShapeDtypeStruct((s,), i32),
            query_start_loc=jax.ShapeDtypeStruct((s + 1,), i32),
            max_query_len=1 if decode_only else 0,
        )


@dataclass(frozen=True)
class AttentionConfig:
    """Static attention settings fixed when a model is built."""

    backend: Backend = "reference"
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    interpret: bool = False  # run the Mosaic GPU kernels in jax's CPU interpreter (tests)
    mesh: Mesh | None = None  # pallas with tp > 1: the kernel runs under shard_map over "tp"


def select_backend(requested: str = "auto", tensor_parallel_size: int = 1) -> AttentionConfig:
    """Choose the attention backend once, at start-up, and log the choice.

    auto: the Mosaic GPU kernels on a Hopper GPU (blockwise on other GPUs, logged); on CPU the
    C++ kernel (jaxserve/cpu_kernels, compiled on first use) when tp == 1, else the blockwise XLA
    loops (logged with the reason); a quantized KV cache on a GPU asks for blockwise before this
    (backend_request). "reference" is the plain jnp reference (gathers K/V at the padded width:
    simple, slow). "pallas" off a GPU runs the kernels in the Mosaic GPU interpreter (correct
    but slow: for tests).
    """
    platform = jax.default_backend()
    if requested == "auto":
        backend: Backend = (_gpu_default() if platform == "gpu"
                            else _cpu_default(tensor_parallel_size))
    elif requested in BACKENDS:
        backend = requested  # type: ignore[assignment]
    else:
        raise ValueError(
            f"attention_backend: {requested!r} is not one of auto, {', '.join(BACKENDS)}"
        )
    if backend == "cpu":
        if platform != "cpu" or tensor_parallel_size > 1:
            raise ValueError("attention_backend: 'cpu' runs on the CPU platform with "
                             f"tensor_parallel_size 1 (platform {platform}, tp "
                             f"{tensor_parallel_size})")
        cpu_attention.ensure_built()
    if backend == "pallas" and platform == "gpu" and not _is_hopper():
        raise ValueError("attention_backend: 'pallas' needs a Hopper GPU (sm_90a, Mosaic GPU); "
                         f"this is {jax.devices()[0].device_kind}: use blockwise")
    interpret = backend == "pallas" and platform != "gpu"
    logger.info(
        "attention backend: %s%s (platform %s)",
        backend, " in the CPU interpreter" if interpret else "", platform,
    )
    return AttentionConfig(backend=backend, interpret=interpret)


def _is_hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _gpu_default() -> Backend:
    if _is_hopper():
        return "pallas"
    logger.warning("attention: the Mosaic GPU kernels need a Hopper GPU (sm_90a); %s uses the "
                   "slower blockwise XLA loops", jax.devices()[0].device_kind)
    return "blockwise"


def check_pallas_supported(cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int,
                           head_dim: int, block_size: int, dtype: str, tp: int) -> None:
    """At start-up: raise ValueError naming the field when the pallas kernels cannot serve this
    model (so it never fails at its first compile)."""
    if cfg.backend != "pallas":
        return
    try:
        pallas_kernels.check_supported(head_dim, block_size, dtype, num_heads // num_kv_heads)
    except pallas_kernels.UnsupportedConfig as e:
        raise ValueError(f"attention_backend pallas: {e}; use --attention-backend blockwise")
    if tp > 1 and num_kv_heads % tp and (num_heads % tp or (num_heads // num_kv_heads) %
                                         (num_heads // tp)):
        raise ValueError(f"tensor_parallel_size: {tp} does not split {num_heads} query heads "
                         f"over {num_kv_heads} replicated kv heads evenly (pallas backend)")


def _cpu_default(tensor_parallel_size: int) -> Backend:
    """The C++ kernel when it can serve this engine, else blockwise (and say why)."""
    if tensor_parallel_size > 1:
        logger.info("attention: the CPU kernel is not sharded; tensor_parallel_size %d uses "
                    "the blockwise XLA loops", tensor_parallel_size)
        return "blockwise"
    try:
        cpu_attention.ensure_built()
    except cpu_build.KernelBuildError as e:
        logger.warning("attention: the CPU kernel could not be built, using the slower "
                       "blockwise XLA loops: %s", e)
        return "blockwise"
    return "cpu"


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's k, v [num_tokens, num_kv_heads, head_dim] into their slots.

    k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim] in the model's dtype,
    or quantized (int8 / fp8) rows [..., head_dim + 4]: each token quantized with its own
    scale per kv head, stored at the end of its row (layers/kv_quant.py). Written in place
    when the cache is donated to the jitted step.
    """
    kvh, nb, bs, row = k_pages.shape
    out = []
    for pages, x in ((k_pages, k), (v_pages, v)):
        if is_quantized_page(pages.dtype):
            x = pack_rows(*quantize_tokens(x, value_dtype(pages.dtype)))  # [T, Hkv, D + 4]
        flat = pages.reshape(kvh, nb * bs, row).at[:, slot_mapping].set(
            x.transpose(1, 0, 2).astype(pages.dtype)
        )
        out.append(flat.reshape(kvh, nb, bs, row))
    return out[0], out[1]


# The backends that read int8 / fp8 pages: the blockwise XLA loops, the reference, and the CPU
# kernel (which also writes them, in its own K layout).
KV_QUANT_BACKENDS = ("blockwise", "reference", "cpu")


def check_kv_backend(backend: str, kv_cache_dtype: str) -> None:
    """A quantized KV cache is read by the blockwise, reference and cpu backends; the Pallas
    (Mosaic GPU) kernels read float pages only, so such a pairing is refused at start-up rather
    than dequantizing the whole cache every step."""
    if is_quantized(kv_cache_dtype) and backend not in KV_QUANT_BACKENDS:
        raise ValueError(
            f"kv_cache_dtype: {kv_cache_dtype!r} is not supported by the {backend} attention "
            f"backend yet (its kernels read float pages); use kv_cache_dtype='auto', or "
            f"attention_backend {' / '.join(KV_QUANT_BACKENDS)}"
        )


def backend_request(requested: str, kv_cache_dtype: str) -> str:
    """The backend to ask `select_backend` for. "auto" with a quantized KV cache: on CPU still
    "auto" (the C++ kernel, or the blockwise loops at tp > 1: both read it); on a GPU the
    blockwise XLA loops (the Mosaic GPU kernels read float pages), logged. Else `requested`."""
    if requested != "auto" or not is_quantized(kv_cache_dtype) or jax.default_backend() == "cpu":
        return requested
    logger.info("attention: kv_cache_dtype %s is read by the blockwise XLA loops, not the "
                "Mosaic GPU kernels (float pages only)", kv_cache_dtype)
    return "blockwise"


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    md: AttentionMetadata,
    cfg: AttentionConfig,
    scale: float,
) -> jax.Array:
    """Causal attention of q [num_tokens, num_heads, head_dim] over the paged context.

    Quantized pages (int8 / fp8 rows with their scales, see `write_kv`): the blockwise path
    dequantizes each gathered chunk, the reference (plain jnp, tests) each sequence's gathered
    blocks.
    """
    kwargs = dict(
        scale=scale, sliding_window=cfg.sliding_window, logits_soft_cap=cfg.logits_soft_cap
    )
    quantized = is_quantized_page(k_pages.dtype)
    if cfg.backend == "pallas":
        if quantized:
            check_kv_backend("pallas", "int8" if k_pages.dtype == jnp.int8 else "fp8")
        return _pallas_attention(q, k_pages, v_pages, md, cfg, kwargs)
    if cfg.backend == "blockwise":
        return blockwise_paged_attention(
            q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc, **kwargs
        )
    if md.max_query_len:
        kwargs["max_query_len"] = md.max_query_len
    return pallas_kernels.ragged_paged_attention_reference(
        q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc, **kwargs
    )


def write_and_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv: tuple[jax.Array, jax.Array],
    md: AttentionMetadata,
    cfg: AttentionConfig,
    scale: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Write this step's k, v [T, Hkv, D] into the pages, then attend q [T, Hq, D] over them.

    The CPU kernel does both in one call (float or quantized pages, K in its own layout); the
    other backends scatter, then attend."""
    if cfg.backend == "cpu":
        o, k_pages, v_pages = cpu_attention.write_and_attend(
            q, k, v, kv[0], kv[1], md.slot_mapping, md.block_tables, md.seq_lens,
            md.query_start_loc, scale=scale, sliding_window=cfg.sliding_window,
            logits_soft_cap=cfg.logits_soft_cap,
        )
        return o, (k_pages, v_pages)
    k_pages, v_pages = write_kv(kv[0], kv[1], k, v, md.slot_mapping)
    return paged_attention(q, k_pages, v_pages, md, cfg, scale), (k_pages, v_pages)


def _pallas_attention(q, k_pages, v_pages, md: AttentionMetadata, cfg: AttentionConfig, kwargs):
    """The Mosaic GPU ragged kernel; with tp > 1 under shard_map over "tp": each device attends
    its query heads over its kv heads (KV split by head), or, when kv heads < tp (KV replicated),
    over the one kv head its query heads belong to."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    interpret = plgpu.InterpretGPUParams() if cfg.interpret else None

    def attend(q, k_pages, v_pages, md):
        return pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, md.block_tables, md.seq_lens, md.query_start_loc,
            interpret=interpret, **kwargs)

    tp = cfg.mesh.shape["tp"] if cfg.mesh is not None else 1
    if tp == 1:
        return attend(q, k_pages, v_pages, md)
    if cfg.interpret:
        interpret_compat.allow_multi_device()
    num_heads, num_kv_heads = q.shape[1], k_pages.shape[0]
    kv_split = num_kv_heads % tp == 0
    heads = P(None, "tp", None)  # q, out [T, Hq, D]: column-parallel q_proj

    def local(q, k_pages, v_pages, md):
        if not kv_split:  # replicated pages: keep the kv head of this device's query heads
            first_q_head = jax.lax.axis_index("tp") * (num_heads // tp)
            kv_head = first_q_head // (num_heads // num_kv_heads)
            k_pages = jax.lax.dynamic_slice_in_dim(k_pages, kv_head, 1, axis=0)
            v_pages = jax.lax.dynamic_slice_in_dim(v_pages, kv_head, 1, axis=0)
        return attend(q, k_pages, v_pages, md)

    pages = P("tp", None, None, None) if kv_split else P()
    md_spec = jax.tree.map(lambda _: P(), md)
    return jax.shard_map(local, mesh=cfg.mesh, in_specs=(heads, pages, pages, md_spec),
                         out_specs=heads, check_vma=False)(q, k_pages, v_pages, md)

