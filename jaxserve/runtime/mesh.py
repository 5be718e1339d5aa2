"""The device mesh (one `tp` axis) and the partition rule of every parameter."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
_ROW = {"o_proj", "down_proj"}


def make_mesh(tensor_parallel_size: int = 1) -> Mesh:
    devices = jax.devices()
    if tensor_parallel_size < 1 or tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size: {tensor_parallel_size} but {len(devices)} "
            f"{jax.default_backend()} device(s) are visible"
        )
    return Mesh(np.array(devices[:tensor_parallel_size]), ("tp",))


def partition_spec(path: tuple, ndim: int, num_kv_heads: int, tp: int) -> P:
    """Column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding/lm_head."""
    names = [str(p) for p in path]
    module, leaf = (names[-2] if len(names) > 1 else ""), names[-1]
    kv_replicated = module in ("k_proj", "v_proj") and num_kv_heads < tp
    # Linear `weight` is [out, in], `kernel` [in, out] (jaxserve.layers.linear.rows_major).
    # QuantizedLinear's qweight / scales / zeros are [out, ...]: split by output rows (row-
    # parallel layers keep them replicated: their group scales need not divide by tp).
    out_axis = {"weight": P("tp", None), "kernel": P(None, "tp"), "bias": P("tp"),
                "qweight": P("tp", None), "scales": P("tp", None), "zeros": P("tp", None)}
    in_axis = {"weight": P(None, "tp"), "kernel": P("tp", None)}
    if module in _COLUMN and not kv_replicated:
        return out_axis[leaf]
    if module in _ROW and leaf in in_axis:
        return in_axis[leaf]
    if module == "embed_tokens":
        return P("tp", None)
    if module == "lm_head":
        return out_axis[leaf]
    return P(*([None] * ndim))


def named_sharding(mesh: Mesh, path: tuple, ndim: int, num_kv_heads: int) -> NamedSharding:
    tp = mesh.shape["tp"]
    return NamedSharding(mesh, partition_spec(path, ndim, num_kv_heads, tp))
