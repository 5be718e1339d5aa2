"""JAX's persistent compilation cache, set up so that it keeps every executable."""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

logger = logging.getLogger(__name__)


def use_compilation_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at path (None: no persistent cache).

    Every executable is written, however small or quick to compile, so that a second start-up
    with the same engine settings loads all of them instead of compiling. JAX sets its cache up
    once, at the first compile of a process: when the directory changes it is reset so that the
    new one takes effect even after earlier compiles.
    """
    if path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()
    logger.info("persistent compilation cache: %s", path or "off")
