"""Structured outputs on the real runner with a random-weight model: only the constraint makes
the output valid. Over many seeds every JSON-schema output validates (jsonschema), every regex
output fully matches and every choice is one of the choices; with n > 1, under preemption, with
prefix caching and with speculative decoding; nothing compiles while serving."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from jaxserve.engine import InvalidRequestError, SamplingParams, StructuredOutputsParams
from tests.llm.test_spec_decode import SPEC

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-f]{2,6}-[0-9]{2,4}(\.[xyz])?"
CHOICES = ["red", "green", "blue", "cyan magenta"]
PROMPTS = ["Hello there", "The quick brown fox", "Numbers: 1 2 3", "def generate(prompt"]


def _params(so: StructuredOutputsParams, seed: int, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=90,
                          structured_outputs=so, **kw)


def _texts(llm, so, seeds, n=1, **kw) -> list[str]:
    params = [_params(so, seed, n, **kw) for seed in seeds]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(seeds))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    texts = []
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", (c.text, c.finish_reason)
            texts.append(c.text)
    return texts


def _check_all(llm, seeds, n=1, **kw) -> None:
    seeds = list(seeds)
    for text in _texts(llm, StructuredOutputsParams(json=SCHEMA), seeds, n, **kw):
        jsonschema.validate(json.loads(text), SCHEMA)
    for text in _texts(llm, StructuredOutputsParams(regex=REGEX), seeds, n, **kw):
        assert re.fullmatch(REGEX, text), text
    for text in _texts(llm, StructuredOutputsParams(choice=CHOICES), seeds, n, **kw):
        assert text in CHOICES, text


def test_random_model_outputs_obey_constraints(make_llm):
    llm = make_llm()
    before = llm.engine.runner.num_compilations
    _check_all(llm, seeds=range(12), n=2)
    assert llm.engine.runner.num_compilations == before  # the mask program was warmed up


def test_unconstrained_random_model_is_not_valid_json(make_llm):
    """The oracle can fail: without the constraint the same requests give no valid JSON."""
    llm = make_llm()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=1, max_tokens=30),
                        use_tqdm=False)
    for o in outs:
        with pytest.raises(ValueError):
            json.loads(o.outputs[0].text)


def test_under_preemption_and_mixed_with_unconstrained(make_llm):
    llm = make_llm(num_kv_blocks=24)  # far fewer blocks than the batch needs at once
    before = llm.stats().num_preemptions
    so = StructuredOutputsParams(json=SCHEMA)
    long_prompt = " ".join(PROMPTS)
    params = [_params(so, s, 2) if s % 2 == 0 else
              SamplingParams(temperature=1.0, seed=s, max_tokens=60, ignore_eos=True)
              for s in range(8)]
    outs = llm.generate([long_prompt] * 8, params, use_tqdm=False)
    assert llm.stats().num_preemptions > before
    for s, o in enumerate(outs):
        if s % 2 == 0:
            for c in o.outputs:
                jsonschema.validate(json.loads(c.text), SCHEMA)
        else:
            assert len(o.outputs[0].token_ids) == 60


def test_greedy_and_prefix_cached_prompts(make_llm):
    llm = make_llm()
    so = StructuredOutputsParams(regex=REGEX)
    prompt = "A shared system prompt that is long enough to fill a few blocks. " * 2
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so)
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].text == first and re.fullmatch(REGEX, first)


def test_async_scheduling_gives_the_synchronous_outputs(make_llm):
    """A constrained request's step is waited for before the next is scheduled (its mask
    follows the sampled token); beside it an unconstrained request goes on."""
    sync_llm, async_llm = make_llm(async_scheduling=False), make_llm(async_scheduling=True)
    so = StructuredOutputsParams(json=SCHEMA)
    params = [_params(so, seed=3), SamplingParams(temperature=1.0, seed=4, max_tokens=20)]
    want = sync_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    before = async_llm.engine._num_waits
    got = async_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert async_llm.engine._num_waits > before
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    jsonschema.validate(json.loads(got[0].outputs[0].text), SCHEMA)


def test_speculative_decoding_masks_verified_positions(make_llm):
    llm = make_llm(speculative_config=SPEC)
    before = llm.engine.runner.num_compilations
    _check_all(llm, seeds=range(4), n=2)
    # greedy too: drafts are proposed from the prompt's n-grams and must pass the mask
    prompt = "ab-12 ab-12 ab-12 ab-12 ab-12 ab"
    so = StructuredOutputsParams(regex=REGEX)
    drafts = llm.stats().spec_decoding.num_draft_tokens
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40,
                                                structured_outputs=so), use_tqdm=False)
    assert re.fullmatch(REGEX, out[0].outputs[0].text)
    assert llm.stats().spec_decoding.num_draft_tokens > drafts  # drafts were verified
    assert llm.engine.runner.num_compilations == before


@pytest.mark.parametrize("so, field", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
     "structured_outputs.json"),
    (dict(regex="(unclosed"), "structured_outputs.regex"),
    (dict(grammar="start: undefined_rule"), "structured_outputs.grammar"),
])
def test_bad_constraints_name_the_field(make_llm, so, field):
    llm = make_llm()
    params = SamplingParams(max_tokens=8, structured_outputs=so)
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(["hi"], params, use_tqdm=False)
    assert err.value.field == field, err.value


def test_grammar_constraint(make_llm):
    llm = make_llm()
    grammar = 'start: "(" num ("+" num)? ")"\nnum: /[1-9][0-9]?/'
    for text in _texts(llm, StructuredOutputsParams(grammar=grammar), range(4)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)", text), text


def test_llm_chat_passes_tools_to_the_template(make_llm):
    llm = make_llm()
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    so = StructuredOutputsParams(json={"type": "object", "properties": {
        "zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": False})
    out = llm.chat([{"role": "user", "content": "time?"}],
                   SamplingParams(temperature=1.0, seed=0, max_tokens=30, structured_outputs=so),
                   use_tqdm=False, chat_template=template, tools=tools)
    assert out[0].prompt == "[get_time]time?"
    assert json.loads(out[0].outputs[0].text)["zone"] in ("utc", "cet")
