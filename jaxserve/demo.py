"""The built-in demo model: a small random-weight Llama HF checkpoint with a real BPE tokenizer.

Written locally (no network, no torch): config.json via transformers, weights as safetensors,
a byte-level BPE tokenizer trained with the `tokenizers` library on a built-in text.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks.
Continuous batching lets new requests join the running batch at every step of the engine.
Prefix caching reuses the blocks of a shared system prompt across many requests.
Chunked prefill splits a long prompt so that decodes keep flowing while it is processed.
JAX compiles one program per bucket of shapes; XLA fuses the work for the accelerator.
Tokens per second per GPU, latency under load, and that it simply works.
Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42.
Unicode: café, naïve, jalapeño, Straße, 日本語のテキスト, 中文字符, emoji 🙂🚀, Ελληνικά, русский.
def generate(prompt, max_tokens=16): return model.sample(prompt, temperature=0.7)
"""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class DemoShape:
    """Shape of the random demo Llama (about 4M parameters by default)."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    vocab_target: int = 1500  # BPE training target; the real vocab ends up near it


def build_tokenizer(out_dir: str, vocab_target: int = 1500):
    """Train a byte-level BPE tokenizer on the built-in text; save it HF-style into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def write_random_llama(out_dir: str, shape: DemoShape = DemoShape(), seed: int = 0) -> str:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    tok = build_tokenizer(out_dir, shape.vocab_target)
    vocab = len(tok)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    config.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}, f)
    save_file(_random_llama_tensors(config, seed), os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "jaxserve_demo.json"), "w") as f:
        json.dump({"seed": seed, **asdict(shape)}, f)
    return out_dir


def _random_llama_tensors(config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, m = config.hidden_size, config.intermediate_size
    hd = d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": normal(config.vocab_size, d),
        "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": normal(config.vocab_size, d),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(q, d),
            p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d),
            p + "self_attn.o_proj.weight": normal(d, q),
            p + "mlp.gate_proj.weight": normal(m, d),
            p + "mlp.up_proj.weight": normal(m, d),
            p + "mlp.down_proj.weight": normal(d, m),
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    return tensors


def ensure_demo_model(cache_dir: str | None = None, shape: DemoShape = DemoShape()) -> str:
    """Path of the demo checkpoint, written on first use into the local cache directory."""
    out = os.path.join(cache_dir or DEFAULT_CACHE, "demo-llama")
    marker = os.path.join(out, "jaxserve_demo.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == {"seed": 0, **asdict(shape)}:
                return out
    return write_random_llama(out, shape)
