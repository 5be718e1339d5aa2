"""StructuredOutputsParams validation, the grammar cache and the compile bounds (no model)."""

from __future__ import annotations

import threading
import time

import pytest

from jaxserve.engine import InvalidRequestError, SamplingParams, StructuredOutputsParams
from jaxserve.engine.grammar import GrammarBackend, GrammarConfig
from jaxserve.engine.structured_outputs import MAX_CONSTRAINT_CHARS


@pytest.mark.parametrize("kwargs, field", [
    (dict(), "structured_outputs"),
    (dict(regex="a", choice=["b"]), "structured_outputs"),
    (dict(json=3), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(json="[1]"), "structured_outputs.json"),
    (dict(regex=""), "structured_outputs.regex"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(choice=["a", ""]), "structured_outputs.choice"),
    (dict(grammar="x" * (MAX_CONSTRAINT_CHARS + 1)), "structured_outputs.grammar"),
    (dict(json_object=False), "structured_outputs"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        StructuredOutputsParams(**kwargs)
    assert err.value.field == field


def test_sampling_params_take_a_dict():
    params = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert params.structured_outputs == StructuredOutputsParams(choice=("a", "b"))
    with pytest.raises(InvalidRequestError, match="unknown keys"):
        SamplingParams(structured_outputs={"guided_json": {}})


def test_equal_schemas_share_a_key():
    a = StructuredOutputsParams(json={"type": "object", "required": ["x"]})
    b = StructuredOutputsParams(json='{"required": ["x"], "type": "object"}')
    assert a.cache_key() == b.cache_key()


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path)


def test_compiled_grammars_are_cached(tokenizer):
    backend = GrammarBackend(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    first = backend.compile(StructuredOutputsParams(json={"type": "object"}))
    assert backend.compile(StructuredOutputsParams(json='{"type":"object"}')) is first
    assert backend.compile(StructuredOutputsParams(json_object=True)) is not first


def test_compile_time_bound(tokenizer):
    """A compile that does not finish in time is refused; the caller is not held up."""
    backend = GrammarBackend(tokenizer, len(tokenizer), (tokenizer.eos_token_id,),
                             GrammarConfig(compile_timeout_s=0.2, compile_threads=1))
    release = threading.Event()
    backend._pool.submit(release.wait)  # a compile worker stuck on an earlier, slow job
    try:
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError, match="longer than") as err:
            backend.compile(StructuredOutputsParams(regex="(a|b)*c{3,50}"))
        assert err.value.field == "structured_outputs.regex"
        assert time.monotonic() - t0 < 5
    finally:
        release.set()


def test_grammar_size_bound(tokenizer):
    """A schema past the lexer-fuel bound is refused, not built."""
    backend = GrammarBackend(tokenizer, len(tokenizer), (tokenizer.eos_token_id,),
                             GrammarConfig(initial_lexer_fuel=1000))
    props = {f"p{i}": {"type": "string", "pattern": "[a-z]{1,9}"} for i in range(40)}
    with pytest.raises(InvalidRequestError) as err:
        backend.compile(StructuredOutputsParams(json={"type": "object", "properties": props,
                                                      "required": list(props)}))
    assert err.value.field == "structured_outputs.json"
