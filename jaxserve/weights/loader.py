"""Build a model from an HF directory or a converted jaxserve checkpoint, one tensor at a time."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxserve.config import ConfigError, ModelConfig, resolve_dtype_name
from jaxserve.layers.attention import AttentionConfig
from jaxserve.models.registry import MODEL_REGISTRY, UnsupportedArchitectureError, model_class_for
from jaxserve.runtime.mesh import make_mesh, named_sharding
from jaxserve.weights.hf_names import hf_tensor_for
from jaxserve.weights.safetensors_reader import CheckpointError, SafetensorsCheckpoint

logger = logging.getLogger(__name__)

CONVERTED_MARKER = "jaxserve_checkpoint.json"
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # safetensors names we cast from
CONVERTED_VERSION = 2  # 2: Linear weights [out, in] under the name "weight" (1: "kernel" [in, out])
PARAMS_DIR = "params"


@dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    dtype: str  # float32 | bfloat16 | float16
    attention: AttentionConfig
    path: str
    load_seconds: float


def resolve_model_path(model: str) -> str:
    """A local directory as is; otherwise an HF hub id fetched with huggingface_hub."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise CheckpointError(f"model: {model!r} is a file, not a checkpoint directory")
    if _looks_local(model):
        raise CheckpointError(f"model: no such directory: {model!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise CheckpointError(f"model: {model!r} is not a local directory") from e
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return snapshot_download(model, allow_patterns=patterns)


def _looks_local(model: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with dots, ~, or deeper."""
    return (model.startswith(("/", ".", "~")) or os.path.isabs(model) or model.count("/") > 1
            or "\\" in model)


def read_model_config(path: str) -> ModelConfig:
    """config.json, checking first that its architecture is one we implement (a GPT-2 config
    would otherwise fail on a field name our families have and it lacks)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"model: no config.json in {path!r} (not an HF checkpoint)")
    with open(cfg_path) as f:
        archs = json.load(f).get("architectures") or []
    if archs and archs[0] not in MODEL_REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} is not supported; supported: "
            + ", ".join(sorted(MODEL_REGISTRY)))
    return ModelConfig.from_dir(path)


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONVERTED_MARKER))


def abstract_model(config: ModelConfig, attn: AttentionConfig, dtype: str):
    """(graphdef, abstract state) of the model: shapes and dtypes only, nothing allocated."""
    cls = model_class_for(config)
    model = nnx.eval_shape(lambda: cls(config, attn, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    return nnx.split(model)


def load_model(
    model: str,
    dtype: str = "auto",
    attn: AttentionConfig | None = None,
    mesh: Mesh | None = None,
) -> LoadedModel:
    start = time.perf_counter()
    path = resolve_model_path(model)
    config = read_model_config(path)
    converted = is_converted(path)
    if converted and dtype == "auto":
        dtype = _converted_info(path)["dtype"]  # the dtype the converter stored
    dtype_name = resolve_dtype_name(dtype, config)
    mesh = mesh or make_mesh(1)
    attn = dataclasses.replace(attn or AttentionConfig(), sliding_window=config.sliding_window)
    graphdef, state = abstract_model(config, attn, dtype_name)
    if converted:
        state = _restore_converted(path, state, config, mesh, dtype_name)
    else:
        state = _read_hf(path, state, config, mesh, dtype_name)
    loaded = LoadedModel(
        nnx.merge(graphdef, state), config, dtype_name, attn, path, time.perf_counter() - start
    )
    logger.info(
        "loaded %s (%s, %s) from %s in %.2fs",
        config.architecture, dtype_name, "converted" if converted else "HF", path,
        loaded.load_seconds,
    )
    return loaded


def _read_hf(path: str, state, config: ModelConfig, mesh: Mesh, dtype: str):
    """Fill every parameter from the safetensors files, each placed onto its sharding."""
    ckpt = SafetensorsCheckpoint(path)
    target = jnp.dtype(dtype)
    for param_path, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        tensor = hf_tensor_for(param_path)
        stored = ckpt.tensors[tensor.name].dtype if tensor.name in ckpt else None
        if stored is not None and stored not in _FLOAT_DTYPES:  # fp8 / int: quantized weights
            raise CheckpointError(
                f"tensor {tensor.name!r} has dtype {stored}: quantized weights (fp8 / int) are "
                "not supported (casting them without their scales would load garbage)"
            )
        host = ckpt.get(tensor.name)
        if host.shape != abstract.shape:
            info = ckpt.tensors[tensor.name]
            raise CheckpointError(
                f"tensor {tensor.name!r} in {info.file} has shape {tuple(info.shape)}; "
                f"the config needs {abstract.shape}"
            )
        sharding = named_sharding(mesh, param_path, host.ndim, config.num_kv_heads)
        var.set_value(jax.device_put(np.asarray(host, dtype=target), sharding))
    ckpt.close()
    return state


def _restore_converted(path: str, state, config: ModelConfig, mesh: Mesh, dtype: str):
    """Restore orbax params straight onto their target shardings."""
    import orbax.checkpoint as ocp

    saved_dtype = _converted_info(path)["dtype"]
    abstract_tree = {}
    for param_path, var in nnx.to_flat_state(state):
        a = var.get_value()
        sharding = named_sharding(mesh, param_path, a.ndim, config.num_kv_heads)
        nest_param(abstract_tree, param_path, jax.ShapeDtypeStruct(a.shape, saved_dtype, sharding=sharding))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), abstract_tree)
    for param_path, var in nnx.to_flat_state(state):
        arr = restored
        for key in param_path:
            arr = arr[str(key)]
        var.set_value(arr.astype(dtype) if arr.dtype != jnp.dtype(dtype) else arr)
    return state


def _converted_info(path: str) -> dict:
    with open(os.path.join(path, CONVERTED_MARKER)) as f:
        info = json.load(f)
    if info.get("version") != CONVERTED_VERSION:
        raise CheckpointError(
            f"{path!r} is a jaxserve checkpoint of format version {info.get('version')!r}; this "
            f"jaxserve reads version {CONVERTED_VERSION}: convert the HF checkpoint again "
            "(`jaxserve convert`)"
        )
    return info


def nest_param(tree: dict, path: tuple, leaf) -> None:
    """Put leaf at tree[path[0]][path[1]]... (keys as str), the layout of the orbax params."""
    for key in path[:-1]:
        tree = tree.setdefault(str(key), {})
    tree[str(path[-1])] = leaf
