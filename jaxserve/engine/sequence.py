"""Sequence (one generated stream) and RequestState (a user request with its n sequences)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .detokenizer import IncrementalDetokenizer
    from .grammar import GrammarMatcher
    from .outputs import Logprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


_FINISHED = frozenset(
    (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
     SequenceStatus.FINISHED_ABORTED)
)


class Sequence:
    """One stream of tokens: the prompt plus what has been generated, and how much KV exists."""

    def __init__(
        self,
        seq_id: str,
        request: "RequestState",
        index: int,
        params: SamplingParams,
        seed: int | None,
        max_tokens: int,
        arrival_order: int,
    ):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params = params
        self.seed = seed
        self.max_tokens = max_tokens
        self.arrival_order = arrival_order  # FCFS key; preemption picks the largest
        self.prompt_token_ids: list[int] = request.prompt_token_ids
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # scheduled KV (advanced when a chunk is scheduled)
        # async scheduling: tokens sampled by steps whose results are not applied yet; the
        # next step already computes them (as placeholders the runner fills on device)
        self.num_placeholders = 0
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.block_hashes: list[bytes] = []  # hash chain of its full blocks, grown lazily
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        self.text = ""  # cumulative visible text (held-back stop-prefix excluded)
        self.detokenizer: IncrementalDetokenizer | None = None
        # structured outputs: this sequence's grammar matcher (it has consumed every output
        # token, so it survives preemption by recompute unchanged)
        self.grammar: GrammarMatcher | None = None
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if params.logprobs is not None else None
        )
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None

    # ---------------------------------------------------------------- token bookkeeping
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def num_scheduled_output_tokens(self) -> int:
        """Output tokens including those still in flight (the output index of the next)."""
        return len(self.output_token_ids) + self.num_placeholders

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def skip_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt position computed, so cache hits are not used."""
        return self.params.prompt_logprobs is not None

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")


@dataclass(eq=False)
class RequestState:
    """A user request: its prompt, its n sequences and the prompt logprobs (collected once)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    held_seqs: list[Sequence] = field(default_factory=list)  # n > 1 siblings not yet queued
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        return max((s.num_cached_tokens or 0) for s in self.seqs)
