"""Ahead-of-time compiled executables, one per bucket shape: compiled in parallel at start-up,
looked up by key while serving (a shape that was not compiled is an error, never a recompile)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


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

    def compile_all(
        self, jobs: list[tuple[str, Hashable, Callable[[], Any]]], progress: bool = True
    ) -> float:
        """jobs: (kind, key, lower) where lower() returns a jax `Lowered`.

        Lowering (tracing) runs here in order; XLA compiles run on a thread pool.
        """
        from tqdm.auto import tqdm

        start = time.perf_counter()
        bar = tqdm(total=len(jobs), desc="Compiling buckets", disable=not progress, unit="shape")
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            futures = []
            for kind, key, lower in jobs:
                futures.append((kind, key, pool.submit(lower().compile)))
            for kind, key, fut in futures:
                self._table.setdefault(kind, {})[key] = fut.result()
                bar.update(1)
        bar.close()
        took = time.perf_counter() - start
        logger.info("compiled %d executables in %.1fs (%d threads)", len(jobs), took, workers)
        return took
