"""The decoder-only transformer shared by the Llama-like families; a FamilySpec sets the quirks."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.layers.attention import (
    AttentionConfig,
    AttentionMetadata,
    write_and_attend,
)
from jaxserve.layers.linear import (Embedding, Linear, PackedGateUp, PackedProjections,
                                    pack_weights)
from jaxserve.layers.norms import RMSNorm
from jaxserve.layers.quant_scheme import QuantConfig
from jaxserve.layers.quantized_embedding import QuantizedEmbedding
from jaxserve.layers.quantized_linear import QuantizedLinear, kernel_plan, make_linear
from jaxserve.layers.rotary import apply_rotary, inverse_frequencies

KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: (k_pages, v_pages)

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclass(frozen=True)
class FamilySpec:
    """What distinguishes one model family from plain Llama."""

    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden)


class DecoderLayer(nnx.Module):
    """Pre-norm attention + gated MLP block."""

    def __init__(self, cfg: ModelConfig, spec: FamilySpec, attn: AttentionConfig, dtype, rngs,
                 quant: QuantConfig | None = None, matvec: bool = False):
        d, eps, off = cfg.hidden_size, cfg.rms_norm_eps, spec.norm_offset
        lin = lambda i, o, b: make_linear(i, o, bias=b, dtype=dtype, rngs=rngs, quant=quant,
                                          matvec=matvec)
        qkv_bias = spec.qkv_bias or cfg.attention_bias
        self.input_layernorm = RMSNorm(d, eps=eps, offset=off, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, offset=off, dtype=dtype)
        self.q_proj = lin(d, cfg.q_size, qkv_bias)
        self.k_proj = lin(d, cfg.kv_size, qkv_bias)
        self.v_proj = lin(d, cfg.kv_size, qkv_bias)
        self.o_proj = lin(cfg.q_size, d, cfg.attention_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=eps, offset=off, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, eps=eps, offset=off, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        m, mb = cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = lin(d, m, mb)
        self.up_proj = lin(d, m, mb)
        self.down_proj = lin(m, d, mb)
        self.gate_up = None  # PackedGateUp in their place after fuse
        self.qkv = None  # PackedProjections of q, k and v in their place after fuse
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported: {sorted(_ACTIVATIONS)}")
        self.act_name = cfg.hidden_act
        self.shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.rope = cfg.rope
        self.attn = attn

    def __call__(self, x, md: AttentionMetadata, kv: tuple[jax.Array, jax.Array]):
        num_heads, num_kv_heads, head_dim = self.shape
        h = self.input_layernorm(x)  # [T, hidden]
        if self.qkv is not None:
            q, k, v = self.qkv(h)  # [T, q_size], [T, kv_size] x 2
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(-1, num_heads, head_dim)  # [T, Hq, D]
        k = k.reshape(-1, num_kv_heads, head_dim)  # [T, Hkv, D]
        v = v.reshape(-1, num_kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inverse_frequencies(self.rope, head_dim)  # numpy, folded in at trace time
        q = apply_rotary(q, md.positions, inv_freq)
        k = apply_rotary(k, md.positions, inv_freq)
        o, kv = write_and_attend(q, k, v, kv, md, self.attn, head_dim**-0.5)  # o [T, Hq, D]
        x = x + self.o_proj(o.reshape(o.shape[0], -1).astype(x.dtype))
        h = self.post_attention_layernorm(x)
        if self.gate_up is not None:
            gated = self.gate_up(h)  # [T, intermediate]
        else:
            gated = _ACTIVATIONS[self.act_name](self.gate_proj(h)) * self.up_proj(h)
        x = x + self.down_proj(gated)
        return x, kv

    def fuse(self) -> tuple[bool, bool]:
        """After packing: q, k and v become one PackedProjections, gate and up one
        PackedGateUp (silu), where they can; returns which of the two were fused."""
        qkv = [self.q_proj, self.k_proj, self.v_proj]
        if fused_qkv := PackedProjections.fusable(qkv):
            self.qkv = nnx.data(PackedProjections(qkv))
            self.q_proj = self.k_proj = self.v_proj = None
        if fused_mlp := PackedGateUp.fusable(self.gate_proj, self.up_proj, self.act_name):
            self.gate_up = nnx.data(PackedGateUp(self.gate_proj, self.up_proj))
            self.gate_proj = self.up_proj = None
        return fused_qkv, fused_mlp


class DecoderForCausalLM(nnx.Module):
    """Embedding -> N decoder layers -> final norm -> lm_head, over a flat token axis."""

    spec = FamilySpec()

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig, *, dtype, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None, matvec: bool = False):
        """quant: the decoder layers' projections are QuantizedLinear (norms stay in `dtype`;
        the lm_head too unless quant.lm_head, and the token embeddings unless they are the
        quantized tied lm_head). matvec: decode steps' bf16 projections run the CPU kernel."""
        spec = self.spec
        self.tied = cfg.tie_word_embeddings
        head_quant = quant if quant is not None and quant.lm_head else None
        if self.tied and head_quant is not None:  # one quantized table, see QuantizedEmbedding
            self.embed_tokens = QuantizedEmbedding(
                cfg.vocab_size, cfg.hidden_size, dtype=dtype, quant=head_quant,
                matvec=kernel_plan(head_quant, dtype, matvec))
        else:
            self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                          rngs=rngs, matvec=matvec and self.tied)
        self.layers = nnx.List(
            [DecoderLayer(cfg, spec, attn, dtype, rngs, quant, matvec)
             for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, offset=spec.norm_offset, dtype=dtype
        )
        self.lm_head = (
            None
            if self.tied
            else make_linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype,
                             rngs=rngs, quant=head_quant, matvec=matvec)
        )
        self.embed_scale = cfg.hidden_size**0.5 if spec.scale_embeddings else None

    def __call__(self, token_ids: jax.Array, md: AttentionMetadata, kv_cache: KVCache):
        """token_ids int32 [T] -> (hidden [T, hidden] after the final norm, updated kv_cache)."""
        x = self.embed_tokens(token_ids)  # [T, hidden]
        if self.embed_scale is not None:
            x = x * jnp.asarray(self.embed_scale, dtype=x.dtype)
        new_cache = []
        for layer, kv in zip(self.layers, kv_cache):
            x, kv = layer(x, md, kv)
            new_cache.append(kv)
        return self.norm(x), tuple(new_cache)

    def pack_for_cpu(self) -> tuple[int, int, int]:
        """Once after loading, with the CPU kernels on: pack the float and quantized weights
        they read and fuse each layer's q, k, v and its gate, up; returns (weights packed,
        layers whose q, k, v were fused, layers whose gate and up were)."""
        packed = pack_weights(self, (Linear, Embedding, QuantizedLinear))
        head = self.embed_tokens if self.tied else self.lm_head
        if isinstance(head, (Linear, QuantizedLinear)) and head.packed:
            head.f32_out = True  # logits straight from the f32 sums
        fused = [layer.fuse() for layer in self.layers]
        return packed, sum(qkv for qkv, _ in fused), sum(mlp for _, mlp in fused)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        if self.tied:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
