"""Write tiny random-weight HF checkpoints with transformers + torch, as a user's would be."""

from __future__ import annotations

import os

import torch

from jaxserve.demo import build_tokenizer

TINY_ARCHS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
)


def _config(arch: str, vocab: int, **overrides):
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        architectures=[arch],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    extra = {
        "LlamaForCausalLM": dict(
            head_dim=24,  # differs from hidden / heads
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
            rope_theta=50000.0,
        ),
        "MistralForCausalLM": dict(sliding_window=4096),
        "Qwen2ForCausalLM": dict(tie_word_embeddings=True),
        "Qwen3ForCausalLM": dict(head_dim=32),
        "GemmaForCausalLM": dict(head_dim=16, hidden_act="gelu_pytorch_tanh"),
    }[arch]
    cls_name = arch.replace("ForCausalLM", "Config")
    return getattr(transformers, cls_name)(**{**common, **extra, **overrides})


def write_tiny_checkpoint(arch: str, out: str, dtype: str = "float32", **overrides) -> str:
    """A 2-layer GQA model of `arch` with random weights (norms too) and a real tokenizer."""
    import transformers

    tok = build_tokenizer(out, vocab_target=500)
    config = _config(arch, len(tok), **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0.0, 0.15)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_truncated_draft(src: str, out: str, num_layers: int = 1) -> str:
    """A draft model from a checkpoint's first `num_layers` layers (same embeddings, final norm,
    lm_head and tokenizer): related to its target, so some drafts are accepted, some not."""
    import shutil

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(src, name), out)
    return out
