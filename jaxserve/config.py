"""ModelConfig: the one place an HF `config.json` is read and checked."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


class ConfigError(ValueError):
    """A checkpoint's config cannot be served as it stands."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (default or Llama 3 frequency scaling)."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a decoder-only model, normalised across HF families."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None  # the checkpoint's own dtype name, for dtype="auto"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry; cannot pick a model class")
        _check_quantization(raw)
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        num_kv = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv:
            raise ConfigError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv}"
            )
        head_dim = raw.get("head_dim") or hidden // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:  # Qwen2 carries a window it does not use
            window = None
        return cls(
            architecture=archs[0],
            model_type=raw.get("model_type", ""),
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_dict(raw),
            hidden_act=act,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: str) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"no config.json in {path!r}")
        with open(cfg_path) as f:
            raw = json.load(f)
        if raw.get("auto_map"):
            # Remote code is never executed: we only use the architectures we implement.
            raw = {k: v for k, v in raw.items() if k != "auto_map"}
        return cls.from_dict(raw)


SUPPORTED_QUANT_METHODS = ("compressed-tensors",)  # pre-quantized formats the loader reads


def _check_quantization(raw: dict[str, Any]) -> None:
    """Quantized checkpoints of a method we do not read are refused, naming the method:
    casting their weights without the scales would load garbage. compressed-tensors passes
    here; the weight loader checks its scheme field by field."""
    quant = raw.get("quantization_config") or raw.get("compression_config")
    if not quant:
        return
    method = quant.get("quant_method") or quant.get("format") if isinstance(quant, dict) else None
    if method in SUPPORTED_QUANT_METHODS:
        return
    raise ConfigError(
        f"quantization_config: quantization method {method or 'unknown'!r} is not supported "
        f"(jaxserve loads float32 / bfloat16 / float16 checkpoints, and pre-quantized "
        f"{', '.join(SUPPORTED_QUANT_METHODS)} ones)"
    )


def _rope_from_dict(raw: dict[str, Any]) -> RopeConfig:
    """Read transformers 5's `rope_parameters` or the legacy `rope_theta` + `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in ("default", "llama3", "linear"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (supported: default, llama3, linear)"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def resolve_dtype_name(dtype: str, config: ModelConfig) -> str:
    """Map a user dtype ('auto', 'bf16', ...) to one of float32 / bfloat16 / float16."""
    if dtype == "auto":
        name = str(config.torch_dtype or "float32").replace("torch.", "")
        return _DTYPE_NAMES.get(name, "float32")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: {dtype!r} is not one of auto, float32, bfloat16, float16")
    return _DTYPE_NAMES[dtype]


def read_generation_eos(path: str, config: ModelConfig) -> tuple[int, ...]:
    """EOS ids: generation_config.json's when present, else config.json's."""
    gen_path = os.path.join(path, "generation_config.json")
    eos = None
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        return config.eos_token_ids
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


# generation_config.json keys that become default sampling parameters (vLLM's set and names).
_GENERATION_DEFAULTS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens",
}


def read_generation_defaults(model_path: str, mode: str = "auto") -> dict[str, float | int]:
    """Default sampling parameters, as vLLM's `--generation-config`.

    "auto": the model's generation_config.json; "vllm": none (vLLM's own defaults);
    otherwise a directory holding a generation_config.json. Requests override each field.
    """
    if mode == "vllm":
        return {}
    directory = model_path if mode == "auto" else mode
    gen_path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(gen_path):
        if mode != "auto":
            raise ConfigError(f"generation_config: no generation_config.json in {mode!r}")
        return {}
    with open(gen_path) as f:
        raw = json.load(f)
    return {ours: raw[theirs] for theirs, ours in _GENERATION_DEFAULTS.items()
            if raw.get(theirs) is not None}
