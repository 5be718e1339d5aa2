"""Which quantization a load uses, the quantized tensors of each projection, the bytes report."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from jaxserve.layers.quant_scheme import ONLINE_NAMES, QuantConfig, QuantizationError, quantize
from jaxserve.weights import compressed_tensors
from jaxserve.weights.safetensors_reader import CheckpointError, SafetensorsCheckpoint

logger = logging.getLogger(__name__)

QUANT_LEAVES = ("qweight", "scales", "zeros")  # QuantizedLinear's quantized parameters
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def resolve_quantization(raw_config: dict[str, Any], requested: str | None,
                         quantize_lm_head: bool = False) -> QuantConfig | None:
    """The checkpoint's own scheme (compressed-tensors), else `requested` (PTQ at load);
    quantize_lm_head: the PTQ covers the lm_head too (a checkpoint's scheme says for itself)."""
    qc = raw_config.get("quantization_config") or raw_config.get("compression_config")
    if requested is not None and requested not in ONLINE_NAMES + (compressed_tensors.QUANT_METHOD,):
        raise QuantizationError(
            f"quantization: unknown method {requested!r}; supported: "
            f"{', '.join(ONLINE_NAMES)} (online, at load) or {compressed_tensors.QUANT_METHOD!r} "
            "(pre-quantized checkpoints)")
    if quantize_lm_head:
        check_lm_head_request(requested)
    if not qc:
        if requested == compressed_tensors.QUANT_METHOD:
            raise QuantizationError("quantization: 'compressed-tensors' asked for but the "
                                    "checkpoint has no quantization_config")
        return QuantConfig.online(requested, quantize_lm_head) if requested else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != compressed_tensors.QUANT_METHOD:
        raise QuantizationError(
            f"quantization_config: quantization method {method or 'unknown'!r} is not supported "
            f"(supported: {compressed_tensors.QUANT_METHOD!r})")
    if requested not in (None, compressed_tensors.QUANT_METHOD):
        raise QuantizationError(
            f"quantization: {requested!r} asked for, but the checkpoint is already quantized "
            f"({method}); leave quantization unset")
    return compressed_tensors.parse_config(qc)


def check_lm_head_request(requested: str | None) -> None:
    """quantize_lm_head needs a method to quantize with at load (int8 / int4 / fp8 / w8a8); a
    compressed-tensors checkpoint's `ignore` list says whether its lm_head is quantized."""
    if requested not in ONLINE_NAMES:
        raise QuantizationError(
            f"quantize_lm_head: needs quantization set to one of {', '.join(ONLINE_NAMES)} "
            f"(got {requested!r}); a compressed-tensors checkpoint quantizes its lm_head unless "
            "its quantization_config.ignore lists it")


def module_name(hf_weight_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'."""
    return hf_weight_name.rsplit(".", 1)[0]


def layer_arrays(ckpt: SafetensorsCheckpoint, hf_weight_name: str, quant: QuantConfig,
                 out_dim: int, in_dim: int) -> dict[str, np.ndarray]:
    """The quantized tensors of one projection, from the checkpoint or quantized here."""
    module = module_name(hf_weight_name)
    if quant.source != "online":
        return compressed_tensors.read_layer(ckpt, module, quant, out_dim, in_dim)
    if hf_weight_name not in ckpt:
        raise CheckpointError(f"tensor {hf_weight_name!r} is missing from the checkpoint in "
                              f"{ckpt.directory}")
    info = ckpt.tensors[hf_weight_name]
    if info.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"tensor {hf_weight_name!r} has dtype {info.dtype}: quantized "
                              "weights without a quantization_config cannot be re-quantized")
    if tuple(info.shape) != (out_dim, in_dim):
        raise CheckpointError(f"tensor {hf_weight_name!r} in {info.file} has shape "
                              f"{tuple(info.shape)}; the config needs {(out_dim, in_dim)}")
    weight = np.asarray(ckpt.get(hf_weight_name), dtype=np.float32)  # [out, in], this one only
    return quantize(weight, quant.method, quant.group_for(in_dim), hf_weight_name)


def log_weight_bytes(state, quant: QuantConfig | None, dtype: str) -> dict[str, float]:
    """Bytes of the loaded parameters; quantized, also the ratio of the quantized projections
    (qweight + scales + zeros) to the same projections in bf16, and of the whole model to
    the unquantized model in `dtype`."""
    from flax import nnx

    total = quantized = quantized_elems = 0
    for path, var in nnx.to_flat_state(state):
        arr = var.get_value()
        nbytes = arr.size * arr.dtype.itemsize
        total += nbytes
        if str(path[-1]) in QUANT_LEAVES:
            quantized += nbytes
        if str(path[-1]) == "qweight":  # int4 holds two weights per byte
            quantized_elems += arr.size * (2 if quant and quant.method == "int4" else 1)
    report: dict[str, float] = {"weight_bytes": total}
    if quant is None:
        logger.info("weights: %.1f MB (%s)", total / 1e6, dtype)
        return report
    unquantized = total - quantized + np.dtype(dtype).itemsize * quantized_elems
    report.update(quantized_bytes=quantized, layer_ratio=quantized / (2 * quantized_elems),
                  model_ratio=total / unquantized, lm_head_quantized=quant.lm_head)
    logger.info(
        "weights: %.1f MB, %s (%s) projections %.1f MB = %.3fx their bf16 size; whole model "
        "%.3fx the %s model (%s; norms unquantized)", total / 1e6,
        quant.name, quant.source, quantized / 1e6, report["layer_ratio"],
        report["model_ratio"], dtype, _lm_head_words(state, quant))
    return report


def _lm_head_words(state, quant: QuantConfig) -> str:
    """How the start-up line states the lm_head and token embeddings."""
    if not quant.lm_head:
        return "lm_head and embeddings unquantized"
    if "qweight" in state["embed_tokens"]:  # tied: one quantized table, see QuantizedEmbedding
        return ("lm_head quantized, tied: the token lookups dequantize their rows of it, "
                "no float copy")
    return "lm_head quantized, token embeddings unquantized (untied)"
