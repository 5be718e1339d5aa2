"""AsyncEngine: one background thread steps an LLMEngine while requests arrive; each request streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import EngineStepError
from .input_processor import parse_prompt

logger = logging.getLogger(__name__)


class AsyncEngineError(RuntimeError):
    """Base of the errors the async engine raises to a request's caller."""


class EngineDeadError(AsyncEngineError):
    """The engine loop failed; this request cannot complete and no new one is accepted."""


class EngineNotAcceptingError(AsyncEngineError):
    """The engine is draining or shut down and takes no new requests."""


class RequestFailedError(AsyncEngineError):
    """The engine failed this request (a runner error in its step); the engine carries on."""


class QueueFullError(AsyncEngineError):
    """The waiting queue is at `max_queued_requests`; the request was refused."""


class RequestDeadlineError(TimeoutError):
    """The request's deadline passed before it finished; it was aborted."""


@dataclass(frozen=True)
class AsyncEngineConfig:
    """Knobs of the async engine."""

    # Bound on requests left waiting once every free running slot (max_num_seqs) is taken;
    # None: unbounded.
    max_queued_requests: int | None = None
    idle_wait_s: float = 0.25  # how long the idle loop sleeps between checks
    log_requests: bool = False  # log each admitted request (id, prompt length, parameters)


@dataclass
class RequestRecord:
    """Timing and token counts of one request, kept by the loop for metrics."""

    request_id: str
    arrival_time: float  # time.monotonic()
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generation_tokens: int = 0
    first_scheduled_time: float | None = None  # start of the first step that worked on it
    first_output_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    finish_reason: str | None = None
    params: Any = None  # the request's SamplingParams (n, max_tokens)
    max_seq_generation_tokens: int = 0  # the longest of its n outputs


class EngineObserver(Protocol):
    """What the loop reports to (e.g. Prometheus metrics); called on the engine thread."""

    def on_stats(self, stats: Any) -> None: ...

    def on_tokens(self, record: RequestRecord, num_new_tokens: int, now: float) -> None: ...

    def on_finished(self, record: RequestRecord) -> None: ...


@dataclass
class _PendingAdd:
    request_id: str
    prompt: Any
    params: Any
    stream: _Stream


class _Admitted:
    """First item of a stream whose request the engine took (a refusal is an exception instead)."""


_ADMITTED = _Admitted()


class _Stream:
    """Per-request queue; written by the engine thread, read in the caller's event loop.

    The engine thread never touches an object the caller can cancel: it only puts items here
    (first the admission verdict, then outputs), and the caller only sets `left`. So a caller
    that goes away at any moment (disconnect, deadline, cancellation) cannot break the loop.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.left = False  # set by the caller when it stops listening; read by the engine thread

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass

    async def _get(self, deadline: float | None) -> Any:
        if deadline is None:
            return await self.queue.get()
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise RequestDeadlineError(f"request {self.request_id} passed its deadline") from None

    async def admitted(self, deadline: float | None) -> None:
        """Wait for the engine's verdict on the add; raises the refusal."""
        item = await self._get(deadline)
        if isinstance(item, BaseException):
            raise item

    async def next(self, deadline: float | None) -> Any:
        """The newest output (outputs are cumulative, so older queued ones are skipped)."""
        item = await self._get(deadline)
        while not isinstance(item, BaseException) and not self.queue.empty():
            item = self.queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    """Drives `LLMEngine.step` on a background thread; `generate` streams each request's outputs.

    All calls into the LLMEngine happen on that thread: adds and aborts are queued to it and
    applied between steps, so an abort frees the request's KV blocks before the next step.
    """

    def __init__(self, engine: Any, config: AsyncEngineConfig | None = None,
                 observer: EngineObserver | None = None,
                 on_dead: Callable[[BaseException], None] | None = None):
        """`on_dead(exc)` is called on the engine thread if the loop fails for good."""
        self.engine = engine
        self.config = config or AsyncEngineConfig()
        self.observer = observer
        self._on_dead = on_dead
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="jaxserve-tokenizer")
        self._cv = threading.Condition()
        self._adds: list[_PendingAdd] = []
        # (request id, the caller's stream or None for "whichever holds the id", tell the caller)
        self._aborts: list[tuple[str, _Stream | None, bool]] = []
        self._abort_all = False
        self._stopping = False
        self._accepting = True
        self._dead: BaseException | None = None
        self._has_work = False
        self._num_in_flight = 0
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._records: dict[str, RequestRecord] = {}  # engine thread only
        self.last_stats: Any = None
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine-loop", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public, any event loop
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def engine_config(self) -> Any:
        return self.engine.config

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self._dead is None and not self._stopping

    @property
    def num_in_flight(self) -> int:
        """Requests submitted through `generate` whose stream has not ended yet."""
        return self._num_in_flight

    async def generate(self, prompt: Any, params: Any, request_id: str,
                       deadline: float | None = None) -> AsyncIterator[Any]:
        """Yield the request's RequestOutputs (cumulative); the last has `finished` set.

        Raises ValueError for a bad prompt or params, QueueFullError, EngineNotAcceptingError,
        EngineDeadError, RequestDeadlineError (`deadline` is a time.monotonic() value). Leaving
        the iteration early (cancellation, disconnect, deadline) aborts the engine request.
        """
        self._check_open()
        prompt = await self._tokenize_prompt(prompt)
        if getattr(params, "structured_outputs", None) is not None:
            # compiled (or found in the cache) off the event loop and the engine thread, with
            # a time bound; the engine thread's add_request then finds it in the cache
            await asyncio.to_thread(self.engine.compile_grammar, params)
        stream = self._submit(prompt, params, request_id)
        finished = False
        try:
            await stream.admitted(deadline)
            while True:
                output = await stream.next(deadline)
                finished = bool(output.finished)
                yield output
                if finished:
                    return
        finally:
            with self._cv:
                self._num_in_flight -= 1
                if not finished:
                    # Only this caller's own request is aborted (the id may be another's when
                    # this add was refused as a duplicate); an add not applied yet is dropped.
                    stream.left = True
                    self._aborts.append((request_id, stream, False))
                    self._cv.notify_all()

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run tokenizer work (encode, chat template, decode) on the tokenizer thread: never on
        the caller's event loop nor on the engine thread. One thread, so calls never overlap on
        the (not thread-safe) tokenizer."""
        return await asyncio.wrap_future(self._tokenizer_pool.submit(fn, *args))

    async def _tokenize_prompt(self, prompt: Any) -> Any:
        """A text prompt becomes {'prompt', 'prompt_token_ids'} (tokenized off both loops)."""
        text = prompt.get("prompt") if isinstance(prompt, dict) and \
            "prompt_token_ids" not in prompt else prompt
        if not isinstance(text, str):
            return prompt
        limit = getattr(self.engine.config, "max_model_len", None)
        _, ids = await self.run_tokenizer(parse_prompt, text, self.engine.tokenizer, limit)
        return {"prompt": text, "prompt_token_ids": ids}

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason "abort"."""
        with self._cv:
            self._aborts.append((request_id, None, True))
            self._cv.notify_all()

    def abort_all(self) -> None:
        """Abort every request in flight (end of a drain); each stream ends with "abort"."""
        with self._cv:
            self._abort_all = True
            self._cv.notify_all()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; those in flight carry on."""
        self._accepting = False

    async def wait_until_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight or `timeout` seconds pass; True when idle."""
        end = time.monotonic() + timeout
        while self._num_in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self._num_in_flight == 0

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; requests still in flight fail with EngineNotAcceptingError."""
        self._accepting = False
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ----------------------------------------------------------------- caller side helpers
    def _check_open(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop failed: {self._dead!r}")
        if not self.is_accepting:
            raise EngineNotAcceptingError("the server is shutting down and takes no new requests")

    def _submit(self, prompt: Any, params: Any, request_id: str) -> _Stream:
        self._check_open()
        stream = _Stream(request_id, asyncio.get_running_loop())
        with self._cv:
            self._adds.append(_PendingAdd(request_id, prompt, params, stream))
            self._num_in_flight += 1
            self._cv.notify_all()
        return stream

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._adds or self._aborts or self._abort_all
                           or self._has_work):
                    self._cv.wait(self.config.idle_wait_s)
                if self._stopping:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                abort_all, self._abort_all = self._abort_all, False
            try:
                self._apply_adds(adds)
                if abort_all:
                    aborts.extend((rid, None, True) for rid in list(self._streams))
                self._apply_aborts(aborts)
                step_start = time.monotonic()
                outputs = self._step()
                self._note_scheduled(step_start)
                self._has_work = bool(self.engine.has_unfinished_requests())
                self._publish_stats()  # before dispatch: a client never sees older stats
                self._dispatch(outputs, time.monotonic())
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the streams
                logger.exception("engine loop failed; failing all requests")
                self._fail_all(exc)
                return
        self._close_all(EngineNotAcceptingError("the engine was shut down"))
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def _step(self) -> list[Any]:
        """One engine step; a runner failure fails only the requests of that step."""
        if not self.engine.has_unfinished_requests():
            return []
        try:
            return self.engine.step()
        except EngineStepError as exc:
            logger.error("engine step failed; failing requests %s: %s",
                         exc.failed_request_ids, exc)
            for request_id in exc.failed_request_ids:
                stream = self._streams.pop(request_id, None)
                record = self._records.pop(request_id, None)
                if stream is not None:
                    stream.put(RequestFailedError(f"request {request_id} failed: {exc}"))
                if record is not None and self.observer is not None:
                    record.finished_time = time.monotonic()
                    record.finish_reason = "error"
                    self.observer.on_finished(record)
            return []

    def _note_scheduled(self, step_start: float) -> None:
        """Stamp requests that left the waiting queue in this step (for the queue-time metric)."""
        requests = getattr(self.engine, "requests", None)
        if not isinstance(requests, dict):
            return
        for request_id, record in self._records.items():
            if record.first_scheduled_time is not None:
                continue
            state = requests.get(request_id)
            seqs = getattr(state, "seqs", None) or ()
            if any(getattr(seq, "num_computed_tokens", 0) > 0 for seq in seqs):
                record.first_scheduled_time = step_start

    def _queue_room(self) -> int | None:
        """How many more requests may be added before `max_queued_requests` would be left
        waiting after the next schedule (free running slots fill first); None: unbounded."""
        limit = self.config.max_queued_requests
        if limit is None:
            return None
        stats = self.engine.get_stats()
        max_seqs = getattr(self.engine.config, "max_num_seqs", 0)
        free_slots = max(0, max_seqs - stats.num_requests_running)
        return max(0, limit + free_slots - stats.num_requests_waiting)

    def _apply_adds(self, adds: list[_PendingAdd]) -> None:
        room = self._queue_room() if adds else None
        for add in adds:
            if add.stream.left:  # the caller went away before the engine saw the request
                continue
            if add.request_id in self._streams:
                add.stream.put(ValueError(f"request_id: {add.request_id!r} is already in flight"))
                continue
            if room is not None and room <= 0:
                add.stream.put(QueueFullError(
                    f"the waiting queue is full ({self.config.max_queued_requests} requests); "
                    "retry later"))
                continue
            try:
                self.engine.add_request(add.request_id, add.prompt, add.params)
            except Exception as exc:  # noqa: BLE001 - bad input goes back to its caller
                add.stream.put(exc)
                continue
            if room is not None:
                room -= 1
            self._streams[add.request_id] = add.stream
            self._records[add.request_id] = RequestRecord(add.request_id, time.monotonic(),
                                                          params=add.params)
            add.stream.put(_ADMITTED)
            if self.config.log_requests:
                state = self.engine.requests[add.request_id]
                logger.info("request %s admitted: %d prompt tokens, %r", add.request_id,
                            len(state.prompt_token_ids), add.params)

    def _apply_aborts(self, aborts: list[tuple[str, _Stream | None, bool]]) -> None:
        """Abort in the engine (its blocks are freed now). A caller that asked for the abort
        still hears the final "abort" output from the next step; one that left does not."""
        for request_id, stream, notify_caller in aborts:
            held = self._streams.get(request_id)
            if held is None or (stream is not None and held is not stream):
                continue
            self.engine.abort_request(request_id)
            if notify_caller:
                continue
            del self._streams[request_id]
            record = self._records.pop(request_id)
            record.finished_time = time.monotonic()
            record.finish_reason = "abort"
            if self.observer is not None:
                self.observer.on_finished(record)

    def _dispatch(self, outputs: list[Any], now: float) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            record = self._records[output.request_id]
            self._record_progress(record, output, now)
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]
                del self._records[output.request_id]
                record.finished_time = now
                reasons = [o.finish_reason for o in output.outputs if o.finish_reason]
                record.finish_reason = reasons[0] if reasons else None
                if self.observer is not None:
                    self.observer.on_finished(record)

    def _record_progress(self, record: RequestRecord, output: Any, now: float) -> None:
        if record.first_output_time is None:
            record.first_output_time = now
            if record.first_scheduled_time is None:
                record.first_scheduled_time = now
            record.num_prompt_tokens = len(output.prompt_token_ids or [])
            record.num_cached_tokens = int(output.num_cached_tokens or 0)
        total = sum(len(o.token_ids) for o in output.outputs)
        new = total - record.num_generation_tokens
        if new <= 0:
            return
        if self.observer is not None:
            self.observer.on_tokens(record, new, now)
        if record.first_token_time is None:
            record.first_token_time = now
        record.last_token_time = now
        record.num_generation_tokens = total
        record.max_seq_generation_tokens = max(len(o.token_ids) for o in output.outputs)

    def _publish_stats(self) -> None:
        self.last_stats = self.engine.get_stats()
        if self.observer is not None:
            self.observer.on_stats(self.last_stats)

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = exc
        self._accepting = False
        self._close_all(EngineDeadError(f"engine loop failed: {exc!r}"))
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if self._on_dead is not None:
            try:
                self._on_dead(exc)
            except Exception:  # noqa: BLE001 - the loop is already dead; just say so
                logger.exception("the engine-death callback failed")

    def _close_all(self, error: AsyncEngineError) -> None:
        with self._cv:
            adds, self._adds = self._adds, []
        for add in adds:
            add.stream.put(error)
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._records.clear()

