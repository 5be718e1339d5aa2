"""Llama family: LlamaForCausalLM (incl. Llama 3.x rope scaling) and MistralForCausalLM."""

from __future__ import annotations

from jaxserve.models.decoder import DecoderForCausalLM, FamilySpec


class LlamaForCausalLM(DecoderForCausalLM):
    """Plain Llama: RMSNorm, SwiGLU, RoPE, GQA."""

    spec = FamilySpec()


class MistralForCausalLM(DecoderForCausalLM):
    """Mistral: Llama's layout; its sliding window is applied by the attention config."""

    spec = FamilySpec()
