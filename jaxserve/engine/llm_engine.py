"""LLMEngine: add requests, step the scheduler and the runner, stream cumulative RequestOutputs."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .config import EngineConfig
from .errors import EngineStepError, FatalRunnerError, InvalidRequestError
from .grammar import GrammarBackend
from .input_processor import PromptType, parse_prompt, validate_request
from .output_processor import OutputProcessor, make_request_output
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .scheduler_output import ModelRunner, PipelinedRunner, SchedulerOutput
from .sequence import RequestState, Sequence, SequenceStatus
from .stats import EngineStats
from ..runtime.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LaunchedStep:
    """A step launched with async scheduling: its chunks, and the runner's handle of its
    results."""

    scheduler_output: SchedulerOutput
    handle: Any


class LLMEngine:
    """Synchronous engine: `add_request`, then call `step()` until no request is unfinished.

    With `config.async_scheduling`, step() schedules and launches step N + 1 before it waits
    for step N's results, so the host's work (applying results, detokenizing, scheduling,
    packing inputs) overlaps the device's; the runner must be a PipelinedRunner. A step
    whose sampled tokens the host needs before the next step (a grammar masks with them) is
    waited for first.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Any | None, config: EngineConfig):
        if config.async_scheduling and not all(
                callable(getattr(runner, name, None)) for name in ("dispatch", "collect")):
            raise ValueError(f"async_scheduling: the runner {type(runner).__name__} cannot "
                             "launch a step before the last one's results are read")
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler = Scheduler(config)
        self.output_processor = OutputProcessor(tokenizer, config)
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[str, Sequence] = {}
        self._arrival = itertools.count()
        self._pending_outputs: list[RequestOutput] = []  # abort notices for the next step()
        self._num_steps = 0
        self._last_step_num_tokens = 0
        self._launched: _LaunchedStep | None = None  # async scheduling: results not read yet
        self._num_waits = 0  # async scheduling: steps that waited for the one before
        self._grammars: GrammarBackend | None = None
        self._grammars_lock = threading.Lock()  # the async engine compiles on other threads

    # ---------------------------------------------------------------- structured outputs
    @property
    def grammars(self) -> GrammarBackend:
        """The grammar backend (llguidance over this engine's tokenizer), made on first use."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise InvalidRequestError("structured_outputs", "needs a tokenizer")
                eos = self.config.eos_token_ids
                self._grammars = GrammarBackend(self.tokenizer, self.config.vocab_size, eos)
            return self._grammars

    def compile_grammar(self, params: SamplingParams):
        """The compiled grammar of params.structured_outputs (cached; bounded in time). Callers
        off the engine thread (the async engine) call this first so add_request hits the cache."""
        return self.grammars.compile(params.structured_outputs)

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request; raises InvalidRequestError (a ValueError) naming the field."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", f"must be a non-empty str, got {request_id!r}")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"expected SamplingParams, got {type(params)}")
        params.verify()  # catches fields changed after construction
        text, token_ids = parse_prompt(prompt, self.tokenizer, self.config.max_model_len)
        max_tokens = validate_request(token_ids, params, self.config, self.tokenizer is not None)
        grammar = self.compile_grammar(params) if params.structured_outputs is not None else None
        req = RequestState(request_id, text, token_ids, params,
                           arrival_time if arrival_time is not None else time.time())
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if any(s in self.seqs for s in seq_ids):
            raise InvalidRequestError("request_id", f"{request_id!r} clashes with a running request")
        for i, seq_id in enumerate(seq_ids):
            seed = params.seed if params.seed is None or params.n == 1 else params.seed + i
            seq = Sequence(seq_id, req, i, params, seed, max_tokens, next(self._arrival))
            if grammar is not None:
                seq.grammar = grammar.new_matcher()
            self.output_processor.init_sequence(seq)
            req.seqs.append(seq)
            self.seqs[seq_id] = seq
        self.requests[request_id] = req
        self._enqueue_new(req)

    def _enqueue_new(self, req: RequestState) -> None:
        """n > 1 with prefix caching: siblings wait until the first sequence has computed (and
        cached) the prompt's full blocks, then share them."""
        first, rest = req.seqs[0], req.seqs[1:]
        share = (self.config.enable_prefix_caching and rest and not first.skip_prefix_cache
                 and first.num_prompt_tokens > self.config.block_size)
        self.scheduler.add_sequence(first)
        if share:
            req.held_seqs = list(rest)
        else:
            for seq in rest:
                self.scheduler.add_sequence(seq)

    def _release_held(self, req: RequestState) -> None:
        for seq in reversed(req.held_seqs):
            self.scheduler.add_sequence(seq, front=True)
        req.held_seqs = []

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort requests (unknown ids are ignored); their blocks are freed now and a final
        output with finish_reason "abort" comes from the next step()."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            self._finish_request(req, SequenceStatus.FINISHED_ABORTED)
            self._pending_outputs.append(make_request_output(req))

    def _finish_request(self, req: RequestState, status: SequenceStatus) -> None:
        """End every unfinished sequence of `req` with `status` and forget the request."""
        req.held_seqs = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish_sequence(seq, status)
            self.seqs.pop(seq.seq_id, None)
        self.requests.pop(req.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; one RequestOutput per request that progressed (cumulative).

        With async scheduling the outputs are those of the step launched by the previous call
        (this call launches the next one first)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        previous, self._launched = self._launched, None
        if previous is not None and _needs_host_tokens(previous.scheduler_output):
            self._note_wait()
            outputs += self._finish(previous)
            previous = None
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return outputs + (self._finish(previous) if previous is not None else [])
        self._num_steps += 1
        self._last_step_num_tokens = scheduler_output.num_batched_tokens
        if not self.config.async_scheduling:
            with self._runner_errors():
                runner_output = self.runner.execute(scheduler_output)
            return outputs + self._apply(scheduler_output, runner_output)
        with self._runner_errors():
            handle = self.runner.dispatch(
                scheduler_output, previous.handle if previous is not None else None)
        self._launched = _LaunchedStep(scheduler_output, handle)
        return outputs + (self._finish(previous) if previous is not None else [])

    def _finish(self, launched: _LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's results (waiting for them) and apply them."""
        with self._runner_errors():
            runner_output = self.runner.collect(launched.handle)
        return self._apply(launched.scheduler_output, runner_output)

    def _apply(self, scheduler_output: SchedulerOutput,
               runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        with self._runner_errors():
            _check_runner_output(scheduler_output, runner_output)
        return self._process(scheduler_output, runner_output)

    @contextmanager
    def _runner_errors(self) -> Iterator[None]:
        """A runner failure fails every request with work in flight (EngineStepError names
        them); a FatalRunnerError is re-raised as it is."""
        try:
            yield
        except FatalRunnerError:
            self._fail_in_flight()
            raise
        except Exception as exc:
            failed = self._fail_in_flight()
            raise EngineStepError(
                f"model runner failed; failed requests: {failed}: {exc!r}", failed
            ) from exc

    def _note_wait(self) -> None:
        self._num_waits += 1
        log = logger.info if self._num_waits == 1 else logger.debug
        log("async scheduling: a step waits for the one before it, whose sampled tokens a "
            "request's grammar needs on the host (structured outputs); %d such steps so far",
            self._num_waits)

    def _process(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestOutput]:
        sampled = self.scheduler.update_from_output(scheduler_output, runner_output)
        self.output_processor.collect_prompt_logprobs(scheduler_output, runner_output, self.seqs)
        progressed: dict[str, RequestState] = {}
        for seq in sampled:
            status = self._process_new_tokens(seq, runner_output)
            if status is not None:
                self.scheduler.finish_sequence(seq, status)
            req = seq.request
            if req.held_seqs and seq.index == 0:
                self._release_held(req)
            progressed[req.request_id] = req
        outputs = []
        for req in progressed.values():
            outputs.append(make_request_output(req))
            if req.is_finished:
                self._finish_request(req, SequenceStatus.FINISHED_ABORTED)
        return outputs

    def _process_new_tokens(self, seq: Sequence, runner_output: ModelRunnerOutput):
        """Stop checks, logprobs and text for each token the step added to `seq` (several after
        a verified speculative decode: the ones after a stop are dropped)."""
        tokens = runner_output.spec_tokens.get(seq.seq_id)
        if not tokens:
            status = self.output_processor.process_token(seq, runner_output)
            return status if status is not None else _advance_grammar(seq)
        del seq.output_token_ids[len(seq.output_token_ids) - len(tokens):]
        status = None
        for i, token in enumerate(tokens):
            seq.output_token_ids.append(token)
            status = self.output_processor.process_token(seq, runner_output, spec_index=i)
            if status is None:
                status = _advance_grammar(seq)
            if status is not None:
                break
        return status

    def _fail_in_flight(self) -> list[str]:
        """After a runner error: abort every request with work in a step in flight (its
        results not applied), freeing blocks."""
        self._launched = None
        failed: list[str] = []
        for seq in self.scheduler.in_flight():
            req = seq.request
            if req.request_id in self.requests:
                self._finish_request(req, SequenceStatus.FINISHED_ABORTED)
                failed.append(req.request_id)
        self.scheduler.clear_in_flight()
        logger.error("runner failed; aborted requests %s", failed)
        return failed

    # ---------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        kv = self.scheduler.kv
        num_held = sum(len(r.held_seqs) for r in self.requests.values())
        return EngineStats(
            kv_blocks_total=kv.num_usable_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_cached=kv.num_cached_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting) + num_held,
            num_compilations=int(getattr(self.runner, "num_compilations", 0) or 0),
            num_steps=self._num_steps,
            last_step_num_tokens=self._last_step_num_tokens,
            spec_decoding=(self.scheduler.spec_stats.copy()
                           if self.config.speculative is not None else None),
        )

    def get_tokenizer(self) -> Any | None:
        return self.tokenizer


def _advance_grammar(seq: Sequence) -> SequenceStatus | None:
    """Feed the newest token to the sequence's grammar; a completed grammar finishes it."""
    matcher = seq.grammar
    if matcher is None:
        return None
    if not matcher.accept(seq.output_token_ids[-1]):
        logger.warning("sequence %s: its grammar refused token %d (%s); finishing it", seq.seq_id,
                       seq.output_token_ids[-1], matcher.error)
        return _finish_text(seq)
    return _finish_text(seq) if matcher.is_stopped else None


def _finish_text(seq: Sequence) -> SequenceStatus:
    """The sequence ends here: show the text held back for stop strings or partial chars."""
    detok = seq.detokenizer
    if detok is not None:
        stop_str = detok.flush()
        if stop_str is not None:
            seq.stop_reason = stop_str
        seq.text = detok.visible_text(finished=True)
    return SequenceStatus.FINISHED_STOPPED


def _needs_host_tokens(scheduler_output: SchedulerOutput) -> bool:
    """Whether a sequence sampling in this step needs the token on the host before it is
    scheduled again: a grammar's next mask follows it. (Penalties need it too, but the
    runner puts it into their histories on device, as into the next step's tokens.)"""
    return any(c.sample and c.grammar is not None for c in scheduler_output.chunks)


def _check_runner_output(scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
    missing = [c.request_id for c in scheduler_output.chunks
               if c.sample and c.request_id not in runner_output.sampled]
    if missing:
        raise RuntimeError(f"runner output has no sampled token for {missing}")
