"""Tool calling: tool_choice -> decoding constraint, and parsers that turn output into tool_calls.

`required` constrains the output to a JSON array of {"name", "parameters"} objects, one of the
tools each; a named function constrains it to that function's parameters (the output is the
arguments). `auto` leaves decoding free and parses `<tool_call>{...}</tool_call>` blocks (the
hermes format) out of the text. Each parser works on the cumulative text so that a stream
emits a tool call as soon as it is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from jaxserve.engine.errors import InvalidRequestError
from jaxserve.engine.structured_outputs import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes",)
_ANY_OBJECT = {"type": "object"}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def to_json(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def function_specs(tools: list[Any]) -> dict[str, dict]:
    """name -> parameters schema of each function tool."""
    specs = {}
    for tool in tools:
        fn = tool.function
        specs[fn.name] = fn.parameters if fn.parameters is not None else _ANY_OBJECT
    return specs


def named_choice(tool_choice: Any) -> str | None:
    """The function name of a {"type": "function", "function": {"name": ...}} tool_choice."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or \
                not isinstance(fn.get("name"), str):
            raise InvalidRequestError("tool_choice", 'must be "none", "auto", "required" or '
                                      '{"type": "function", "function": {"name": ...}}')
        return fn["name"]
    return None


def constraint_for(tools: list[Any], tool_choice: Any,
                   parallel: bool | None = None) -> StructuredOutputsParams | None:
    """The decoding constraint of tool_choice "required" or a named function, else None;
    parallel=False (parallel_tool_calls) allows one call only."""
    specs = function_specs(tools)
    name = named_choice(tool_choice)
    if name is not None:
        if name not in specs:
            raise InvalidRequestError("tool_choice", f"names function {name!r}, which is not "
                                      f"in tools ({sorted(specs)})")
        return StructuredOutputsParams(json=specs[name])
    if tool_choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": schema},
              "required": ["name", "parameters"], "additionalProperties": False}
             for n, schema in specs.items()]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array = {"type": "array", "items": item, "minItems": 1}
    if parallel is False:
        array["maxItems"] = 1
    return StructuredOutputsParams(json=array)


def _complete_json_values(text: str, start: int) -> tuple[list[Any], int]:
    """JSON values separated by commas from `start` (after a '['), as far as they are complete;
    returns them and the index after the last one."""
    decoder = json.JSONDecoder()
    values, pos = [], start
    while True:
        i = pos
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            return values, pos
        values.append(value)
        pos = end


class ToolCallParser:
    """Base: `update(text)` with the cumulative output returns (new content, new tool calls)."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    def update(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError


class RequiredParser(ToolCallParser):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"}."""

    def update(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        start = text.find("[")
        if start < 0:
            return "", []
        values, _ = _complete_json_values(text, start + 1)
        new = [ToolCall(v["name"], json.dumps(v["parameters"], ensure_ascii=False))
               for v in values[len(self.calls):] if isinstance(v, dict) and "name" in v]
        self.calls.extend(new)
        return "", new


class NamedParser(ToolCallParser):
    """A named function: the whole output is its arguments; streamed as argument deltas."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.sent = 0

    def argument_delta(self, text: str) -> str:
        delta, self.sent = text[self.sent:], len(text)
        return delta


class HermesParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the rest is content."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def __init__(self) -> None:
        super().__init__()
        self.content_sent = 0  # characters of content (text outside blocks) sent
        self.blocks_done = 0

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Whole-output parse: (content outside the blocks, stripped, the tool calls)."""
        calls = [c for c in (self._call(m.group(1)) for m in self._BLOCK.finditer(text)) if c]
        content = self._BLOCK.sub("", text).split(self.START)[0].strip()
        return content, calls

    def update(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        blocks = list(self._BLOCK.finditer(text))
        new = [c for c in (self._call(m.group(1)) for m in blocks[self.blocks_done:]) if c]
        self.blocks_done = len(blocks)
        self.calls.extend(new)
        # content: text before the first block start, held back while it may begin a tag
        first = text.find(self.START)
        visible = text if first < 0 else text[:first]
        if first < 0 and not finished:
            for k in range(min(len(self.START) - 1, len(visible)), 0, -1):
                if visible.endswith(self.START[:k]):
                    visible = visible[:-k]
                    break
        delta = visible[self.content_sent:]
        self.content_sent = max(self.content_sent, len(visible))
        return delta, new

    @staticmethod
    def _call(body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        args = value.get("arguments", value.get("parameters", {}))
        return ToolCall(value["name"], args if isinstance(args, str) else
                        json.dumps(args, ensure_ascii=False))


def make_parser(tool_choice: Any, auto_parser: str | None) -> ToolCallParser | None:
    """The parser of a request's tool_choice ("auto" needs the server's --tool-call-parser)."""
    name = named_choice(tool_choice)
    if name is not None:
        return NamedParser(name)
    if tool_choice == "required":
        return RequiredParser()
    if tool_choice in (None, "auto") and auto_parser == "hermes":
        return HermesParser()
    return None
