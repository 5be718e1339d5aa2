"""Scheduler: continuous batching with chunked prefill and preemption by recompute."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .block_pool import KVBlock
from .kv_cache_manager import KVCacheManager
from .proposers import make_proposer
from .scheduler_output import PLACEHOLDER_TOKEN_ID, ScheduledChunk, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .spec_gate import SpecGate
from .stats import SpecDecodingStats
from ..runtime.runner_output import ModelRunnerOutput


class Scheduler:
    """Decides, each step, which sequences compute which tokens under the token budget.

    Order of service: running decodes, then running partial prefills, then waiting sequences
    (FCFS). When a running sequence needs a block and none is free, the newest running sequence
    not yet scheduled this step is preempted (its blocks freed, recomputed later from the front
    of the waiting queue); older sequences win.

    Speculative decoding: a decode also carries the proposer's draft tokens when the token
    budget and the free blocks allow (drafts never cause a preemption: they are dropped first);
    after verification the rejected tail is rolled back (computed tokens, and the blocks past
    the sequence's end go back to the pool). The gate (SpecGate) skips drafting for sequences
    whose drafts keep being rejected, and for whole steps with a large batch.

    Async scheduling: a sequence's computed tokens advance when its chunk is scheduled, so the
    next step can be scheduled before this one's results are applied. A token still in
    flight is a placeholder (`Sequence.num_placeholders`): the next step's decode carries
    PLACEHOLDER_TOKEN_ID, which the runner replaces on device with the token the step in
    flight samples. A sequence whose in-flight tokens reach max_tokens is not scheduled again
    (it finishes when they land); one that stops on EOS or a stop string has computed one
    token more, which is dropped. Several steps may be in flight; their results are applied
    in the order they were scheduled.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        self.kv = KVCacheManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept sorted by arrival_order
        self.num_preemptions = 0
        self._in_flight: deque[_InFlightStep] = deque()  # oldest first
        self._scheduling: dict[str, Sequence] = {}
        spec = config.speculative
        self.proposer = make_proposer(spec) if spec is not None else None
        self.gate = (SpecGate(spec.disable_by_acceptance, spec.disable_by_batch_size)
                     if spec is not None else None)
        self.spec_stats = SpecDecodingStats.empty(spec.num_speculative_tokens if spec else 0)

    # ---------------------------------------------------------------- queues
    def add_sequence(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def finish_sequence(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take `seq` out of the queues for good and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.num_placeholders = 0
        if self.gate is not None:
            self.gate.forget(seq.seq_id)
        seq.status = status

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- scheduling
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        num_preempted_before = self.num_preemptions
        self._scheduling = {}  # this step's sequences, by id
        blocked = False  # a running sequence is waiting for blocks: admit nobody new
        batch_drafts = self.gate is None or self.gate.batch_allows(len(self.running))
        for decode_pass in (True, False):
            for seq in list(self.running):
                if budget <= 0:
                    break
                if seq.status is not SequenceStatus.RUNNING or seq.seq_id in scheduled:
                    continue
                remaining = seq.num_tokens + seq.num_placeholders - seq.num_computed_tokens
                if (remaining == 1) != decode_pass or self._finishes_in_flight(seq):
                    continue
                num_new = min(remaining, budget)
                drafts = self._propose(seq, budget, batch_drafts) if decode_pass else []
                if drafts and self.kv.allocate_slots(seq, 1 + len(drafts)) is None:
                    drafts = []  # too few free blocks: decode without speculation
                if not drafts and self._allocate_or_preempt(
                        seq, num_new, scheduled, decode_pass) is None:
                    blocked = True
                    continue
                chunks.append(self._make_chunk(seq, num_new, drafts))
                scheduled.add(seq.seq_id)
                budget -= num_new + len(drafts)
        if not blocked and self.num_preemptions == num_preempted_before:
            budget = self._schedule_waiting(budget, chunks)
        out = SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
        )
        if chunks:
            self._in_flight.append(_InFlightStep(self._scheduling, out))
        return out

    @staticmethod
    def _finishes_in_flight(seq: Sequence) -> bool:
        """Its tokens in flight reach max_tokens: it ends when they land, nothing to compute."""
        return seq.num_placeholders > 0 and seq.num_scheduled_output_tokens >= seq.max_tokens

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(seq)
            num_new = min(seq.num_tokens - num_hit_tokens, budget)
            blocks = self.kv.allocate_slots(seq, num_new, hits)
            if blocks is None:
                break  # no preemption on behalf of waiting sequences
            self.waiting.popleft()
            if self.kv.enable_caching and not seq.skip_prefix_cache:
                self.kv.record_prefix_query(seq.num_tokens, num_hit_tokens)
            seq.num_computed_tokens = num_hit_tokens  # _make_chunk adds the chunk
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_hit_tokens
            seq.status = SequenceStatus.RUNNING
            keys = [s.arrival_order for s in self.running]
            self.running.insert(bisect.bisect_right(keys, seq.arrival_order), seq)
            chunks.append(self._make_chunk(seq, num_new))
            budget -= num_new
        return budget

    def _allocate_or_preempt(
        self, seq: Sequence, num_new: int, scheduled: set[str], may_preempt_self: bool
    ) -> list[KVBlock] | None:
        """Allocate, preempting newer unscheduled sequences as needed; None if `seq` must wait
        (or was itself preempted)."""
        while True:
            blocks = self.kv.allocate_slots(seq, num_new)
            if blocks is not None:
                return blocks
            victim = self._pick_victim(seq, scheduled)
            if victim is None:
                if may_preempt_self:
                    self._preempt(seq)
                return None
            self._preempt(victim)

    def _pick_victim(self, seq: Sequence, scheduled: set[str]) -> Sequence | None:
        for cand in reversed(self.running):  # newest first
            if cand.arrival_order <= seq.arrival_order:
                return None
            if cand.seq_id not in scheduled:
                return cand
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_placeholders = 0  # tokens in flight are dropped: recomputed, sampled again
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _propose(self, seq: Sequence, budget: int, batch_drafts: bool) -> list[int]:
        """Draft tokens for `seq`'s decode: at most what the budget, max_tokens and
        max_model_len leave room for; none while min_tokens bans stop ids (those bans are
        per position), nor when the gate says no (batch_drafts: this step's batch-size
        verdict); a decode the gate stops is counted under its rule (acceptance first)."""
        if self.proposer is None or seq.num_output_tokens < seq.params.min_tokens:
            return []
        k = min(budget - 1, seq.max_tokens - seq.num_output_tokens - 1,
                self.config.max_model_len - seq.num_tokens)
        if k <= 0:
            return []
        if not self.gate.acceptance_allows(seq.seq_id):
            self.spec_stats.num_gated_by_acceptance += 1
            return []
        if not batch_drafts:
            self.spec_stats.num_gated_by_batch_size += 1
            return []
        return self.proposer.propose(seq.all_token_ids, k)

    def _make_chunk(self, seq: Sequence, num_new: int, drafts: list[int] = ()) -> ScheduledChunk:
        """The chunk of `seq`'s next `num_new` tokens (placeholders for tokens in flight);
        they count as computed from now on."""
        self._scheduling[seq.seq_id] = seq
        start = seq.num_computed_tokens
        end = start + num_new
        known = seq.num_tokens
        in_flight = [PLACEHOLDER_TOKEN_ID] * seq.num_placeholders
        token_ids = (seq.token_slice(start, min(end, known))
                     + in_flight[:max(0, end - max(start, known))])
        sample = end == known + seq.num_placeholders
        chunk = ScheduledChunk(
            request_id=seq.seq_id,
            token_ids=token_ids + list(drafts),
            spec_token_ids=list(drafts),
            start_pos=start,
            block_table=self.kv.get_block_ids(seq),
            sample=sample,
            sampling_params=seq.params,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=list(seq.output_token_ids) + in_flight,
            seed=seq.seed,
            banned_token_ids=self._banned_token_ids(seq) if sample else (),
            grammar=seq.grammar if sample else None,
        )
        seq.num_computed_tokens = end + len(drafts)  # rejected drafts roll back later
        if sample:
            seq.num_placeholders += 1
        return chunk

    def _banned_token_ids(self, seq: Sequence) -> tuple[int, ...]:
        """EOS and stop token ids are banned until min_tokens outputs exist."""
        if seq.num_scheduled_output_tokens >= seq.params.min_tokens:
            return ()
        banned = set(seq.params.all_stop_token_ids)
        if not seq.params.ignore_eos:
            banned.update(self.config.eos_token_ids)
        return tuple(sorted(banned))

    # ---------------------------------------------------------------- results
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[Sequence]:
        """Apply the results of the oldest step in flight (`scheduler_output`): append sampled
        tokens (filling placeholders), register full blocks whose KV it wrote.

        Sequences finished or preempted since it was scheduled are skipped (a preempted one
        samples again after its recompute). Returns the sequences that got a new token, in
        chunk order.
        """
        if not self._in_flight or self._in_flight[0].output is not scheduler_output:
            raise RuntimeError("results applied out of order: not the oldest step in flight")
        seqs = self._in_flight.popleft().seqs
        sampled: list[Sequence] = []
        for chunk in scheduler_output.chunks:
            seq = seqs.get(chunk.request_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            if chunk.spec_token_ids:
                self._apply_verified(seq, chunk, runner_output)
                sampled.append(seq)
                continue
            if chunk.sample:
                token = runner_output.sampled.get(chunk.request_id)
                if token is None:
                    raise RuntimeError(f"runner sampled no token for {chunk.request_id!r}")
                seq.output_token_ids.append(int(token))
                seq.num_placeholders -= 1
                sampled.append(seq)
            self.kv.cache_computed_blocks(seq, chunk.start_pos + len(chunk.token_ids))
        return sampled

    def _apply_verified(self, seq: Sequence, chunk: ScheduledChunk,
                        runner_output: ModelRunnerOutput) -> None:
        """Keep the accepted drafts plus the one sampled token; roll back the rejected tail."""
        tokens = runner_output.spec_tokens.get(chunk.request_id)
        num_drafts = len(chunk.spec_token_ids)
        if not tokens or len(tokens) > num_drafts + 1:
            raise RuntimeError(f"runner returned {tokens!r} for {chunk.request_id!r} with "
                               f"{num_drafts} draft tokens")
        num_accepted = len(tokens) - 1
        # KV of the last token and of the accepted drafts is right; the rejected slots are not
        seq.num_computed_tokens -= num_drafts - num_accepted
        seq.output_token_ids.extend(int(t) for t in tokens)
        seq.num_placeholders -= 1
        # only full blocks of accepted tokens
        self.kv.cache_computed_blocks(seq, seq.num_computed_tokens)
        self.kv.trim(seq, seq.num_tokens)  # blocks past the accepted end back to the pool
        self.spec_stats.record(num_drafts, num_accepted)
        self.gate.record(seq.seq_id, num_drafts, num_accepted)

    def clear_in_flight(self) -> None:
        self._in_flight.clear()

    def in_flight(self) -> list[Sequence]:
        """Sequences of the steps whose results have not been applied yet."""
        seqs: dict[str, Sequence] = {}
        for step in self._in_flight:
            seqs.update(step.seqs)
        return list(seqs.values())

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)


@dataclass(eq=False)
class _InFlightStep:
    """A scheduled step whose results are not applied yet: its sequences by id."""

    seqs: dict[str, Sequence]
    output: SchedulerOutput
