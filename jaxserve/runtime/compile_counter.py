"""Counts XLA backend compilations through jax.monitoring (the recompile guard's eyes)."""

from __future__ import annotations

import threading

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Process-wide count of backend compiles; installed once, read by runners and tests."""

    _lock = threading.Lock()
    _installed = False
    count = 0

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            jax.monitoring.register_event_duration_secs_listener(cls._on_event)
            cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            cls.count += 1
