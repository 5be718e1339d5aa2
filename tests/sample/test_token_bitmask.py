"""apply_token_bitmask against a plain numpy unpacking of the packed int32 bitmask, and the
grammar backend's masks against the tokens its matcher accepts."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.sample.processors import apply_token_bitmask


def _reference(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    rows, vocab = logits.shape
    out = np.full_like(logits, -np.inf)
    for b in range(rows):
        for t in range(vocab):
            if (int(bitmask[b, t // 32]) >> (t % 32)) & 1:
                out[b, t] = logits[b, t]
    return out


@pytest.mark.parametrize("vocab", [32, 45, 100])
def test_matches_numpy_unpacking(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(4, vocab)).astype(np.float32)
    words = (vocab + 31) // 32
    bitmask = rng.integers(-2**31, 2**31, size=(4, words), dtype=np.int64).astype(np.int32)
    bitmask[3] = -1  # an unconstrained row: all ones
    got = np.asarray(apply_token_bitmask(logits, bitmask))
    np.testing.assert_array_equal(got, _reference(logits, bitmask))
    np.testing.assert_array_equal(got[3], logits[3])


def test_backend_mask_allows_exactly_the_accepted_tokens(demo_model_path):
    from transformers import AutoTokenizer

    from jaxserve.engine.grammar import GrammarBackend, bitmask_width
    from jaxserve.engine.structured_outputs import StructuredOutputsParams

    tok = AutoTokenizer.from_pretrained(demo_model_path)
    vocab = len(tok) + 7  # the model's vocab may be larger than the tokenizer's
    backend = GrammarBackend(tok, vocab, (tok.eos_token_id,))
    matcher = backend.compile(StructuredOutputsParams(choice=["cat", "dog"])).new_matcher()
    bitmask = np.full((2, bitmask_width(vocab)), -1, np.int32)
    backend.fill_bitmasks([(matcher, 1, [])], bitmask)
    allowed = [t for t in range(vocab) if (int(bitmask[1, t // 32]) >> (t % 32)) & 1]
    assert allowed and all(tok.decode([t]) in ("c", "ca", "cat", "d", "do", "dog")
                           for t in allowed), [tok.decode([t]) for t in allowed]
    assert (bitmask[0] == -1).all()  # other rows untouched
    probe = backend.compile(StructuredOutputsParams(choice=["cat", "dog"])).new_matcher()
    for t in range(len(tok)):
        accepted = probe.matcher.try_consume_tokens([t]) == 1
        if accepted:
            probe.matcher.rollback(1)
        assert accepted == (t in allowed), tok.decode([t])
