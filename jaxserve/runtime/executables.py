"""Ahead-of-time compiled executables, one per bucket shape: compiled in parallel at start-up,
looked up by key while serving (a shape that was not compiled is an error, never a recompile)."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from jaxserve.runtime.compile_counter import CompileCounter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupReport:
    """What start-up compiled: executables in all, how many XLA compiled and how many were loaded
    from the persistent compilation cache (the rest were already in this process's memory),
    seconds per kind and wall seconds."""

    executables: int
    compiled: int
    from_cache: int
    seconds_by_kind: dict[str, float]
    wall_s: float
    threads: int


class ExecutableTable:
    """kind -> key -> jax `Compiled`."""

    def __init__(self) -> None:
        self._table: dict[str, dict[Hashable, Any]] = {}

    def get(self, kind: str, key: Hashable):
        try:
            return self._table[kind][key]
        except KeyError:
            raise RuntimeError(
                f"no {kind} executable for shape {key}: only shapes compiled at start-up run"
            ) from None

    def counts(self) -> dict[str, int]:
        """kind -> number of executables."""
        return {kind: len(keys) for kind, keys in self._table.items()}

    def compile_all(
        self, jobs: list[tuple[str, Hashable, Callable[[], Any]]], progress: bool = True,
        threads: int | None = None,
    ) -> WarmupReport:
        """jobs: (kind, key, lower) where lower() returns a jax `Lowered`.

        Lowering (tracing) runs here in order; XLA compiles (or persistent-cache loads) run on a
        thread pool of `threads` (default: one per core, at most 8).
        """
        from tqdm.auto import tqdm

        CompileCounter.install()
        start = time.perf_counter()
        workers = threads or max(1, min(8, os.cpu_count() or 1))
        bar = tqdm(total=len(jobs), desc="Compiling buckets", disable=not progress, unit="exe")
        try:
            done = _compile_in_pool(jobs, workers, bar)
        finally:
            bar.close()
        seconds: Counter[str] = Counter()
        for kind, key, exe, took, how in done:
            self._table.setdefault(kind, {})[key] = exe
            seconds[kind] += took
            logger.debug("%s %s: %.2fs (%s)", kind, key, took, how)
        hows = Counter(how for *_, how in done)
        report = WarmupReport(len(jobs), hows["compiled"], hows["cache"], dict(seconds),
                              time.perf_counter() - start, workers)
        by_kind = Counter(kind for kind, _, _ in jobs)
        logger.info(
            "%d executables ready in %.1fs (%s; %d threads): %d compiled, %d from the persistent "
            "compilation cache", report.executables, report.wall_s,
            ", ".join(f"{n} {kind}" for kind, n in by_kind.items()), workers,
            report.compiled, report.from_cache,
        )
        return report


def _compile_in_pool(jobs, workers: int, bar) -> list[tuple[str, Hashable, Any, float, str]]:
    """Lower each job here, in order, while the pool compiles the ones lowered before."""
    done = []
    with ThreadPoolExecutor(workers) as pool:
        futures = [(kind, key, pool.submit(_compile, lower())) for kind, key, lower in jobs]
        for kind, key, fut in futures:
            done.append((kind, key, *fut.result()))
            bar.set_postfix_str(f"{kind} {key}", refresh=False)
            bar.update(1)
    return done


def _compile(lowered) -> tuple[Any, float, str]:
    """(executable, seconds, how: "compiled", "cache" (persistent cache) or "memory")."""
    before = CompileCounter.thread_counts()
    t0 = time.perf_counter()
    exe = lowered.compile()
    took = time.perf_counter() - t0
    compiles, hits = (a - b for a, b in zip(CompileCounter.thread_counts(), before))
    # JAX reports a compile event for persistent-cache loads too: a hit decides
    return exe, took, "cache" if hits else "compiled" if compiles else "memory"
