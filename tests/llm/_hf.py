"""HF transformers oracle: greedy generate and prompt log-softmax of the tiny checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Mixed lengths; the longest spans 13 blocks of 8 tokens.
PROMPT_LENS = (100, 5, 37, 61, 1, 24, 9)
NEW_TOKENS = 12


def make_prompts(vocab: int, seed: int = 0, lens=PROMPT_LENS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, n).tolist() for n in lens]


@dataclass
class HFReference:
    prompts: list[list[int]]
    greedy: list[list[int]]  # NEW_TOKENS greedy ids per prompt
    prompt_logprobs: list[np.ndarray]  # [len(prompt) - 1]: log p(prompt[i] | prompt[:i])


def hf_reference(path: str, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> HFReference:
    """Greedy continuations (exactly `new_tokens`, EOS never stops) and prompt logprobs."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy, logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                eos_token_id=None, pad_token_id=0,
            )
            greedy.append(out[0, len(p):].tolist())
            lsm = torch.log_softmax(model(ids).logits[0].double(), dim=-1).numpy()
            logprobs.append(lsm[np.arange(len(p) - 1), p[1:]])
    assert all(len(g) == new_tokens for g in greedy)
    return HFReference(prompts, greedy, logprobs)
