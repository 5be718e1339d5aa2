"""EngineStats: a snapshot of KV-cache, prefix-cache and queue counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Counters of one engine. Block counts exclude the reserved null block 0.

    `kv_blocks_free` counts blocks no running request holds (cached ones included);
    `prefix_cache_queries` / `prefix_cache_hits` count tokens.
    """

    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_blocks_cached: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_compilations: int = 0
    num_steps: int = 0  # steps that ran the model
    last_step_num_tokens: int = 0  # tokens scheduled in the latest such step

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
