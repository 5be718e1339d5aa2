"""Gemma (v1): GeGLU-tanh MLP, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden)."""

from __future__ import annotations

from jaxserve.models.decoder import DecoderForCausalLM, FamilySpec


class GemmaForCausalLM(DecoderForCausalLM):
    """Gemma 1."""

    spec = FamilySpec(norm_offset=True, scale_embeddings=True)
