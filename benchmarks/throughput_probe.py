"""Read-only probes of a running LLMEngine: KV slot usage per step and runner vs engine time."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class KVUsage:
    """Slot counts summed over every sampled step (one sample per schedule())."""

    allocated_slots: int = 0  # blocks held by running sequences x block_size
    filled_slots: int = 0  # of those, slots that hold (or are being written with) a token
    peak_blocks: int = 0
    samples: int = 0

    @property
    def waste_pct(self) -> float:
        if not self.allocated_slots:
            return 0.0
        return 100.0 * (1.0 - self.filled_slots / self.allocated_slots)


def sample_kv_usage(scheduler, scheduler_output, usage: KVUsage) -> None:
    """Add one step: every block of every running sequence, and how many of its slots are
    filled once this step has written its tokens. Shared (prefix-cached) blocks count once."""
    kv = scheduler.kv
    bs = kv.block_size
    end = {c.request_id: c.start_pos + len(c.token_ids) for c in scheduler_output.chunks}
    filled: dict[int, int] = {}
    for seq in scheduler.running:
        num_tokens = end.get(seq.seq_id, seq.num_computed_tokens)
        for i, block_id in enumerate(kv.get_block_ids(seq)):
            n = min(bs, max(0, num_tokens - i * bs))
            filled[block_id] = max(filled.get(block_id, 0), n)
    usage.allocated_slots += len(filled) * bs
    usage.filled_slots += sum(filled.values())
    usage.peak_blocks = max(usage.peak_blocks, len(filled))
    usage.samples += 1


class EngineProbe:
    """Wraps scheduler.schedule and runner.execute of one engine (same results, same order)
    to sample KV usage after each schedule and to time the runner; its own cost is tracked
    so it can be taken out of the measured time."""

    def __init__(self, engine):
        self.kv = KVUsage()
        self.runner_s = 0.0
        self.overhead_s = 0.0
        self.steps = 0
        self.by_kind = {"decode": [0, 0.0], "mixed": [0, 0.0]}  # steps, runner seconds
        scheduler, runner = engine.scheduler, engine.runner
        schedule, execute = scheduler.schedule, runner.execute

        def probed_schedule():
            out = schedule()
            t = time.perf_counter()
            if not out.is_empty:
                sample_kv_usage(scheduler, out, self.kv)
            self.overhead_s += time.perf_counter() - t
            return out

        def timed_execute(scheduler_output):
            t = time.perf_counter()
            try:
                return execute(scheduler_output)
            finally:
                took = time.perf_counter() - t
                self.runner_s += took
                self.steps += 1
                decode = all(len(c.token_ids) == 1 for c in scheduler_output.chunks)
                kind = self.by_kind["decode" if decode else "mixed"]
                kind[0] += 1
                kind[1] += took

        scheduler.schedule = probed_schedule
        runner.execute = timed_execute
