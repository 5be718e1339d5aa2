"""Counts XLA backend compiles and persistent-cache loads through jax.monitoring (the recompile
guard's eyes)."""

from __future__ import annotations

import threading

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Process-wide counts, installed once, read by runners and tests: `count` XLA compiles,
    loads from the persistent compilation cache included (JAX reports both as one event), and
    `cache_hits` the loads alone; the same two per thread (thread_counts)."""

    _lock = threading.Lock()
    _installed = False
    _local = threading.local()
    count = 0
    cache_hits = 0

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
            jax.monitoring.register_event_listener(cls._on_event)
            cls._installed = True

    @classmethod
    def thread_counts(cls) -> tuple[int, int]:
        """(backend compiles, cache hits) seen so far on the calling thread."""
        return getattr(cls._local, "compiles", 0), getattr(cls._local, "hits", 0)

    @classmethod
    def _on_duration(cls, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with cls._lock:
                cls.count += 1
            cls._local.compiles = getattr(cls._local, "compiles", 0) + 1

    @classmethod
    def _on_event(cls, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            with cls._lock:
                cls.cache_hits += 1
            cls._local.hits = getattr(cls._local, "hits", 0) + 1
