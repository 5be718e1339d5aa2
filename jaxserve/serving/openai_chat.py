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


def chat_prompt_ids(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The chat rendered with the tokenizer's chat template, as token ids.

    Templates are code: only the server's own (the model's, or --chat-template) is rendered,
    never one a request supplies.
    """
    if body.chat_template_kwargs and "chat_template" in body.chat_template_kwargs:
        raise InvalidRequestError(
            "chat_template_kwargs.chat_template",
            "chat templates from requests are not rendered; the server uses the model's "
            "template or the one given with --chat-template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    return fmt.render_chat(tokenizer, messages, body.add_generation_prompt,
                           body.continue_final_message, body.chat_template_kwargs)


class ChatHandler:
    """Serves one chat completions call against the async engine."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.token_text = fmt.TokenText(engine.tokenizer)

    async def __call__(self, body: ChatCompletionRequest, raw: Request):
        params = body.to_sampling_params(self.engine.engine_config.generation_defaults)
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

    def _logprobs(self, body: ChatCompletionRequest, token_ids: list[int],
                  positions: list[dict[int, Any]] | None) -> dict | None:
        if not body.logprobs or positions is None:
            return None
        return fmt.chat_logprobs(token_ids, positions, body.top_logprobs or 0, self.token_text)

    def _full(self, request_id: str, created: int, final: Any, body: ChatCompletionRequest) -> dict:
        choices = [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self._logprobs(body, list(c.token_ids), c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        } for c in final.outputs]
        return {"id": request_id, "object": "chat.completion", "created": created,
                "model": self.model_name, "choices": choices, "usage": fmt.usage_of([final]),
                "prompt_logprobs": fmt.prompt_logprobs_json(final, self.token_text)}

    async def _stream(self, request_id: str, created: int, outputs: AsyncIterator,
                      body: ChatCompletionRequest) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name}
        extra = {"usage": None} if body.include_usage else {}
        tracker = DeltaTracker()
        final = None
        try:
            for index in range(body.n):
                yield sse({**base, "choices": [{"index": index,
                                                "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}],
                           **extra})
            async for _, output in outputs:
                choices = [{
                    "index": d.index,
                    "delta": {"content": d.text} if d.text else {},
                    "logprobs": self._logprobs(body, d.token_ids, d.logprobs),
                    "finish_reason": d.finish_reason,
                    "stop_reason": d.stop_reason,
                } for d in tracker.update(output)]
                if output.finished:
                    final = output
                if choices:
                    yield sse({**base, "choices": choices, **extra})
            if body.include_usage and final is not None:
                yield sse({**base, "choices": [], "usage": fmt.usage_of([final])})
        except Exception as exc:  # noqa: BLE001 - a mid-stream failure becomes an error event
            yield to_openai_error(exc).sse_event()
        yield DONE


async def _last(outputs: AsyncIterator) -> Any:
    final = None
    async for _, output in outputs:
        final = output
    return final
