"""Random-weight HF Llama checkpoints for compare.py: config.json, safetensors, a real tokenizer.

Written locally with transformers + torch + tokenizers (no downloads). The tokenizer is a
byte-level BPE whose vocabulary is exactly the model's (specials, the 256 byte symbols, then
merges of byte pairs), so every engine can detokenize any sampled id.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
FIRST_PROMPT_ID = 16  # random prompt ids stay clear of the special tokens


@dataclass(frozen=True)
class ModelShape:
    """Llama shape; `small` has Qwen2.5-0.5B's widths (tied embeddings, 12 layers)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    init_std: float = 0.02

    def num_params(self) -> int:
        d, m, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        layer = d * q + 2 * d * kv + q * d + 3 * d * m + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d

    def weight_bytes_per_decode_step(self, dtype_bytes: int) -> int:
        """Bytes of weights one decode step reads: all but the embedding table, which is
        only gathered (a row per token) unless it is also the tied lm_head."""
        read = self.num_params()
        if not self.tie_word_embeddings:
            read -= self.vocab_size * self.hidden_size
        return read * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


MODELS = {
    "tiny": ModelShape(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                       vocab_size=2048, tie_word_embeddings=False),
    "small": ModelShape(hidden_size=896, intermediate_size=4864, num_hidden_layers=12,
                        num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                        vocab_size=32000, tie_word_embeddings=True),
}


def build_tokenizer(out_dir: str, vocab_size: int):
    """A byte-level BPE tokenizer with exactly vocab_size ids, saved HF-style into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    need = vocab_size - len(vocab)
    if need < 0 or need > len(alphabet) ** 2:
        raise ValueError(f"vocab_size: {vocab_size} cannot be built from byte pairs")
    merges = [(a, b) for a in alphabet for b in alphabet][:need]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} ids, wanted {vocab_size}")
    return fast


def _random_tensors(shape: ModelShape, seed: int, dtype):
    import torch

    gen = torch.Generator().manual_seed(seed)
    d, m, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd

    def normal(*dims):
        return (torch.randn(*dims, generator=gen) * shape.init_std).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    out = {"model.embed_tokens.weight": normal(shape.vocab_size, d), "model.norm.weight": ones(d)}
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = normal(shape.vocab_size, d)
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": normal(q, d),
            p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d),
            p + "self_attn.o_proj.weight": normal(d, q),
            p + "mlp.gate_proj.weight": normal(m, d),
            p + "mlp.up_proj.weight": normal(m, d),
            p + "mlp.down_proj.weight": normal(d, m),
            p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d),
        })
    return out


def write_checkpoint(out_dir: str, shape: ModelShape, dtype: str, seed: int = 0) -> str:
    """config.json, generation_config.json, model.safetensors and the tokenizer in out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tok = build_tokenizer(out_dir, shape.vocab_size)
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings, rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"], dtype=dtype,
    )
    config.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}, f)
    tensors = _random_tensors(shape, seed, getattr(torch, dtype))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "compare_model.json"), "w") as f:
        json.dump(_marker(shape, dtype, seed), f)
    return out_dir


def _marker(shape: ModelShape, dtype: str, seed: int) -> dict:
    return {"seed": seed, "dtype": dtype, **asdict(shape)}


def ensure_checkpoint(root: str, name: str, dtype: str, seed: int = 0) -> str:
    """Path of the `name` checkpoint in `dtype` under root, written unless already there."""
    shape = MODELS[name]
    out = os.path.join(root, f"{name}-{dtype}")
    marker = os.path.join(out, "compare_model.json")
    if os.path.isfile(marker) and os.path.isfile(os.path.join(out, "model.safetensors")):
        with open(marker) as f:
            if json.load(f) == _marker(shape, dtype, seed):
                return out
    return write_checkpoint(out, shape, dtype, seed)
