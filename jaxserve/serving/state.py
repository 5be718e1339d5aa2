"""ServerState: whether the servers are starting, serving or draining, and the engine they share."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from jaxserve.engine.async_engine import AsyncEngine, EngineNotAcceptingError


class Phase(enum.Enum):
    STARTING = "starting"  # loading / compiling: not ready
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: no new requests, in-flight ones finish
    FAILED = "failed"  # the engine loop died: the process is about to exit non-zero
    STOPPED = "stopped"


class NotReadyError(EngineNotAcceptingError):
    """The server is not ready (still starting) or is draining."""


class ServerState:
    """Shared by the HTTP and gRPC servers; listeners hear every phase change (health checks)."""

    def __init__(self, model_name: str, engine: AsyncEngine | None = None):
        self.model_name = model_name
        self.engine: AsyncEngine | None = None
        self.phase = Phase.STARTING
        self._listeners: list[Callable[[Phase], Any]] = []
        if engine is not None:
            self.set_ready(engine)

    def add_listener(self, listener: Callable[[Phase], Any]) -> None:
        self._listeners.append(listener)
        listener(self.phase)

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        for listener in self._listeners:
            listener(phase)

    def set_ready(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._set_phase(Phase.SERVING)

    def start_draining(self) -> None:
        if self.engine is not None:
            self.engine.stop_accepting()
        self._set_phase(Phase.DRAINING)

    def set_stopped(self) -> None:
        self._set_phase(Phase.STOPPED)

    def set_failed(self) -> None:
        self._set_phase(Phase.FAILED)

    @property
    def is_serving(self) -> bool:
        return (self.phase is Phase.SERVING and self.engine is not None
                and not self.engine.is_dead)

    def ready_engine(self) -> AsyncEngine:
        """The engine, or NotReadyError when the server cannot take a new request."""
        if self.engine is None or self.phase is Phase.STARTING:
            raise NotReadyError("the server is starting up and not ready yet")
        if self.phase is not Phase.SERVING:
            raise NotReadyError("the server is shutting down and takes no new requests")
        return self.engine
