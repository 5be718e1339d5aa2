"""EngineStats: a snapshot of KV-cache, prefix-cache and queue counters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingStats:
    """Speculative decoding counters, vLLM's names: drafts (verified decodes with >= 1 draft
    token), draft tokens, accepted tokens, and accepted tokens per draft position; and decodes
    the gate (engine/spec_gate.py) kept from drafting, by rule."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_gated_by_acceptance: int = 0  # decodes of a sequence paused by its low acceptance
    num_gated_by_batch_size: int = 0  # decodes in steps with >= disable_by_batch_size running

    @classmethod
    def empty(cls, num_speculative_tokens: int) -> SpecDecodingStats:
        return cls(num_accepted_tokens_per_pos=[0] * num_speculative_tokens)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.num_accepted_tokens_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verified decode: 1 (the sampled one) + accepted drafts."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.num_accepted_tokens_per_pos),
                                 self.num_gated_by_acceptance, self.num_gated_by_batch_size)


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
    spec_decoding: SpecDecodingStats | None = None  # None when speculation is off

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
