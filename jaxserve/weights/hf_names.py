"""Mapping between our parameter paths and HF checkpoint tensor names."""

from __future__ import annotations

from dataclasses import dataclass

_LAYER_PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "q_norm": "self_attn",
    "k_norm": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
    "input_layernorm": None,
    "post_attention_layernorm": None,
}
_LEAF = {"kernel": "weight", "bias": "bias", "weight": "weight", "embedding": "weight"}


@dataclass(frozen=True)
class HFTensor:
    name: str
    transpose: bool = False  # a Linear `kernel` is [in, out]; HF (and our `weight`) [out, in]


def hf_tensor_for(path: tuple) -> HFTensor:
    """Our parameter path, e.g. ('layers', 3, 'q_proj', 'weight'), -> its HF tensor."""
    *mods, leaf = (str(p) for p in path)
    hf_leaf = _LEAF[leaf]
    transpose = leaf == "kernel"
    if mods[0] == "layers":
        index, module = mods[1], mods[2]
        parent = _LAYER_PARENTS[module]
        middle = f"{parent}.{module}" if parent else module
        return HFTensor(f"model.layers.{index}.{middle}.{hf_leaf}", transpose)
    if mods == ["embed_tokens"]:
        return HFTensor("model.embed_tokens.weight")
    if mods == ["norm"]:
        return HFTensor("model.norm.weight")
    if mods == ["lm_head"]:
        return HFTensor("lm_head.weight", transpose)
    raise KeyError(f"no HF name for parameter path {path}")
