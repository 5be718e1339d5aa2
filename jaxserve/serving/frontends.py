"""Frontends: run the HTTP and gRPC servers over one AsyncEngine in this event loop; drain; stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from jaxserve.engine.async_engine import AsyncEngine, AsyncEngineConfig
from jaxserve.serving.config import ServeConfig
from jaxserve.serving.grpc_server import start_grpc_server
from jaxserve.serving.metrics import EngineMetrics, StatLogger
from jaxserve.serving.openai_app import build_app
from jaxserve.serving.state import ServerState

logger = logging.getLogger("jaxserve.serving")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM belongs to the drain logic."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Frontends:
    """The servers of one process: start (not ready), `set_engine` (serving), drain, stop."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.state = ServerState(config.model_name)
        self.metrics = EngineMetrics(config.model_name)
        self.engine: AsyncEngine | None = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: _Uvicorn | None = None
        self._uvicorn_task: asyncio.Task | None = None
        self._grpc: Any = None
        self._log_task: asyncio.Task | None = None
        self.engine_died = asyncio.Event()  # set (in this loop) when the engine loop fails

    async def start(self) -> None:
        """Listen on both ports; requests get 503 / UNAVAILABLE until `set_engine`."""
        cfg = self.config
        app = build_app(self.state, cfg, self.metrics.registry)
        sock = _bind(cfg.host, cfg.port)
        self.http_port = sock.getsockname()[1]
        ucfg = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                              timeout_graceful_shutdown=5)
        self._uvicorn = _Uvicorn(ucfg)
        self._uvicorn_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        if cfg.grpc_port >= 0:
            self._grpc, self.grpc_port = await start_grpc_server(self.state, cfg)
        while not self._uvicorn.started and not self._uvicorn_task.done():
            await asyncio.sleep(0.01)
        logger.info("HTTP (OpenAI-compatible) server listening on %s:%d", cfg.host, self.http_port)

    def set_engine(self, llm_engine: Any) -> AsyncEngine:
        """Wrap a built LLMEngine in the async engine and start serving."""
        engine_cfg = AsyncEngineConfig(max_queued_requests=self.config.max_queued_requests,
                                       log_requests=self.config.log_requests)
        loop = asyncio.get_running_loop()

        def on_dead(exc: BaseException) -> None:  # on the engine thread
            loop.call_soon_threadsafe(self._engine_failed, exc)

        self.engine = AsyncEngine(llm_engine, engine_cfg, observer=self.metrics, on_dead=on_dead)
        # multi-process: a lost process is fatal too (the runtime exits soon after telling us)
        add_listener = getattr(getattr(llm_engine, "runner", None), "add_failure_listener", None)
        if add_listener is not None:
            add_listener(on_dead)
        self.state.set_ready(self.engine)
        if self.config.log_stats_interval_s > 0:
            self._log_task = asyncio.create_task(self._log_stats())
        return self.engine

    def _engine_failed(self, exc: BaseException) -> None:
        logger.error("the engine loop failed: %r; health is NOT_SERVING", exc)
        self.state.set_failed()
        self.engine_died.set()

    async def load_engine(self, build: Callable[[], Any]) -> AsyncEngine:
        """Build the LLMEngine (load + compile) off the event loop, then serve it."""
        llm_engine = await asyncio.to_thread(build)
        return self.set_engine(llm_engine)

    async def _log_stats(self) -> None:
        stat_logger = StatLogger(self.metrics)
        while True:
            await asyncio.sleep(self.config.log_stats_interval_s)
            stat_logger.log()

    async def drain(self, grace_period_s: float | None = None) -> bool:
        """No new requests, health NOT_SERVING; wait for in-flight ones, then abort the rest.

        Returns True when everything finished within the grace period.
        """
        grace = self.config.drain_grace_period_s if grace_period_s is None else grace_period_s
        self.state.start_draining()
        if self.engine is None:
            return True
        logger.info("draining: %d requests in flight, grace period %.1fs",
                    self.engine.num_in_flight, grace)
        if await self.engine.wait_until_idle(grace):
            return True
        logger.warning("grace period over: aborting %d requests", self.engine.num_in_flight)
        self.engine.abort_all()
        await self.engine.wait_until_idle(10.0)
        return False

    async def stop(self) -> None:
        """Close both servers and the engine loop."""
        self.state.set_stopped()
        if self._log_task is not None:
            self._log_task.cancel()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._uvicorn_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._uvicorn_task
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
