"""Liveness of the other processes of a multi-process job: a stale or unreachable peer is fatal."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class PeerWatchdog(threading.Thread):
    """Every `interval_s`, post this process's beat counter to the coordination service's
    key-value store and read the peers' counters. A peer whose counter has not moved for
    `timeout_s`, or a coordinator that does not answer, is fatal: the listeners hear it first
    (process 0's servers turn NOT_SERVING), then after `grace_s` the process exits with status
    1 — a step may be blocked in a collective with the dead peer, so nothing else can end it.
    """

    def __init__(self, client, process_id: int, peers: list[int], *, interval_s: float = 1.0,
                 timeout_s: float = 30.0, grace_s: float = 3.0):
        super().__init__(name="jaxserve-peer-watchdog", daemon=True)
        self.client, self.process_id, self.peers = client, process_id, peers
        self.interval_s, self.timeout_s, self.grace_s = interval_s, timeout_s, grace_s
        self.listeners: list[Callable[[BaseException], None]] = []
        self._stop = threading.Event()
        self._beat = 0

    def stop(self) -> None:
        """A clean end (the job is finishing): no more checks."""
        self._stop.set()

    def run(self) -> None:
        seen = {p: (b"", time.monotonic()) for p in self.peers}  # last counter, when it changed
        while not self._stop.wait(self.interval_s):
            try:
                self._beat += 1
                self.client.key_value_set_bytes(self._key(self.process_id),
                                                str(self._beat).encode(), allow_overwrite=True)
                now = time.monotonic()
                for p in self.peers:
                    value = self._try_get(p)
                    if value != seen[p][0]:
                        seen[p] = (value, now)
                    elif now - seen[p][1] > self.timeout_s and not self._stop.is_set():
                        self._fail(f"process {p} has not been heard from for "
                                   f"{now - seen[p][1]:.0f}s: it died or is unreachable")
                        return
            except Exception as exc:  # noqa: BLE001 - jaxlib raises XlaRuntimeError subclasses
                if not self._stop.is_set():
                    self._fail(f"the coordination service (process 0) cannot be reached: {exc}")
                return

    def _key(self, process_id: int) -> str:
        return f"jaxserve/alive/{process_id}"

    def _try_get(self, process_id: int) -> bytes:
        try:
            return self.client.key_value_try_get_bytes(self._key(process_id))
        except Exception as exc:  # noqa: BLE001
            if "NOT_FOUND" in str(exc):  # the peer has not posted its first beat yet
                return b""
            raise

    def _fail(self, message: str) -> None:
        message = f"process {self.process_id}: {message}; the job cannot continue"
        logger.error(message)
        error = RuntimeError(message)
        for listener in self.listeners:
            try:
                listener(error)
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the exit
                logger.exception("peer-failure listener failed")
        time.sleep(self.grace_s)
        print(f"jaxserve: {message}; exiting with status 1", file=sys.stderr, flush=True)
        os._exit(1)
