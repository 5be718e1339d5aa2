"""RequestLimits: n, stop strings and stop token ids are bounded (configurable) at admission, and
logit_bias + banned ids must fit the sampler's bias row; the engine keeps serving the others."""

from __future__ import annotations

import pytest

from jaxserve.engine import InvalidRequestError, RequestLimits, SamplingParams
from tests.engine.conftest import run_to_completion


def _refused(engine, params: SamplingParams, field: str, prompt=(1, 2, 3)) -> None:
    prompt = prompt if isinstance(prompt, str) else list(prompt)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.field == field, info.value
    assert "bad" not in engine.requests


def test_n_is_bounded_by_default(make_engine):
    engine = make_engine()
    engine.add_request("ok", [1, 2], SamplingParams(n=RequestLimits().max_n, max_tokens=1))
    _refused(engine, SamplingParams(n=10**6, max_tokens=1), "n")
    _refused(engine, SamplingParams(n=RequestLimits().max_n + 1, max_tokens=1), "n")
    assert set(run_to_completion(engine)) == {"ok"}


def test_limits_are_configurable(make_engine, tokenizer):
    limits = RequestLimits(max_n=2, max_stop_strings=3, max_stop_string_chars=4,
                           max_stop_token_ids=5)
    engine = make_engine(tokenizer, limits=limits)
    engine.add_request("ok", [1, 2], SamplingParams(n=2, stop=["abcd"] * 3,
                                                    stop_token_ids=list(range(5)), max_tokens=2))
    _refused(engine, SamplingParams(n=3), "n")
    _refused(engine, SamplingParams(stop=["a"] * 4), "stop")
    _refused(engine, SamplingParams(stop=["abcde"]), "stop")
    _refused(engine, SamplingParams(stop_token_ids=list(range(6))), "stop_token_ids")
    assert set(run_to_completion(engine)) == {"ok"}
    with pytest.raises(ValueError, match="max_n"):
        RequestLimits(max_n=0)


def test_stop_lists_are_bounded_by_default(make_engine, tokenizer):
    engine = make_engine(tokenizer)
    _refused(engine, SamplingParams(stop=[f"s{i}" for i in range(100_000)]), "stop")
    _refused(engine, SamplingParams(stop=["x" * 1_000_000]), "stop")
    _refused(engine, SamplingParams(stop_token_ids=list(range(600))), "stop_token_ids")


def test_bias_plus_banned_ids_must_fit_the_sampler_row(make_engine):
    """min_tokens bans stop ids + EOS; with logit_bias they share one row of the sampler."""
    engine = make_engine(max_biased_token_ids=16, eos_token_ids=(999,))
    bias = {i: 1.0 for i in range(10)}
    engine.add_request("fits", [1, 2], SamplingParams(logit_bias=bias, stop_token_ids=[20, 21],
                                                      min_tokens=2, max_tokens=3))
    engine.add_request("not-banned", [1, 2], SamplingParams(  # min_tokens 0: nothing banned
        logit_bias=bias, stop_token_ids=list(range(100, 120)), max_tokens=3))
    _refused(engine, SamplingParams(logit_bias=bias, stop_token_ids=list(range(100, 106)),
                                    min_tokens=1, max_tokens=3), "stop_token_ids")
    _refused(engine, SamplingParams(logit_bias={i: 1.0 for i in range(17)}), "logit_bias")
    assert set(run_to_completion(engine)) == {"fits", "not-banned"}


def test_lone_surrogates_name_the_field(make_engine, tokenizer):
    """A str that is not valid Unicode text (JSON "\\ud800") is refused before tokenizing."""
    engine = make_engine(tokenizer)
    _refused(engine, SamplingParams(max_tokens=2), "prompt", prompt="a\ud800b")
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", {"prompt": "x\udfff"}, SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop=["ok", "\ud800"])
    assert info.value.field == "stop"
    engine.add_request("ok", "héllo wörld 😀", SamplingParams(max_tokens=2))
    assert set(run_to_completion(engine)) == {"ok"}


def test_logprobs_bounded_by_max_logprobs(make_engine):
    engine = make_engine()
    _refused(engine, SamplingParams(logprobs=21), "logprobs")
    _refused(engine, SamplingParams(prompt_logprobs=30), "prompt_logprobs")
    wide = make_engine(limits=RequestLimits(max_logprobs=50))
    wide.add_request("ok", [1, 2], SamplingParams(logprobs=50, prompt_logprobs=50, max_tokens=2))
    _refused(wide, SamplingParams(logprobs=51), "logprobs")
    assert set(run_to_completion(wide)) == {"ok"}
