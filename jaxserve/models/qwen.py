"""Qwen family: Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm)."""

from __future__ import annotations

from jaxserve.models.decoder import DecoderForCausalLM, FamilySpec


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 / Qwen2.5: biases on the q, k and v projections."""

    spec = FamilySpec(qkv_bias=True)


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: RMSNorm over head_dim on q and k before the rotary embedding."""

    spec = FamilySpec(qk_norm=True)
