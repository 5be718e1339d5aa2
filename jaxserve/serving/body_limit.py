"""ASGI middleware: refuse HTTP request bodies over a byte limit (413) before any handler runs."""

from __future__ import annotations

from typing import Any

from jaxserve.serving.openai_errors import OpenAIError


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body: larger than the server's limit of {limit} bytes "
                            "(--max-request-bytes)", "invalid_request_error", "body",
                       "request_too_large")


class BodyLimitMiddleware:
    """Reads a request's whole body (at most `limit` bytes) before handing it to the app.

    A larger Content-Length is refused at once; a chunked body is refused as soon as it passes
    the limit, so a client can never make the server hold or parse more than `limit` bytes.
    """

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(self.limit).response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _too_large(self.limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the disconnect, as the app expects

        await self.app(scope, replay, send)
