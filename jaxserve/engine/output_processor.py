"""Applies one step's results to sequences: logprobs, stop conditions, text; builds RequestOutputs."""

from __future__ import annotations

from typing import Any

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .logprobs import LogprobsBuilder
from .outputs import CompletionOutput, RequestOutput
from .scheduler_output import SchedulerOutput
from .sequence import RequestState, Sequence, SequenceStatus
from ..runtime.runner_output import ModelRunnerOutput


class OutputProcessor:
    """Per new token: record logprobs, decide whether the sequence finished, update its text."""

    def __init__(self, tokenizer: Any | None, config: EngineConfig):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(config.eos_token_ids)
        self.logprobs = LogprobsBuilder(tokenizer)

    def init_sequence(self, seq: Sequence) -> None:
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, seq.params
            )

    # ---------------------------------------------------------------- prompt logprobs
    def collect_prompt_logprobs(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
        seqs: dict[str, Sequence],
    ) -> None:
        """Append prompt logprob rows in position order; rows recomputed after preemption or
        delivered by a sibling are ignored, so each position is collected once."""
        for chunk in scheduler_output.chunks:
            rows = runner_output.prompt_logprobs.get(chunk.request_id)
            seq = seqs.get(chunk.request_id)
            if not rows or seq is None or seq.request.prompt_logprobs is None:
                continue
            collected = seq.request.prompt_logprobs
            num_top = seq.params.prompt_logprobs or 0
            for i, row in enumerate(rows):
                target = chunk.start_pos + i + 1  # row i scores prompt token start_pos + i + 1
                if target == len(collected) and target < seq.num_prompt_tokens:
                    collected.append(self.logprobs.build(row, num_top))

    # ---------------------------------------------------------------- one new token
    def process_token(self, seq: Sequence, runner_output: ModelRunnerOutput,
                      spec_index: int | None = None) -> SequenceStatus | None:
        """Handle `seq`'s newest token; returns the finished status, or None if it goes on.

        spec_index: the token's index among the step's speculative tokens (its logprob row)."""
        token = seq.output_token_ids[-1]
        if seq.logprobs is not None:
            self._record_logprobs(seq, runner_output, spec_index)
        params = seq.params
        status: SequenceStatus | None = None
        stop_reason: int | str | None = None
        skip_text = False
        if seq.num_output_tokens >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                status, skip_text = SequenceStatus.FINISHED_STOPPED, True
            elif params.stop_token_ids and token in params.stop_token_ids:
                status, stop_reason, skip_text = SequenceStatus.FINISHED_STOPPED, token, True
        if status is None and seq.num_output_tokens >= seq.max_tokens:
            status = SequenceStatus.FINISHED_LENGTH
        detok = seq.detokenizer
        if detok is not None:
            stop_str = detok.add_token(token, skip_text and not params.include_stop_str_in_output)
            if stop_str is None and status is not None:
                stop_str = detok.flush()  # held-back text may complete a stop string
            if stop_str is not None:
                status, stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
            seq.text = detok.visible_text(finished=status is not None)
        seq.stop_reason = stop_reason
        return status

    def _record_logprobs(self, seq: Sequence, runner_output: ModelRunnerOutput,
                         spec_index: int | None = None) -> None:
        row = runner_output.logprobs.get(seq.seq_id)
        if spec_index is not None:
            rows = runner_output.spec_logprobs.get(seq.seq_id) or []
            row = rows[spec_index] if spec_index < len(rows) else None
        if row is None or not row.token_ids:
            seq.logprobs.append({})
            return
        seq.logprobs.append(self.logprobs.build(row, seq.params.logprobs or 0))
        seq.cumulative_logprob += float(row.logprobs[0])


def make_request_output(req: RequestState) -> RequestOutput:
    """A snapshot of `req` with cumulative text / token ids of each of its n sequences."""
    outputs = [
        CompletionOutput(
            index=s.index,
            text=s.text,
            token_ids=list(s.output_token_ids),
            cumulative_logprob=s.cumulative_logprob,
            logprobs=list(s.logprobs) if s.logprobs is not None else None,
            finish_reason=s.status.finish_reason,
            stop_reason=s.stop_reason,
        )
        for s in req.seqs
    ]
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
        outputs=outputs,
        finished=req.is_finished,
        num_cached_tokens=req.num_cached_tokens,
    )
