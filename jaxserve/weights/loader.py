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
from jaxserve.layers.linear import rows_major
from jaxserve.layers.quant_scheme import QuantConfig, QuantizationError
from jaxserve.layers.quantized_linear import log_kernel_plan
from jaxserve.models.registry import MODEL_REGISTRY, UnsupportedArchitectureError, model_class_for
from jaxserve.runtime.mesh import make_mesh, named_sharding
from jaxserve.weights.hf_names import hf_tensor_for
from jaxserve.weights.quant_loading import (
    QUANT_LEAVES,
    layer_arrays,
    log_weight_bytes,
    resolve_quantization,
)
from jaxserve.weights.safetensors_reader import CheckpointError, SafetensorsCheckpoint

logger = logging.getLogger(__name__)

CONVERTED_MARKER = "jaxserve_checkpoint.json"
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # safetensors names we cast from
CONVERTED_VERSION = 2  # 2: bf16/f16 Linear weights [out, in] as "weight" (1: all "kernel" [in, out])
PARAMS_DIR = "params"


@dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    dtype: str  # float32 | bfloat16 | float16
    attention: AttentionConfig
    path: str
    load_seconds: float
    quant: QuantConfig | None = None  # quantized decoder projections (None: all float)
    weight_report: dict | None = None  # bytes, and the ratios to bf16 when quantized


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
    archs = read_raw_config(path).get("architectures") or []
    if archs and archs[0] not in MODEL_REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} is not supported; supported: "
            + ", ".join(sorted(MODEL_REGISTRY)))
    return ModelConfig.from_dir(path)


def read_raw_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"model: no config.json in {path!r} (not an HF checkpoint)")
    with open(cfg_path) as f:
        return json.load(f)


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONVERTED_MARKER))


def abstract_model(config: ModelConfig, attn: AttentionConfig, dtype: str,
                   quant: QuantConfig | None = None, matvec: bool = False):
    """(graphdef, abstract state) of the model: shapes and dtypes only, nothing allocated."""
    cls = model_class_for(config)
    model = nnx.eval_shape(
        lambda: cls(config, attn, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), quant=quant,
                    matvec=matvec))
    return nnx.split(model)


def load_model(
    model: str,
    dtype: str = "auto",
    attn: AttentionConfig | None = None,
    mesh: Mesh | None = None,
    quantization: str | None = None,
    cpu_matvec: bool = False,
    quantize_lm_head: bool = False,
) -> LoadedModel:
    """quantization: int8 | int4 | fp8 | w8a8 quantizes the decoder projections while loading;
    a compressed-tensors checkpoint is loaded quantized as it is (None or its method name).
    quantize_lm_head: the lm_head too (with tied embeddings, the one table, quantized).
    cpu_matvec: decode steps' bf16 projections run the CPU kernel (layers/linear.py)."""
    start = time.perf_counter()
    path = resolve_model_path(model)
    config = read_model_config(path)
    converted = is_converted(path)
    quant = (_converted_quantization(path, quantization, quantize_lm_head) if converted
             else resolve_quantization(read_raw_config(path), quantization, quantize_lm_head))
    stored_head = quant is not None and quant.lm_head and quant.source != "online"
    if stored_head and config.tie_word_embeddings:
        raise QuantizationError(
            "quantization_config.ignore: this compressed-tensors checkpoint quantizes lm_head "
            "but ties it to the token embeddings (tie_word_embeddings); a quantized tied "
            "lm_head is supported for quantize_lm_head at load only: add 'lm_head' to ignore")
    if converted and dtype == "auto":
        dtype = _converted_info(path)["dtype"]  # the dtype the converter stored
    dtype_name = resolve_dtype_name(dtype, config)
    mesh = mesh or make_mesh(1)
    attn = dataclasses.replace(attn or AttentionConfig(), sliding_window=config.sliding_window)
    log_kernel_plan(quant, dtype_name, cpu_matvec)
    graphdef, state = abstract_model(config, attn, dtype_name, quant, cpu_matvec)
    if converted:
        state = _restore_converted(path, state, config, mesh, dtype_name)
    else:
        state = _read_hf(path, state, config, mesh, dtype_name, quant)
    model = nnx.merge(graphdef, state)
    if cpu_matvec:
        _pack_for_cpu(model)
    loaded = LoadedModel(
        model, config, dtype_name, attn, path, time.perf_counter() - start,
        quant, log_weight_bytes(state, quant, dtype_name),
    )
    logger.info(
        "loaded %s (%s, %s) from %s in %.2fs",
        config.architecture, dtype_name, "converted" if converted else "HF", path,
        loaded.load_seconds,
    )
    return loaded


def _pack_for_cpu(model) -> None:
    """Pack the weights the CPU kernels read into their panels (layers/linear.py), once."""
    start = time.perf_counter()
    packed, qkv, mlp = model.pack_for_cpu()
    if packed:
        logger.info("packed %d weights for the packed-weight CPU kernel (q, k and v fused in "
                    "%d layers, gate and up with silu in %d) in %.2fs", packed, qkv, mlp,
                    time.perf_counter() - start)


def _read_hf(path: str, state, config: ModelConfig, mesh: Mesh, dtype: str,
             quant: QuantConfig | None = None):
    """Fill every parameter from the safetensors files, each placed onto its sharding;
    quantized projections are read (or quantized) one layer at a time."""
    ckpt = SafetensorsCheckpoint(path)
    target = jnp.dtype(dtype)
    layer: tuple[tuple, dict] = ((), {})  # the projection whose quantized arrays are at hand
    for param_path, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        if str(param_path[-1]) in QUANT_LEAVES:
            prefix = tuple(param_path[:-1])
            if layer[0] != prefix:
                layer = prefix, _quantized_layer(ckpt, prefix, state, quant)
            host = layer[1][str(param_path[-1])]
            sharding = named_sharding(mesh, param_path, host.ndim, config.num_kv_heads)
            var.set_value(jax.device_put(host, sharding))
            continue
        tensor = hf_tensor_for(param_path)
        stored = ckpt.tensors[tensor.name].dtype if tensor.name in ckpt else None
        if stored is not None and stored not in _FLOAT_DTYPES:  # fp8 / int: quantized weights
            raise CheckpointError(
                f"tensor {tensor.name!r} has dtype {stored}: quantized weights (fp8 / int) are "
                "not supported (casting them without their scales would load garbage)"
            )
        host = ckpt.get(tensor.name)
        if tensor.transpose:
            host = host.T
        if host.shape != abstract.shape:
            info = ckpt.tensors[tensor.name]
            raise CheckpointError(
                f"tensor {tensor.name!r} in {info.file} has shape {tuple(info.shape)}; "
                f"the config needs {abstract.shape[::-1] if tensor.transpose else abstract.shape}"
            )
        sharding = named_sharding(mesh, param_path, host.ndim, config.num_kv_heads)
        var.set_value(jax.device_put(np.asarray(host, dtype=target), sharding))
    ckpt.close()
    return state


def _quantized_layer(ckpt: SafetensorsCheckpoint, prefix: tuple, state, quant) -> dict:
    """The quantized arrays of the QuantizedLinear at `prefix`, shapes checked against it."""
    module = state
    for key in prefix:
        module = module[key]
    qweight = module["qweight"].get_value()
    out_dim = qweight.shape[0]
    in_dim = qweight.shape[1] * (2 if quant.method == "int4" else 1)
    name = hf_tensor_for(prefix + ("weight",)).name  # e.g. model.layers.0.mlp.up_proj.weight
    arrays = layer_arrays(ckpt, name, quant, out_dim, in_dim)
    for leaf in QUANT_LEAVES:
        if leaf in module and module[leaf] is not None:
            want = module[leaf].get_value()
            got = arrays.get(leaf)
            if got is None or got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(
                    f"tensor {name!r}: quantized {leaf} is "
                    f"{'missing' if got is None else f'{got.dtype}{list(got.shape)}'}; the "
                    f"model needs {want.dtype}{list(want.shape)}")
    return arrays


def _restore_converted(path: str, state, config: ModelConfig, mesh: Mesh, dtype: str):
    """Restore orbax params straight onto their target shardings (cast and, where the stored
    dtype's Linear layout differs from the target's, transposed)."""
    import orbax.checkpoint as ocp

    saved_dtype = _converted_info(path)["dtype"]
    flip = rows_major(saved_dtype) != rows_major(dtype)
    abstract_tree, saved_paths = {}, []
    for param_path, var in nnx.to_flat_state(state):
        a = var.get_value()
        saved_path, shape = _saved_layout(param_path, a.shape, flip)
        sharding = named_sharding(mesh, saved_path, a.ndim, config.num_kv_heads)
        stored = a.dtype if str(param_path[-1]) in QUANT_LEAVES else saved_dtype  # kept as is
        nest_param(abstract_tree, saved_path,
                   jax.ShapeDtypeStruct(shape, stored, sharding=sharding))
        saved_paths.append(saved_path)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), abstract_tree)
    for (param_path, var), saved_path in zip(nnx.to_flat_state(state), saved_paths):
        arr = restored
        for key in saved_path:
            arr = arr[str(key)]
        if saved_path != param_path:
            arr = jax.device_put(arr.T, named_sharding(mesh, param_path, arr.ndim,
                                                       config.num_kv_heads))
        if str(param_path[-1]) not in QUANT_LEAVES and arr.dtype != jnp.dtype(dtype):
            arr = arr.astype(dtype)
        var.set_value(arr)
    return state


def _saved_layout(param_path: tuple, shape: tuple, flip: bool) -> tuple[tuple, tuple]:
    """(path, shape) a target parameter was stored under: a Linear `weight` [out, in] is a
    `kernel` [in, out] when the stored dtype's layout differs (see layers.linear.rows_major)."""
    leaf = str(param_path[-1])
    if not flip or len(shape) != 2 or leaf not in ("weight", "kernel"):
        return param_path, shape
    return (*param_path[:-1], "kernel" if leaf == "weight" else "weight"), shape[::-1]


def _converted_quantization(path: str, requested: str | None,
                            quantize_lm_head: bool = False) -> QuantConfig | None:
    """The scheme a converted checkpoint was stored with; asking for another is refused."""
    saved = _converted_info(path).get("quantization")
    quant = QuantConfig(**saved) if saved else None
    if requested is not None and (quant is None or requested not in (quant.name, quant.source)):
        raise ConfigError(
            f"quantization: {requested!r} asked for, but this converted checkpoint holds "
            f"{quant.name if quant else 'float'} weights; convert again with --quantization")
    if quantize_lm_head and not (quant is not None and quant.lm_head):
        raise ConfigError(
            "quantize_lm_head: this converted checkpoint holds a float lm_head; convert again "
            "with --quantization and --quantize-lm-head")
    return quant


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
