"""Tiny quantized checkpoints written by the compressed-tensors library's own compressors, and
float copies of a checkpoint with its projections replaced by our dequantized weights."""

from __future__ import annotations

import json
import os
import re
import shutil

PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                        r"\.weight")


def write_compressed(src: str, out: str, *, num_bits: int, type: str, strategy: str,
                     fmt: str, group_size: int | None = None, symmetric: bool = True,
                     ignore: tuple[str, ...] = ("lm_head",)):
    """Quantize `src`'s Linear layers (but `ignore`) with min-max scales computed by
    compressed-tensors' calculate_qparams, compress with its `fmt` compressor and save.
    Returns (path, the in-memory compressed torch model: its forward decompresses)."""
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=num_bits, type=type, strategy=strategy,
                            group_size=group_size, symmetric=symmetric)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=list(ignore)))
    with torch.no_grad():
        for _, module in model.named_modules():
            if not hasattr(module, "weight_scale"):
                continue
            w = module.weight.data  # [out, in]
            g = w.reshape(w.shape[0], -1, group_size) if strategy == "group" else w[:, None, :]
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)  # [out, G]
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(src, f), out)
    return out, model


def write_dequantized_copy(src: str, out: str, method: str, lm_head: bool = False) -> str:
    """`src` with every decoder projection (and with lm_head, the lm_head: `lm_head.weight`,
    or the tied `model.embed_tokens.weight`) replaced by dequantize(quantize(w)) in float32:
    the float model a quantized load must equal."""
    from safetensors.numpy import load_file, save_file

    from jaxserve.layers.quant_scheme import QuantConfig, dequantize, quantize

    shutil.copytree(src, out)
    quant = QuantConfig.online(method)
    with open(os.path.join(out, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    for f in files:
        tensors = load_file(os.path.join(out, f))
        for name, w in tensors.items():
            if PROJECTION.fullmatch(name) or (lm_head and name == head):
                arrays = quantize(w, method, quant.group_for(w.shape[1]), name)
                tensors[name] = dequantize(method, arrays["qweight"], arrays["scales"])
        save_file(tensors, os.path.join(out, f), metadata={"format": "pt"})
    return out


def edit_quant_config(path: str, **changes) -> None:
    """Change fields of config.json's quantization_config (dotted keys reach deeper)."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        node = cfg["quantization_config"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def drop_tensor(path: str, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors.pop(name)
    save_file(tensors, file, metadata={"format": "pt"})
