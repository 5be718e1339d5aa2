"""Several processes, one engine: jax.distributed set-up and the step hand-off to followers.

Process 0 owns the scheduler, tokenizer and servers. Every process holds its shards of the
weights and KV cache and runs the same jitted programs on the same inputs (JAX's
multi-controller model): process 0 publishes each step's SchedulerOutput in jax.distributed's
own key-value store (served by the coordinator in process 0), and the followers replay it
through their own ModelRunner. One small RPC per step and no collective program of its own:
nothing is compiled while serving, whatever the size of the step.

Liveness: every process runs a PeerWatchdog (peer_watchdog.py) over the same key-value store.
A peer silent for peer_timeout_s is fatal: process 0's servers hear it first (health turns
NOT_SERVING), then the process exits with status 1. jax.distributed's own heartbeat is longer,
so it only acts if ours could not.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, replace

import numpy as np

import jax

from jaxserve.engine.errors import FatalRunnerError
from jaxserve.runtime.peer_watchdog import PeerWatchdog

logger = logging.getLogger(__name__)

_PREFIX = "jaxserve/step/"
_STOP = b"stop"


@dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed's names: num_processes, process_id, coordinator_address (host:port)."""

    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None
    # our watchdog: a peer silent this long is fatal. Its beat is a Python thread, which a long
    # GIL-holding trace at start-up can starve for seconds on a loaded machine: 30 s, not less.
    peer_timeout_s: float = 30.0
    heartbeat_timeout_seconds: int = 60  # jax's own (it aborts): later than ours
    initialization_timeout: int = 120

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"num_processes: must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id: must be in [0, {self.num_processes}), got "
                             f"{self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError("coordinator_address: required (host:port) when num_processes > 1")

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1

    @property
    def is_follower(self) -> bool:
        return self.process_id > 0


def initialize(cfg: DistributedConfig) -> None:
    """Join the job before any backend is used (gloo collectives on the CPU)."""
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("jax.distributed: process %d of %d, coordinator %s", cfg.process_id,
                cfg.num_processes, cfg.coordinator_address)
    jax.distributed.initialize(
        cfg.coordinator_address, cfg.num_processes, cfg.process_id,
        initialization_timeout=cfg.initialization_timeout,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_seconds,
    )


def start_watchdog(cfg: DistributedConfig) -> PeerWatchdog:
    """Process 0 watches every follower, a follower watches process 0."""
    peers = list(range(1, cfg.num_processes)) if cfg.process_id == 0 else [0]
    watchdog = PeerWatchdog(_client(), cfg.process_id, peers, timeout_s=cfg.peer_timeout_s)
    watchdog.start()
    return watchdog


def _client():
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


class LeaderRunner:
    """Process 0's runner: publishes each step for the followers, then runs it here."""

    def __init__(self, runner, watchdog: PeerWatchdog):
        self.runner = runner
        self.watchdog = watchdog
        self._step = 0
        self._client = _client()
        self.publish_seconds = 0.0  # total time spent publishing (per-step overhead)

    def __getattr__(self, name):  # warmup_report, buckets, num_compilations, ...
        return getattr(self.runner, name)

    def execute(self, scheduler_output):
        import time

        t = time.perf_counter()
        published = replace(scheduler_output, chunks=[self._portable(c) for c in
                                                       scheduler_output.chunks])
        self._client.key_value_set_bytes(f"{_PREFIX}{self._step}", pickle.dumps(published))
        self.publish_seconds += time.perf_counter() - t
        try:
            out = self.runner.execute(scheduler_output)
        except Exception as e:  # a collective with a dead process: no later step can run
            raise FatalRunnerError(f"a process of the {jax.process_count()}-process job "
                                   f"failed during step {self._step}: {e}") from e
        # the followers joined this step's collectives, so they have read its key
        self._client.key_value_delete(f"{_PREFIX}{self._step}")
        self._step += 1
        return out

    def add_failure_listener(self, listener) -> None:
        """listener(exc) hears a lost process (on the watchdog thread) before the exit."""
        self.watchdog.listeners.append(listener)

    def _portable(self, chunk):
        """The chunk as a follower can replay it: a grammar matcher (which lives here, with the
        engine) is replaced by the mask rows it gives this step."""
        if chunk.grammar is None or not chunk.sample:
            return chunk
        drafts = list(chunk.spec_token_ids) if self.runner.spec_k else []
        rows = np.full((1 + len(drafts), self.runner.mask_words), -1, np.int32)
        chunk.grammar.backend.fill_bitmasks([(chunk.grammar, 0, drafts)], rows)
        return replace(chunk, grammar=FilledMask(rows))

    def stop_followers(self) -> None:
        """Tell the followers to leave their loop (engine shutdown)."""
        self.watchdog.stop()
        try:
            self._client.key_value_set_bytes(f"{_PREFIX}{self._step}", _STOP)
        except Exception as e:  # noqa: BLE001 - after a failed step the followers are gone
            logger.warning("could not tell the followers to stop: %s", e)


class FilledMask:
    """A grammar chunk's allowed-token mask rows, computed on process 0 for one step; quacks
    like a matcher for ModelRunner (`.backend.fill_bitmasks`)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows  # int32 [1 + drafts, mask words]
        self.backend = self

    @staticmethod
    def fill_bitmasks(items, bitmask: np.ndarray) -> None:
        for mask, row, _ in items:
            bitmask[row:row + len(mask.rows)] = mask.rows


def follow(runner, watchdog: PeerWatchdog, poll_ms: int = 1000) -> int:
    """A follower's loop: replay every step process 0 publishes until it says stop; returns the
    number of steps run. Waits as long as process 0 is alive (an idle server sends nothing; the
    watchdog ends this process if process 0 goes silent)."""
    client = _client()
    step = 0
    while True:
        try:
            data = client.blocking_key_value_get_bytes(f"{_PREFIX}{step}", poll_ms)
        except Exception as e:  # a timeout while idle: ask again; anything else ends the job
            if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                continue
            raise RuntimeError(f"follower lost process 0 at step {step}: {e}") from e
        if data == _STOP:
            watchdog.stop()
            logger.info("follower: process 0 stopped after %d steps", step)
            return step
        runner.execute(pickle.loads(data))  # our own process 0's dataclasses, never a file
        step += 1
