"""Sampling parameters through the real runner against HF transformers' generate (the oracle).

Greedy decoding with repetition / presence / frequency penalties, logit bias and min_tokens
(banned stop ids) is deterministic, so each row must equal HF's generate with the matching
logits processors token for token (float32 tiny model). All requests run in one mixed batch,
so a parameter landing on the wrong row changes that row's tokens; top_k=1 equals greedy.
"""

from __future__ import annotations

import pytest
import torch

from jaxserve.engine import SamplingParams
from tests.llm._hf import make_prompts
from tests.llm.conftest import token_prompts

ARCH = "LlamaForCausalLM"
NEW = 10


class PresenceFrequencyPenalty:
    """OpenAI's presence / frequency penalties over the generated tokens (HF has none built in):
    logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        counts = torch.zeros_like(scores)  # [B, V]
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _hf_generate(model, prompt: list[int], case: dict) -> list[int]:
    """HF greedy generate with the processors matching `case` (see CASES)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, max_new_tokens=NEW, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    processors = LogitsProcessorList()
    if "stop_token_ids" in case:  # min_tokens: the stop id is banned for min_tokens tokens
        kwargs.update(eos_token_id=case["stop_token_ids"], min_new_tokens=case["min_tokens"])
    else:
        kwargs.update(eos_token_id=None, min_new_tokens=NEW)
    if "repetition_penalty" in case:
        kwargs["repetition_penalty"] = case["repetition_penalty"]
    if "logit_bias" in case:
        kwargs["sequence_bias"] = {(t,): b for t, b in case["logit_bias"].items()}
    if "presence_penalty" in case or "frequency_penalty" in case:
        processors.append(PresenceFrequencyPenalty(len(prompt), case.get("presence_penalty", 0.0),
                                                   case.get("frequency_penalty", 0.0)))
    with torch.no_grad():
        out = model.generate(ids, logits_processor=processors, **kwargs)
    return out[0, len(prompt):].tolist()


def _params(case: dict) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, **case)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    import transformers

    path = tiny_checkpoints(ARCH)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_mixed_batch_of_sampling_params_equals_hf_generate(make_llm, hf_model):
    llm = make_llm(ARCH)
    vocab = hf_model.config.vocab_size
    drawn = make_prompts(vocab, seed=21, lens=(9, 14, 6, 11, 17, 8, 12))
    prompts = [drawn[i] for i in (0, 1, 4, 2, 3, 5, 6)]
    # Rows 1 and 2 (presence / frequency) get a prompt that ends with the first tokens of its
    # own greedy continuation, which repeats them: the penalties then have tokens to act on,
    # and counting prompt tokens (wrong: they count generated tokens only) would show.
    for row, keep in ((1, 4), (2, 1)):
        prompts[row] = prompts[row] + _hf_generate(hf_model, prompts[row], {})[:keep]
    plain = [o.outputs[0].token_ids for o in llm.generate(
        token_prompts(prompts), _params({}), use_tqdm=False)]
    for p, toks in zip(prompts, plain):  # the oracle agrees on plain greedy first
        assert toks == _hf_generate(hf_model, p, {})
    for row in (1, 2):
        assert len(set(plain[row])) < NEW and plain[row][0] in prompts[row]
    cases = [
        {"repetition_penalty": 1.8},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 1.2},
        {"repetition_penalty": 0.6},
        # Push the third greedy token down and another token up.
        {"logit_bias": {plain[4][2]: -30.0, plain[4][5]: 4.0}},
        # Its own first greedy token as a stop id: banned for 4 tokens, then it may stop.
        {"stop_token_ids": [plain[5][0]], "min_tokens": 4},
        {},  # plain greedy in the same batch
    ]
    outs = llm.generate(token_prompts(prompts), [_params(c) for c in cases], use_tqdm=False)
    changed = 0
    for i, (prompt, case, out) in enumerate(zip(prompts, cases, outs)):
        want = _hf_generate(hf_model, prompt, case)
        comp = out.outputs[0]
        assert comp.token_ids == want, f"row {i} {case}"
        stopped = "stop_token_ids" in case and want[-1] in case["stop_token_ids"]
        assert comp.finish_reason == ("stop" if stopped else "length"), f"row {i}"
        changed += comp.token_ids != plain[i]
    # The parameters really bite: every non-plain row differs from plain greedy.
    assert changed == len(cases) - 1


def test_top_k_1_equals_greedy(make_llm):
    llm = make_llm(ARCH)
    prompts = token_prompts(make_prompts(400, seed=22, lens=(7, 19)))
    greedy = llm.generate(prompts, _params({}), use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=NEW,
                                                ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]
