"""LLM.chat's conversation check (no model needed): messages need a role and text content, and
text that is not valid Unicode is refused naming the message."""

from __future__ import annotations

import pytest

from jaxserve.engine import InvalidRequestError
from jaxserve.llm import _chat_prompt


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path)


@pytest.mark.parametrize("conversation, field", [
    ([{"role": "user", "content": "a\ud800"}], "messages[0].content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages[1].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0].content"),
])
def test_bad_conversations_name_the_message(tokenizer, conversation, field):
    with pytest.raises(InvalidRequestError) as info:
        _chat_prompt(tokenizer, conversation, True)
    assert info.value.field == field


def test_good_conversation_renders(tokenizer):
    out = _chat_prompt(tokenizer, [{"role": "user", "content": "héllo 😀"},
                                   {"role": "user", "content": [{"type": "text", "text": "x"}]}],
                       True)
    assert out["prompt_token_ids"] and "héllo 😀" in out["prompt"]
