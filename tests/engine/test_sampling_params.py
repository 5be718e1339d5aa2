"""SamplingParams: vLLM defaults, normalisation, and ValueErrors that name the field."""

import pytest

from jaxserve.engine import InvalidRequestError, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.stop is None and p.stop_token_ids is None
    assert (p.ignore_eos, p.max_tokens, p.min_tokens) == (False, 16, 0)
    assert p.logprobs is None and p.prompt_logprobs is None and p.logit_bias is None
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy and SamplingParams(temperature=0).greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(5, 6), logit_bias={"7": 1})
    assert p.stop == ["###"] and p.stop_token_ids == [5, 6] and p.logit_bias == {7: 1.0}
    assert SamplingParams(top_k=-1).top_k_enabled is False


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(n=0), "n"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-3), "prompt_logprobs"),
    (dict(seed="x"), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logit_bias={"a": 1.0}), "logit_bias"),
    (dict(logit_bias={1: float("inf")}), "logit_bias"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, InvalidRequestError) and info.value.field == field


def test_verify_catches_later_mutation():
    p = SamplingParams()
    p.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        p.verify()


def test_logit_bias_size_is_bounded():
    SamplingParams(logit_bias={i: 1.0 for i in range(300)})
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={i: 1.0 for i in range(301)})


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty",
                                   "frequency_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e300])
def test_infinite_floats_refused(field, value):
    """Infinity (and finite values that become infinity as float32) name the field."""
    with pytest.raises(InvalidRequestError, match=f"^{field}"):
        SamplingParams(**{field: value})
    with pytest.raises(InvalidRequestError, match="^logit_bias"):
        SamplingParams(logit_bias={3: value})
