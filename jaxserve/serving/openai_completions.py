"""POST /v1/completions: one engine request per prompt, whole or streamed as SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.serving import openai_format as fmt
from jaxserve.serving.deltas import DeltaTracker
from jaxserve.serving.openai_errors import to_openai_error
from jaxserve.serving.openai_protocol import CompletionRequest
from jaxserve.serving.openai_stream import (
    DONE,
    cancel_on_disconnect,
    generate_all,
    peek,
    sse,
)


class CompletionsHandler:
    """Serves one completions call against the async engine."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.token_text = fmt.TokenText(engine.tokenizer)

    def _prompts(self, body: CompletionRequest) -> list[Any]:
        return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in body.prompts()]

    async def __call__(self, body: CompletionRequest, raw: Request):
        params = body.to_sampling_params(self.engine.engine_config.generation_defaults)
        fmt.refuse_streamed_prompt_logprobs(body)
        prompts = self._prompts(body)
        request_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outputs = generate_all(self.engine, prompts, params, request_id)
        if not body.stream:
            finals = await cancel_on_disconnect(raw, _collect(outputs, len(prompts)))
            return JSONResponse(self._full(request_id, created, finals, body))
        _, stream = await cancel_on_disconnect(raw, peek(outputs))
        return StreamingResponse(self._stream(request_id, created, stream, body),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------ whole result
    def _full(self, request_id: str, created: int, finals: list[Any],
              body: CompletionRequest) -> dict:
        choices = []
        for prompt_index, output in enumerate(finals):
            prompt_logprobs = fmt.prompt_logprobs_json(output, self.token_text)
            for c in output.outputs:
                logprobs = None
                if body.logprobs is not None and c.logprobs is not None:
                    logprobs = fmt.completion_logprobs(list(c.token_ids), c.logprobs,
                                                       body.logprobs, 0, self.token_text)
                choices.append({
                    "index": prompt_index * body.n + c.index,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "prompt_logprobs": prompt_logprobs,
                })
        return {"id": request_id, "object": "text_completion", "created": created,
                "model": self.model_name, "choices": choices, "usage": fmt.usage_of(finals)}

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request_id: str, created: int, outputs: AsyncIterator,
                      body: CompletionRequest) -> AsyncIterator[str]:
        trackers: dict[int, DeltaTracker] = {}
        text_offsets: dict[int, int] = {}
        finals: dict[int, Any] = {}
        base = {"id": request_id, "object": "text_completion", "created": created,
                "model": self.model_name}
        try:
            async for prompt_index, output in outputs:
                tracker = trackers.setdefault(prompt_index, DeltaTracker())
                choices = []
                for d in tracker.update(output):
                    index = prompt_index * body.n + d.index
                    logprobs = None
                    if body.logprobs is not None and d.logprobs is not None:
                        logprobs = fmt.completion_logprobs(
                            d.token_ids, d.logprobs, body.logprobs, text_offsets.get(index, 0),
                            self.token_text)
                    text_offsets[index] = text_offsets.get(index, 0) + len(d.text)
                    choices.append({"index": index, "text": d.text, "logprobs": logprobs,
                                    "finish_reason": d.finish_reason,
                                    "stop_reason": d.stop_reason})
                if output.finished:
                    finals[prompt_index] = output
                if choices:
                    chunk = {**base, "choices": choices}
                    if body.include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
            if body.include_usage:
                yield sse({**base, "choices": [], "usage": fmt.usage_of(list(finals.values()))})
        except Exception as exc:  # noqa: BLE001 - a mid-stream failure becomes an error event
            yield to_openai_error(exc).sse_event()
        yield DONE


async def _collect(outputs: AsyncIterator, num_prompts: int) -> list[Any]:
    """The final RequestOutput of each prompt, in prompt order."""
    finals: dict[int, Any] = {}
    async for prompt_index, output in outputs:
        if output.finished:
            finals[prompt_index] = output
    return [finals[i] for i in range(num_prompts)]
