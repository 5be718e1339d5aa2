"""Tool-call parsers on text: hermes blocks (whole and streamed), the required array, and the
constraints tool_choice builds."""

from __future__ import annotations

import json

import pytest

from jaxserve.engine import InvalidRequestError
from jaxserve.serving.openai_protocol import Tool
from jaxserve.serving.tool_calls import HermesParser, RequiredParser, constraint_for

TEXT = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "cet"}}'
        '</tool_call>')
TOOLS = [Tool(type="function", function={"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}),
    Tool(type="function", function={"name": "get_time"})]


def test_hermes_whole_text():
    content, calls = HermesParser().parse(TEXT)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "cet"})]
    assert HermesParser().parse("no calls here") == ("no calls here", [])
    # a malformed block is not a call
    assert HermesParser().parse("<tool_call>{oops</tool_call>")[1] == []


def test_hermes_streamed_one_character_at_a_time():
    parser, content, calls, seen = HermesParser(), "", [], []
    for i in range(1, len(TEXT) + 1):
        delta, new = parser.update(TEXT[:i], finished=i == len(TEXT))
        content += delta
        calls += new
        seen.append(len(calls))
        assert "<" not in content  # the start of a tag is never shown as content
    assert content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    # each call is emitted as soon as its block closes
    assert seen.index(1) == TEXT.index("</tool_call>") + len("</tool_call>") - 1


def test_required_array_items_as_they_complete():
    text = '[{"name": "get_time", "parameters": {"zone": "utc"}}, {"name": "get_weather", ' \
           '"parameters": {"city": "Ro'
    parser = RequiredParser()
    _, first = parser.update(text, finished=False)
    assert [(c.name, c.arguments) for c in first] == [("get_time", '{"zone": "utc"}')]
    _, second = parser.update(text + 'me"}}]', finished=True)
    assert [(c.name, json.loads(c.arguments)) for c in second] == [
        ("get_weather", {"city": "Rome"})]


def test_constraints():
    named = constraint_for(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.json == TOOLS[0].function.parameters
    required = constraint_for(TOOLS, "required", parallel=False).json
    assert required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    assert constraint_for(TOOLS, "auto") is None
    with pytest.raises(InvalidRequestError, match="not in tools"):
        constraint_for(TOOLS, {"type": "function", "function": {"name": "nope"}})
