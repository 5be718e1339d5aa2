"""Model classes keyed by the HF `architectures` name."""

from __future__ import annotations

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models.decoder import DecoderForCausalLM
from jaxserve.models.gemma import GemmaForCausalLM
from jaxserve.models.llama import LlamaForCausalLM, MistralForCausalLM
from jaxserve.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
}


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one jaxserve implements."""


def model_class_for(config: ModelConfig) -> type[DecoderForCausalLM]:
    cls = MODEL_REGISTRY.get(config.architecture)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported; supported: "
            + ", ".join(sorted(MODEL_REGISTRY))
        )
    return cls
