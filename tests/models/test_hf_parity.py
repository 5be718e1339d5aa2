"""Logits of every model family match HF transformers (PyTorch, CPU) at every position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxserve.weights.loader import load_model
from tests.checkpoints import TINY_ARCHS
from tests.models.forward import paged_logits

# Mixed lengths, the longest spanning many 8-token blocks.
PROMPT_LENS = (37, 5, 61, 1, 24)


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, n).tolist() for n in PROMPT_LENS]


def hf_logits(path: str, prompts, dtype=torch.float32) -> list[np.ndarray]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p])).logits[0]
            out.append(logits.float().numpy())
    return out


def assert_close(ours, theirs, rtol):
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        scale = np.abs(b).max()
        err = np.abs(a - b).max() / scale
        assert err < rtol, f"max |diff| / max |logit| = {err:.2e} >= {rtol}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_float32_logits_match_hf(arch, tiny_checkpoints):
    path = tiny_checkpoints(arch)
    loaded = load_model(path, dtype="float32")
    prompts = make_prompts(loaded.config.vocab_size)
    theirs = hf_logits(path, prompts)
    assert_close(paged_logits(loaded, prompts), theirs, 1e-4)
    # Chunked prefill: later chunks attend to the cached earlier blocks.
    assert_close(paged_logits(loaded, prompts, chunk=16, shuffle_seed=1), theirs, 1e-4)


def test_mistral_sliding_window_matches_hf(tiny_checkpoints):
    path = tiny_checkpoints("MistralForCausalLM", sliding_window=12)
    loaded = load_model(path, dtype="float32")
    prompts = make_prompts(loaded.config.vocab_size, seed=3)
    assert_close(paged_logits(loaded, prompts, chunk=16), hf_logits(path, prompts), 1e-4)
