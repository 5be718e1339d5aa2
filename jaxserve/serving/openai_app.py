"""The OpenAI-compatible HTTP app (FastAPI): routes, API-key check, /health and /metrics."""

from __future__ import annotations

import hmac
import time
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from jaxserve.engine.errors import InvalidRequestError
from jaxserve.serving.body_limit import BodyLimitMiddleware
from jaxserve.serving.config import ServeConfig
from jaxserve.serving.openai_chat import ChatHandler, chat_prompt_ids
from jaxserve.serving.openai_completions import CompletionsHandler
from jaxserve.serving.openai_errors import (
    install_error_handlers,
    model_not_found,
    to_openai_error,
    unauthorized,
)
from jaxserve.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from jaxserve.serving.openai_stream import ClientDisconnected
from jaxserve.serving.state import ServerState

class ApiKeyMiddleware:
    """ASGI middleware: every path but /health (and /metrics unless protected) needs
    `Authorization: Bearer <key>`."""

    def __init__(self, app: Any, api_key: str, protect_metrics: bool = False):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._open_paths = frozenset({"/health"} | (set() if protect_metrics else {"/metrics"}))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self._open_paths:
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await unauthorized().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState, config: ServeConfig,
              registry: CollectorRegistry | None = None) -> FastAPI:
    """The FastAPI app serving `state`'s engine under `config.model_name`."""
    app = FastAPI(title="jaxserve", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_request_bytes)
    if config.api_key:  # added last: runs first, so no unauthenticated body is ever read
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key,
                           protect_metrics=config.protect_metrics)
    created = int(time.time())

    def check_model(name: str | None) -> None:
        if name is not None and name not in (*config.model_names, config.model):
            raise model_not_found(name)

    async def run(handler_cls: type, body: Any, raw: Request) -> Any:
        try:
            check_model(body.model)
            engine = state.ready_engine()
            return await handler_cls(engine, config.model_name)(body, raw)
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            return to_openai_error(exc).response()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.is_serving else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body = generate_latest(registry) if registry is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        max_len = state.engine.engine_config.max_model_len if state.engine else None
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "jaxserve",
                  "root": config.model, "parent": None, "max_model_len": max_len}
                 for name in config.model_names]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await run(CompletionsHandler, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await run(partial(ChatHandler, auto_tool_parser=config.auto_tool_parser),
                         body, raw)

    async def run_tokenizer(fn, body: Any) -> Any:
        """Tokenizer work runs on the engine's tokenizer thread, never on this event loop."""
        try:
            check_model(body.model)
            engine = state.ready_engine()
            return await engine.run_tokenizer(fn, engine, body)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            return to_openai_error(exc).response()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await run_tokenizer(_tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await run_tokenizer(_detokenize, body)

    return app


def _tokenize(engine: Any, body: TokenizeRequest) -> dict:
    tokenizer = engine.tokenizer
    if body.messages is not None:
        chat = ChatCompletionRequest(messages=body.messages,
                                     add_generation_prompt=body.add_generation_prompt)
        tokens = chat_prompt_ids(tokenizer, chat)
    elif body.prompt is not None:
        tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        raise InvalidRequestError("prompt", "give prompt or messages")
    return {"count": len(tokens), "max_model_len": engine.engine_config.max_model_len,
            "tokens": list(tokens)}


def _detokenize(engine: Any, body: DetokenizeRequest) -> dict:
    vocab = engine.engine_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError("tokens", f"{bad[0]} is outside the vocabulary [0, {vocab})")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
