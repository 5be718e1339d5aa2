"""OpenAI-style error objects and the mapping from exceptions to HTTP status codes."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.engine.async_engine import (
    EngineDeadError,
    EngineNotAcceptingError,
    QueueFullError,
    RequestDeadlineError,
)

logger = logging.getLogger("jaxserve.serving")


class OpenAIError(Exception):
    """An error to send as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse_event(self) -> str:
        """The error as a server-sent event (a failure in the middle of a stream)."""
        return f"event: error\ndata: {json.dumps(self.body())}\n\n"


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist.", "invalid_request_error",
                       "model", "model_not_found")


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                       "invalid_request_error", None, "invalid_api_key")


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map an exception raised while serving a request to its OpenAI error."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, EngineNotAcceptingError):
        return OpenAIError(503, str(exc), "service_unavailable_error")
    if isinstance(exc, RequestDeadlineError):
        return OpenAIError(504, str(exc), "timeout_error")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(500, str(exc), "internal_server_error")
    if isinstance(exc, ValueError):
        return OpenAIError(400, str(exc), "invalid_request_error", getattr(exc, "field", None))
    logger.error("request failed: %r", exc)
    return OpenAIError(500, f"internal error: {exc!r}", "internal_server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    error = (first.get("ctx") or {}).get("error")
    field = getattr(error, "field", None)
    if isinstance(error, ValueError) and field:  # our InvalidRequestError, relative to its model
        param = ".".join([*loc[:-1], field])
        return f"{param}: {str(error).removeprefix(field + ': ')}", param
    if first.get("type") == "extra_forbidden":
        return f"{param}: is not supported by this server (unknown or unimplemented field)", param
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as an OpenAI error object (validation errors as 400)."""

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return OpenAIError(400, message, "invalid_request_error", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), type_).response()

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception):
        return to_openai_error(exc).response()
