"""Read `compressed-tensors` checkpoints (llm-compressor's format) into QuantizedLinear layouts.

Supported: weight-only int4 / int8 (`pack-quantized`, `int-quantized` / `naive-quantized`) and
fp8 e4m3 (`float-quantized`), channel / group (/ tensor for fp8) strategies, symmetric or
asymmetric (int). Everything else is refused naming the field: activation quantization,
a quantized KV cache, several different schemes, ignored decoder projections, act-order.
The lm_head is read quantized when `ignore` does not list it (untied embeddings only).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from jaxserve.layers.quant_scheme import QuantConfig, QuantizationError
from jaxserve.weights.safetensors_reader import CheckpointError, SafetensorsCheckpoint

QUANT_METHOD = "compressed-tensors"
_FORMATS = {"pack-quantized", "int-quantized", "naive-quantized", "float-quantized"}
_FIELD = "quantization_config"


def parse_config(qc: dict[str, Any]) -> QuantConfig:
    """quantization_config of a compressed-tensors checkpoint -> our QuantConfig."""
    fmt = qc.get("format")
    if fmt not in _FORMATS:
        raise QuantizationError(
            f"{_FIELD}.format: compressed-tensors format {fmt!r} is not supported "
            f"(supported: {', '.join(sorted(_FORMATS))})")
    if qc.get("kv_cache_scheme"):
        raise QuantizationError(f"{_FIELD}.kv_cache_scheme: a quantized KV cache is not supported")
    if qc.get("sparsity_config"):
        raise QuantizationError(f"{_FIELD}.sparsity_config: sparse checkpoints are not supported")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise QuantizationError(f"{_FIELD}.config_groups: missing or empty")
    weights = None
    for name, scheme in groups.items():
        where = f"{_FIELD}.config_groups.{name}"
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise QuantizationError(
                f"{where}.input_activations: activation quantization (e.g. W8A8) is not "
                "supported; jaxserve serves weight-only schemes (W8A16, W4A16, FP8 weights)")
        targets = scheme.get("targets") or []
        if targets != ["Linear"]:
            raise QuantizationError(f"{where}.targets: {targets!r} is not supported (['Linear'])")
        if weights is not None and scheme.get("weights") != weights:
            raise QuantizationError(f"{where}.weights: differs from another group's; one scheme "
                                    "for all linear layers is supported")
        weights = scheme.get("weights")
    if not weights:
        raise QuantizationError(f"{_FIELD}.config_groups: no `weights` scheme")
    lm_head_ignored = _check_ignore(qc.get("ignore") or [])
    quant = _weights_scheme(weights, fmt, f"{_FIELD}.config_groups.*.weights")
    return dataclasses.replace(quant, lm_head=not lm_head_ignored)


def _weights_scheme(w: dict[str, Any], fmt: str, where: str) -> QuantConfig:
    bits, kind = w.get("num_bits"), w.get("type")
    strategy, group = w.get("strategy"), w.get("group_size")
    symmetric = bool(w.get("symmetric", True))
    if w.get("dynamic"):
        raise QuantizationError(f"{where}.dynamic: dynamic weight quantization is not supported")
    if w.get("actorder") == "group":
        raise QuantizationError(f"{where}.actorder: 'group' (activation-ordered groups, g_idx) "
                                "is not supported")
    if (kind, bits) == ("int", 4):
        method = "int4"
    elif (kind, bits) == ("int", 8):
        method = "int8"
    elif (kind, bits) == ("float", 8):
        method = "fp8"
    else:
        raise QuantizationError(f"{where}: {bits}-bit {kind} weights are not supported "
                                "(int 4, int 8, float 8)")
    if (method == "fp8") != (fmt == "float-quantized"):
        raise QuantizationError(f"{_FIELD}.format: {fmt!r} does not hold {method} weights")
    if method == "int4" and fmt != "pack-quantized":
        raise QuantizationError(f"{_FIELD}.format: int4 weights must be 'pack-quantized'")
    if strategy == "group":
        if not isinstance(group, int) or group < 2 or group % 2:
            raise QuantizationError(f"{where}.group_size: {group!r} must be an even int >= 2")
    elif strategy in ("channel", "tensor"):
        if strategy == "tensor" and method != "fp8":
            raise QuantizationError(f"{where}.strategy: 'tensor' is supported for fp8 only")
        group = None
    else:
        raise QuantizationError(f"{where}.strategy: {strategy!r} is not supported "
                                "(channel, group; tensor for fp8)")
    if not symmetric and method == "fp8":
        raise QuantizationError(f"{where}.symmetric: asymmetric fp8 is not supported")
    return QuantConfig(method, group, symmetric, source=f"{QUANT_METHOD}:{fmt}")


def _check_ignore(ignore: list[str]) -> bool:
    """Only lm_head may be left unquantized (our decoder projections are all-or-none); True
    when it is (else its quantized tensors are read like a projection's)."""
    lm_head_ignored = False
    for entry in ignore:
        pattern = entry[3:] if entry.startswith("re:") else re.escape(entry)
        if re.fullmatch(pattern, "lm_head"):
            lm_head_ignored = True
            continue
        raise QuantizationError(
            f"{_FIELD}.ignore: {entry!r} leaves a decoder layer unquantized; only 'lm_head' may "
            "be ignored (mixed float / quantized projections are not supported)")
    return lm_head_ignored


def read_layer(ckpt: SafetensorsCheckpoint, module: str, quant: QuantConfig,
               out_dim: int, in_dim: int) -> dict[str, np.ndarray]:
    """One projection's compressed tensors -> {"qweight", "scales"[, "zeros"]} (our layouts)."""
    group = quant.group_for(in_dim)
    groups = in_dim // group
    fmt = quant.source.split(":", 1)[1]
    if fmt == "pack-quantized":
        qweight = _packed(ckpt, module, quant.method, out_dim, in_dim)
    else:
        qweight = _expect(ckpt, f"{module}.weight", (out_dim, in_dim))
        if quant.method == "fp8":
            _dtype(ckpt, f"{module}.weight", "F8_E4M3")
            qweight = np.ascontiguousarray(qweight).view(np.uint8)
        else:
            _dtype(ckpt, f"{module}.weight", "I8")
    scale_name = f"{module}.weight_scale"
    scales = np.asarray(_get(ckpt, scale_name), dtype=np.float32)
    if scales.size == 1 and quant.group_size is None:  # fp8 per-tensor scale
        scales = np.full((out_dim, 1), scales.reshape(()), np.float32)
    _shape(scales, (out_dim, groups), scale_name, group)
    arrays = {"qweight": np.ascontiguousarray(qweight), "scales": scales}
    if not quant.symmetric:
        arrays["zeros"] = _zero_points(ckpt, module, quant, fmt, out_dim, groups, group)
    return arrays


def _packed(ckpt, module: str, method: str, out_dim: int, in_dim: int) -> np.ndarray:
    """weight_packed int32 [out, in * bits / 32]: little-endian, value + 2^(bits-1) per field."""
    name = f"{module}.weight_packed"
    per_word = 8 if method == "int4" else 4
    packed = _expect(ckpt, name, (out_dim, -(-in_dim // per_word)))
    _dtype(ckpt, name, "I32")
    if in_dim % per_word:
        raise CheckpointError(f"tensor {name!r}: input dimension {in_dim} is not a multiple of "
                              f"{per_word} ({method} values per int32)")
    raw = np.ascontiguousarray(packed).astype("<i4").view(np.uint8)  # [out, in*bits/8]
    if method == "int4":
        return raw  # byte j: element 2j low nibble, 2j+1 high nibble, each q + 8: our layout
    return (raw.astype(np.int16) - 128).astype(np.int8)  # int8 packed: each byte is q + 128


def _zero_points(ckpt, module, quant, fmt, out_dim, groups, group) -> np.ndarray:
    name = f"{module}.weight_zero_point"
    zp = _get(ckpt, name)
    if fmt == "pack-quantized":  # packed along the output axis: int32 [out * bits / 32, G]
        per_word = 8 if quant.method == "int4" else 4
        _shape(zp, (-(-out_dim // per_word), groups), name, group)
        raw = np.ascontiguousarray(zp.T).astype("<i4").view(np.uint8)  # [G, out*bits/8]
        if quant.method == "int4":
            lo, hi = (raw & 0x0F).astype(np.int16), (raw >> 4).astype(np.int16)
            vals = np.stack([lo, hi], -1).reshape(groups, -1)[:, :out_dim] - 8
        else:
            vals = raw.astype(np.int16)[:, :out_dim] - 128
        return vals.T.astype(np.float32)
    _shape(zp, (out_dim, groups), name, group)
    return np.asarray(zp, dtype=np.float32)


def _get(ckpt: SafetensorsCheckpoint, name: str) -> np.ndarray:
    if name not in ckpt:
        raise CheckpointError(f"tensor {name!r} is missing from the compressed-tensors checkpoint "
                              f"in {ckpt.directory}")
    return ckpt.get(name)


def _expect(ckpt, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _get(ckpt, name)
    if tuple(arr.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}; the config needs "
                              f"{shape}")
    return arr


def _dtype(ckpt, name: str, want: str) -> None:
    got = ckpt.tensors[name].dtype
    if got != want:
        raise CheckpointError(f"tensor {name!r} has dtype {got}; the quantization_config needs "
                              f"{want}")


def _shape(arr: np.ndarray, want: tuple[int, int], name: str, group: int) -> None:
    if tuple(arr.shape) != want:
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(arr.shape)}; {want} expected with group size "
            f"{group} (quantization_config group_size does not match the checkpoint?)")
