"""POST /v1/chat/completions: render the chat template, generate, answer whole or as SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.errors import InvalidRequestError
from jaxserve.serving import openai_format as fmt
from jaxserve.serving.deltas import DeltaTracker
from jaxserve.serving.openai_errors import to_openai_error
from jaxserve.serving.openai_protocol import ChatCompletionRequest
from jaxserve.serving.openai_stream import (
    DONE,
    cancel_on_disconnect,
    generate_all,
    peek,
    sse,
)
from jaxserve.serving.tool_calls import HermesParser, NamedParser, ToolCall, make_parser


def chat_prompt_ids(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The chat rendered with the tokenizer's chat template (tools passed to it), as token ids.

    Templates are code: only the server's own (the model's, or --chat-template) is rendered,
    never one a request supplies.
    """
    if body.chat_template_kwargs and "chat_template" in body.chat_template_kwargs:
        raise InvalidRequestError(
            "chat_template_kwargs.chat_template",
            "chat templates from requests are not rendered; the server uses the model's "
            "template or the one given with --chat-template")
    messages = [m.template_dict() for m in body.messages]
    kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:
        kwargs["tools"] = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools]
    return fmt.render_chat(tokenizer, messages, body.add_generation_prompt,
                           body.continue_final_message, kwargs)


class ChatHandler:
    """Serves one chat completions call against the async engine.

    auto_tool_parser: the server's --tool-call-parser when --enable-auto-tool-choice is set."""

    def __init__(self, engine: AsyncEngine, model_name: str, auto_tool_parser: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.auto_tool_parser = auto_tool_parser
        self.token_text = fmt.TokenText(engine.tokenizer)

    async def __call__(self, body: ChatCompletionRequest, raw: Request):
        params = body.to_sampling_params(self.engine.engine_config.generation_defaults)
        if body.tools and body.effective_tool_choice == "auto" and self.auto_tool_parser is None:
            raise InvalidRequestError("tool_choice", '"auto" tool choice requires '
                                      "--enable-auto-tool-choice and --tool-call-parser to be "
                                      'set on the server (or pass tool_choice "none", '
                                      '"required" or a named function)')
        fmt.refuse_streamed_prompt_logprobs(body)
        ids = await self.engine.run_tokenizer(chat_prompt_ids, self.engine.tokenizer, body)
        prompt = {"prompt_token_ids": ids}
        request_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = generate_all(self.engine, [prompt], params, request_id)
        if not body.stream:
            final = await cancel_on_disconnect(raw, _last(outputs))
            return JSONResponse(self._full(request_id, created, final, body))
        _, stream = await cancel_on_disconnect(raw, peek(outputs))
        return StreamingResponse(self._stream(request_id, created, stream, body),
                                 media_type="text/event-stream")

    def _parser(self, body: ChatCompletionRequest):
        choice = body.effective_tool_choice
        if not body.tools or choice == "none":
            return None
        return make_parser(choice, self.auto_tool_parser)

    def _logprobs(self, body: ChatCompletionRequest, token_ids: list[int],
                  positions: list[dict[int, Any]] | None) -> dict | None:
        if not body.logprobs or positions is None:
            return None
        return fmt.chat_logprobs(token_ids, positions, body.top_logprobs or 0, self.token_text)

    def _message(self, body: ChatCompletionRequest, text: str) -> tuple[dict, bool]:
        """The assistant message of one finished choice, and whether it holds tool calls."""
        parser = self._parser(body)
        if parser is None:
            return {"role": "assistant", "content": text}, False
        if isinstance(parser, NamedParser):
            calls = [ToolCall(parser.name, text)]
            content = None
        elif isinstance(parser, HermesParser):
            content, calls = parser.parse(text)
            content = content or None
        else:
            _, calls = parser.update(text, finished=True)
            content = None
        message = {"role": "assistant", "content": content,
                   "tool_calls": [c.to_json() for c in calls]}
        return message, bool(calls)

    def _full(self, request_id: str, created: int, final: Any, body: ChatCompletionRequest) -> dict:
        choices = []
        for c in final.outputs:
            message, has_calls = self._message(body, c.text)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": self._logprobs(body, list(c.token_ids), c.logprobs),
                "finish_reason": _finish_reason(body, c.finish_reason, has_calls),
                "stop_reason": c.stop_reason,
            })
        return {"id": request_id, "object": "chat.completion", "created": created,
                "model": self.model_name, "choices": choices, "usage": fmt.usage_of([final]),
                "prompt_logprobs": fmt.prompt_logprobs_json(final, self.token_text)}

    async def _stream(self, request_id: str, created: int, outputs: AsyncIterator,
                      body: ChatCompletionRequest) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name}
        extra = {"usage": None} if body.include_usage else {}
        tracker = DeltaTracker()
        tools = _StreamedTools(self, body)
        final = None
        try:
            for index in range(body.n):
                yield sse({**base, "choices": [{"index": index,
                                                "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}],
                           **extra})
            async for _, output in outputs:
                choices = []
                for d in tracker.update(output):
                    delta, has_calls = tools.delta(d)
                    choices.append({
                        "index": d.index,
                        "delta": delta,
                        "logprobs": self._logprobs(body, d.token_ids, d.logprobs),
                        "finish_reason": _finish_reason(body, d.finish_reason, has_calls),
                        "stop_reason": d.stop_reason,
                    })
                if output.finished:
                    final = output
                if choices:
                    yield sse({**base, "choices": choices, **extra})
            if body.include_usage and final is not None:
                yield sse({**base, "choices": [], "usage": fmt.usage_of([final])})
        except Exception as exc:  # noqa: BLE001 - a mid-stream failure becomes an error event
            yield to_openai_error(exc).sse_event()
        yield DONE


class _StreamedTools:
    """Per choice of a stream: its cumulative text and tool-call parser -> one chunk's delta."""

    def __init__(self, handler: ChatHandler, body: ChatCompletionRequest):
        self.handler, self.body = handler, body
        self.text: dict[int, str] = {}
        self.parsers: dict[int, Any] = {}

    def delta(self, d: Any) -> tuple[dict, bool]:
        """(the delta object of completion delta `d`, whether its choice made tool calls)."""
        if d.index not in self.parsers:
            self.parsers[d.index] = self.handler._parser(self.body)
        parser = self.parsers[d.index]
        if parser is None:
            return ({"content": d.text} if d.text else {}), False
        text = self.text.get(d.index, "") + d.text
        self.text[d.index] = text
        if isinstance(parser, NamedParser):
            calls = []
            if not parser.calls:
                parser.calls.append(ToolCall(parser.name, ""))
                calls.append(parser.calls[0].to_json(index=0))
            args = parser.argument_delta(text)
            if calls:
                calls[0]["function"]["arguments"] = args
            elif args:
                calls.append({"index": 0, "function": {"arguments": args}})
            return ({"tool_calls": calls} if calls else {}), True
        first = len(parser.calls)
        content, new = parser.update(text, finished=d.finish_reason is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if new:
            delta["tool_calls"] = [c.to_json(index=first + i) for i, c in enumerate(new)]
        return delta, bool(parser.calls)


def _finish_reason(body: ChatCompletionRequest, reason: str | None, has_calls: bool) -> str | None:
    """"tool_calls" when the model chose to call tools (auto / required) and stopped."""
    if reason == "stop" and has_calls and body.effective_tool_choice in ("auto", "required"):
        return "tool_calls"
    return reason


async def _last(outputs: AsyncIterator) -> Any:
    final = None
    async for _, output in outputs:
        final = output
    return final
