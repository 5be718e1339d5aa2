"""Abort frees blocks; bad input raises ValueError naming the field and the LLM keeps serving."""

from __future__ import annotations

import pytest

from jaxserve.engine import SamplingParams
from tests.llm._hf import make_prompts
from tests.llm.conftest import assert_idle, greedy, token_prompts

ARCH = "LlamaForCausalLM"
PROMPTS = make_prompts(400, seed=21, lens=(40, 13, 70))


@pytest.fixture(scope="module")
def llm_and_expected(make_llm):
    llm = make_llm(ARCH)
    outs = llm.generate(token_prompts(PROMPTS), greedy(8), use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def _still_serves(llm, expected) -> None:
    outs = llm.generate(token_prompts(PROMPTS), greedy(8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_idle(llm)


def test_abort_frees_blocks(llm_and_expected):
    llm, expected = llm_and_expected
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": p}, greedy(40))
    for _ in range(6):
        engine.step()
    s = llm.stats()
    assert s.kv_blocks_free < s.kv_blocks_total and s.num_requests_running > 0
    engine.abort_request(["abort-0", "abort-2"])
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["abort-0"].outputs[0].finish_reason == "abort"
    assert finals["abort-2"].outputs[0].finish_reason == "abort"
    assert finals["abort-1"].outputs[0].finish_reason == "length"
    assert len(finals["abort-1"].outputs[0].token_ids) == 40
    assert_idle(llm)
    # Abort while still waiting (never scheduled) frees nothing it does not hold.
    engine.add_request("abort-w", {"prompt_token_ids": PROMPTS[0]}, greedy(8))
    engine.abort_request("abort-w")
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(llm)
    _still_serves(llm, expected)


BAD_PROMPTS = [
    ("", "prompt"),
    ({"prompt_token_ids": []}, "prompt"),
    ({"prompt_token_ids": [5, 10**6, 7]}, "prompt_token_ids"),
    ({"prompt_token_ids": [5, -1]}, "prompt_token_ids"),
]


@pytest.mark.parametrize("prompt,field", BAD_PROMPTS)
def test_bad_prompt_names_field(llm_and_expected, prompt, field):
    llm, expected = llm_and_expected
    with pytest.raises(ValueError, match=f"^{field}:"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}, prompt], greedy(8), use_tqdm=False)
    _still_serves(llm, expected)


def test_too_long_names_max_tokens(llm_and_expected):
    llm, expected = llm_and_expected
    long_prompt = {"prompt_token_ids": make_prompts(400, lens=(120,))[0]}
    with pytest.raises(ValueError, match="^max_tokens:"):
        llm.generate(long_prompt, greedy(9), use_tqdm=False)  # 120 + 9 > 128
    with pytest.raises(ValueError, match="^prompt:"):
        llm.generate({"prompt_token_ids": [5] * 128}, greedy(1), use_tqdm=False)
    out = llm.generate(long_prompt, greedy(8), use_tqdm=False)[0]  # 120 + 8 == 128 fits
    assert len(out.outputs[0].token_ids) == 8
    _still_serves(llm, expected)


BAD_PARAMS = [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
    (dict(min_tokens=20, max_tokens=5), "min_tokens"),
]


@pytest.mark.parametrize("kwargs,field", BAD_PARAMS)
def test_invalid_sampling_params_name_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_params_checked_against_the_engine(llm_and_expected):
    llm, expected = llm_and_expected
    p = {"prompt_token_ids": PROMPTS[1]}
    with pytest.raises(ValueError, match="^logit_bias:"):
        llm.generate(p, SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="^stop_token_ids:"):
        llm.generate(p, SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    mutated = greedy(8)
    mutated.temperature = -1.0  # changed after construction: caught at add_request
    with pytest.raises(ValueError, match="^temperature:"):
        llm.generate(p, mutated, use_tqdm=False)
    with pytest.raises(ValueError, match="^sampling_params:"):
        llm.generate([p, p], [greedy(8)] * 3, use_tqdm=False)
    _still_serves(llm, expected)


def test_chat_renders_the_template(llm_and_expected):
    llm, expected = llm_and_expected
    conv = [{"role": "user", "content": "The quick brown fox"}]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    outs = llm.chat([conv, conv + [{"role": "assistant", "content": "ok"}]], greedy(4),
                    use_tqdm=False)
    assert outs[0].prompt == text
    assert outs[0].prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert len(outs[1].prompt_token_ids) > len(outs[0].prompt_token_ids)
    plain = llm.generate({"prompt_token_ids": outs[0].prompt_token_ids}, greedy(4), use_tqdm=False)
    assert outs[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    _still_serves(llm, expected)
