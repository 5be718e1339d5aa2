"""The engine -> runner contract: one step's scheduled chunks, and the runner Protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .sampling_params import SamplingParams
from ..runtime.runner_output import ModelRunnerOutput

# Async scheduling: a token the step in flight samples (its value is not on the host yet). It
# is the last of a decode chunk's token_ids (and of output_token_ids); the runner puts the
# sampled token in its place on device.
PLACEHOLDER_TOKEN_ID = -2


@dataclass
class ScheduledChunk:
    """One sequence's work in this step: compute KV for `token_ids`, maybe sample one token."""

    request_id: str  # the internal sequence id (a child id for n > 1)
    token_ids: list[int]  # a prefill chunk, or [last token] for a decode
    start_pos: int  # absolute position of token_ids[0] (= num_computed_tokens before the step)
    block_table: list[int]  # ALL the sequence's physical block ids, covering start_pos + len
    sample: bool  # the chunk reaches the last known token -> sample one new token
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far; len() is the output index for seeding
    seed: int | None  # effective seed of this sequence (None = unseeded)
    banned_token_ids: tuple[int, ...] = ()  # forced to -inf this step (min_tokens)
    # Speculative decoding: draft tokens, also the tail of token_ids ([last token] + drafts);
    # the runner scores every position and returns the accepted prefix plus one more token.
    spec_token_ids: list[int] = field(default_factory=list)
    # Structured outputs: the sequence's grammar matcher (engine.grammar.GrammarMatcher) when
    # the chunk samples under a constraint; the runner masks the row's logits with it.
    grammar: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefill(self) -> bool:
        """True unless this is a single-token decode of a sequence past its prompt."""
        return not (len(self.token_ids) == 1 and self.start_pos >= len(self.prompt_token_ids))


@dataclass
class SchedulerOutput:
    """All the work of one step: decodes first, then prefill chunks."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class ModelRunner(Protocol):
    """What the engine needs from a runner; stateless with respect to requests.

    Contract notes for implementers:
    - `execute` returns `sampled[request_id]` for every chunk with `sample=True`,
      `logprobs[request_id]` when `sampling_params.logprobs` is not None, and
      `prompt_logprobs[request_id]` (one row per position p of the chunk with p + 1 < prompt
      length) when `sampling_params.prompt_logprobs` is not None.
    - Use `chunk.seed`, not `sampling_params.seed` (children of an n > 1 request get seed + i),
      and `len(chunk.output_token_ids)` as the output index for seeded sampling.
    - A prefix-cache hit never points at a block whose KV is written in the same step (blocks
      enter the cache only after their step returned), so KV writes and attention reads of
      different chunks in one step need no ordering.
    - Block tables list real blocks only; pad them with block 0 (the null block).
    - An optional `num_compilations` attribute is reported in EngineStats.
    - A chunk with `spec_token_ids` (d drafts) gets `spec_tokens[request_id]`: the accepted
      drafts then one token sampled by rejection sampling (1 .. d + 1 tokens; `sampled` holds
      the first), and `spec_logprobs[request_id]` one row per returned token when asked.
    - A chunk with a `grammar` samples only tokens its grammar allows: the runner fills the
      packed bitmask of its row(s) with `grammar.backend.fill_bitmasks` (rows for its drafts
      too) and masks the logits before sampling; the engine advances the matcher afterwards.
    """

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class PipelinedRunner(ModelRunner, Protocol):
    """A runner that launches a step before the one before it has been read (async
    scheduling): `dispatch` enqueues the step's work and returns a handle at once; `collect`
    waits for the step and returns its results, as `execute` would have.

    `previous` is the handle of the step launched just before, not yet collected (None if
    there is none): each chunk whose last token is PLACEHOLDER_TOKEN_ID takes, in its place,
    the token that step samples for the same request id (in its output_token_ids too, which
    penalties read).
    """

    def dispatch(self, scheduler_output: SchedulerOutput, previous: Any | None) -> Any: ...

    def collect(self, handle: Any) -> ModelRunnerOutput: ...
