"""Runs jax 0.12's Mosaic GPU interpreter on several devices at once (shard_map over tp).

The interpreter keeps one process-wide simulated memory for all devices and, at the end of every
kernel, asserts that no barrier is allocated anywhere, without first waiting for the other
devices: with two devices the first to finish sees the other's live barriers and fails
("Barrier remains allocated"). `allow_multi_device()` makes that check wait for every device of
the call first (the interpreter's own, otherwise unused, all-device barrier), as the clean-up
that follows it already does. Only the interpreter (CPU tests) is affected.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def allow_multi_device() -> None:
  """Idempotent; patches jax's Mosaic GPU interpreter (jax 0.12) as described above."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  check = gpu_callbacks._assert_no_barriers_allocated

  def wait_all_devices_then_check(token):
    gpu_callbacks._get_shared_memory().barrier.wait()
    return check(token)

  gpu_callbacks._assert_no_barriers_allocated = wait_all_devices_then_check
  logger.info("Mosaic GPU interpreter: end-of-kernel barrier check waits for all devices "
              "(multi-device interpretation)")
