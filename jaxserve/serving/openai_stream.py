"""Helpers of the HTTP handlers: run one API call's engine requests, SSE framing, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from jaxserve.engine.async_engine import AsyncEngine

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, awaitable: Any) -> Any:
    """Await `awaitable`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


async def generate_all(engine: AsyncEngine, prompts: list[Any], params: Any,
                       request_id: str) -> AsyncIterator[tuple[int, Any]]:
    """Yield (prompt index, RequestOutput) as any of the prompts' requests progresses.

    One engine request per prompt; leaving early aborts those still running.
    """
    if len(prompts) == 1:
        outputs = engine.generate(prompts[0], params, request_id)
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt: Any) -> None:
        outputs = engine.generate(prompt, params, f"{request_id}-{index}")
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    queue.put_nowait((index, output, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prompts)]
    remaining = len(tasks)
    try:
        while remaining:
            index, output, exc = await queue.get()
            if exc is not None:
                raise exc
            yield index, output
            if output.finished:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def peek(stream: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """The first item of `stream` (so that errors surface before a response starts) and the rest."""
    first = await stream.__anext__()

    async def rest() -> AsyncIterator[Any]:
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item

    return first, rest()
