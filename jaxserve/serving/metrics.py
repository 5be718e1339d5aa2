"""Prometheus metrics under vLLM's names (prefix `jaxserve:`) and the periodic stats log line."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxserve.engine.async_engine import RequestRecord

logger = logging.getLogger("jaxserve.serving")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0)
# Token counts: 1-2-5 steps (as vLLM's) up to 1M; tokens per step: powers of two.
_TOKEN_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5)) + (1e6,)
_STEP_TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(15))
_N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)


class EngineMetrics:
    """The async engine's observer: turns engine stats and request progress into metrics.

    Called on the engine thread; prometheus_client is thread-safe, and the plain totals kept for
    the log line are guarded by a lock.
    """

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self._label = {"model_name": model_name}
        reg = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"jaxserve:{name}", doc, labels, registry=reg).labels(**self._label)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"jaxserve:{name}", doc, labels, registry=reg).labels(**self._label)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(f"jaxserve:{name}", doc, labels, buckets=buckets,
                             registry=reg).labels(**self._label)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (1 = full).")
        self.num_preemptions = counter("num_preemptions", "Preemptions (recompute) so far.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.request_success = Counter("jaxserve:request_success", "Finished requests.",
                                       labels + ["finished_reason"], registry=reg)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.",
                             _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival until the first step that scheduled the request.",
                                    _E2E_BUCKETS)
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "First scheduled step until the first token.",
            _E2E_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "First token until the request finished.", _E2E_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "First scheduled step until the request finished.",
                                        _E2E_BUCKETS)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens of each finished request.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated for each finished request (all n).",
            _TOKEN_BUCKETS)
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens",
            "Tokens of the longest of the n outputs of each finished request.", _TOKEN_BUCKETS)
        self.request_params_n = histogram("request_params_n", "The n of each finished request.",
                                          _N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "The max_tokens of each finished request (when set).",
            _TOKEN_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total",
                                          "Tokens scheduled in each engine step.",
                                          _STEP_TOKEN_BUCKETS)
        self._last_num_steps = 0
        self._counter = counter
        self._spec: tuple | None = None  # speculative decoding counters, made on first use
        self._last_spec: Any = None
        self._lock = threading.Lock()
        self._last_engine_counts = (0, 0, 0)  # preemptions, prefix queries, prefix hits
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.last_stats: Any = None

    # ------------------------------------------------------------------ EngineObserver
    def on_stats(self, stats: Any) -> None:
        self.num_requests_running.set(stats.num_requests_running)
        self.num_requests_waiting.set(stats.num_requests_waiting)
        self.kv_cache_usage_perc.set(kv_cache_usage(stats))
        counts = (stats.num_preemptions, stats.prefix_cache_queries, stats.prefix_cache_hits)
        with self._lock:
            last, self._last_engine_counts = self._last_engine_counts, counts
            self.last_stats = stats
            new_step = stats.num_steps > self._last_num_steps
            self._last_num_steps = max(self._last_num_steps, stats.num_steps)
        if new_step:  # the loop publishes stats after every step
            self.iteration_tokens.observe(stats.last_step_num_tokens)
        for metric, new, old in zip(
                (self.num_preemptions, self.prefix_cache_queries, self.prefix_cache_hits),
                counts, last):
            if new > old:
                metric.inc(new - old)
        if getattr(stats, "spec_decoding", None) is not None:
            self._on_spec_stats(stats.spec_decoding)

    def _on_spec_stats(self, spec: Any) -> None:
        """vLLM's spec_decode_* counters (accepted per position labelled by `position`)."""
        if self._spec is None:
            per_pos = Counter("jaxserve:spec_decode_num_accepted_tokens_per_pos",
                              "Accepted draft tokens at each draft position.",
                              ["model_name", "position"], registry=self.registry)
            gated = Counter("jaxserve:spec_decode_num_gated_decodes",
                            "Decodes that did not draft because of the adaptive gate, by rule "
                            "(acceptance: the request's acceptance average; batch_size: "
                            "disable_by_batch_size).",
                            ["model_name", "reason"], registry=self.registry)
            self._spec = (
                self._counter("spec_decode_num_drafts", "Verified decodes with drafts."),
                self._counter("spec_decode_num_draft_tokens", "Draft tokens proposed."),
                self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
                per_pos,
                gated,
            )
            self._last_spec = type(spec).empty(len(spec.num_accepted_tokens_per_pos))
        drafts, draft_tokens, accepted, per_pos, gated = self._spec
        last, self._last_spec = self._last_spec, spec.copy()
        for reason, new, old in (
                ("acceptance", spec.num_gated_by_acceptance, last.num_gated_by_acceptance),
                ("batch_size", spec.num_gated_by_batch_size, last.num_gated_by_batch_size)):
            if new > old:
                gated.labels(reason=reason, **self._label).inc(new - old)
        for metric, new, old in ((drafts, spec.num_drafts, last.num_drafts),
                                 (draft_tokens, spec.num_draft_tokens, last.num_draft_tokens),
                                 (accepted, spec.num_accepted_tokens, last.num_accepted_tokens)):
            if new > old:
                metric.inc(new - old)
        for pos, (new, old) in enumerate(zip(spec.num_accepted_tokens_per_pos,
                                             last.num_accepted_tokens_per_pos)):
            if new > old:
                per_pos.labels(position=str(pos), **self._label).inc(new - old)

    def on_tokens(self, record: RequestRecord, num_new_tokens: int, now: float) -> None:
        self.generation_tokens.inc(num_new_tokens)
        first = record.first_token_time is None
        with self._lock:
            self.total_generation_tokens += num_new_tokens
            if first:
                self.total_prompt_tokens += record.num_prompt_tokens
        if first:
            self.prompt_tokens.inc(record.num_prompt_tokens)
            self.ttft.observe(now - record.arrival_time)
            if record.first_scheduled_time is not None:
                self.queue_time.observe(
                    max(record.first_scheduled_time - record.arrival_time, 0.0))
        elif record.last_token_time is not None:
            gap = (now - record.last_token_time) / num_new_tokens
            for _ in range(num_new_tokens):
                self.itl.observe(gap)

    def on_finished(self, record: RequestRecord) -> None:
        end = record.finished_time or time.monotonic()
        self.e2e.observe(end - record.arrival_time)
        self.request_success.labels(finished_reason=record.finish_reason or "unknown",
                                    **self._label).inc()
        self.request_prompt_tokens.observe(record.num_prompt_tokens)
        self.request_generation_tokens.observe(record.num_generation_tokens)
        self.request_max_num_generation_tokens.observe(record.max_seq_generation_tokens)
        params = record.params
        if params is not None:
            self.request_params_n.observe(params.n)
            if params.max_tokens is not None:
                self.request_params_max_tokens.observe(params.max_tokens)
        scheduled, first = record.first_scheduled_time, record.first_token_time
        if scheduled is not None:
            self.inference_time.observe(max(end - scheduled, 0.0))
            if first is not None:
                self.prefill_time.observe(max(first - scheduled, 0.0))
        if first is not None:
            self.decode_time.observe(max(end - first, 0.0))

    # ------------------------------------------------------------------ log line
    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.total_prompt_tokens, self.total_generation_tokens


def kv_cache_usage(stats: Any) -> float:
    """Fraction of usable KV blocks held by requests; 0 when none holds a block."""
    if not stats.kv_blocks_total:
        return 0.0
    return max(stats.kv_blocks_total - stats.kv_blocks_free, 0) / stats.kv_blocks_total


class StatLogger:
    """Logs one line per interval like vLLM's: throughput, running/waiting, KV usage, hit rate."""

    def __init__(self, metrics: EngineMetrics):
        self.metrics = metrics
        self._last_time = time.monotonic()
        self._last_totals = metrics.totals()
        self._last_prefix = (0, 0)
        self._last_spec: Any = None

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        totals = self.metrics.totals()
        dt = max(now - self._last_time, 1e-9)
        prompt_tps = (totals[0] - self._last_totals[0]) / dt
        gen_tps = (totals[1] - self._last_totals[1]) / dt
        self._last_time, self._last_totals = now, totals
        stats = self.metrics.last_stats
        if stats is None:
            return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, "
                    f"Avg generation throughput: {gen_tps:.1f} tokens/s")
        queries = stats.prefix_cache_queries - self._last_prefix[0]
        hits = stats.prefix_cache_hits - self._last_prefix[1]
        self._last_prefix = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        hit_rate = 100.0 * hits / queries if queries > 0 else 0.0
        return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, "
                f"Avg generation throughput: {gen_tps:.1f} tokens/s, "
                f"Running: {stats.num_requests_running} reqs, "
                f"Waiting: {stats.num_requests_waiting} reqs, "
                f"KV cache usage: {100.0 * kv_cache_usage(stats):.1f}%, "
                f"Prefix cache hit rate: {hit_rate:.1f}%")

    def log(self) -> None:
        """Log the line, unless nothing happened since the last one and nothing is queued."""
        stats = self.metrics.last_stats
        busy = stats is not None and (stats.num_requests_running or stats.num_requests_waiting)
        if busy or self.metrics.totals() != self._last_totals:
            now = time.monotonic()
            dt = now - self._last_time
            logger.info("%s", self.line(now))
            spec = self.spec_line(dt)
            if spec:
                logger.info("%s", spec)

    def spec_line(self, dt: float) -> str | None:
        """vLLM's "SpecDecoding metrics" line over the interval, then the decodes the gate kept
        from drafting (when any); None when speculation is off or nothing was drafted or gated
        since the last line."""
        stats = self.metrics.last_stats
        spec = getattr(stats, "spec_decoding", None) if stats is not None else None
        if spec is None:
            return None
        last = self._last_spec or type(spec).empty(len(spec.num_accepted_tokens_per_pos))
        self._last_spec = spec.copy()
        drafts = spec.num_drafts - last.num_drafts
        drafted = spec.num_draft_tokens - last.num_draft_tokens
        accepted = spec.num_accepted_tokens - last.num_accepted_tokens
        gated = (spec.num_gated_by_acceptance - last.num_gated_by_acceptance,
                 spec.num_gated_by_batch_size - last.num_gated_by_batch_size)
        gated_text = (f", Gated decodes: {gated[0]} by acceptance, {gated[1]} by batch size"
                      if any(gated) else "")
        if drafts <= 0:
            return f"SpecDecoding metrics: Drafted: 0 tokens{gated_text}" if gated_text else None
        per_pos = [(a - b) / drafts for a, b in zip(spec.num_accepted_tokens_per_pos,
                                                   last.num_accepted_tokens_per_pos)]
        dt = max(dt, 1e-9)
        return (f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / drafts:.2f}, "
                f"Accepted throughput: {accepted / dt:.2f} tokens/s, "
                f"Drafted throughput: {drafted / dt:.2f} tokens/s, "
                f"Accepted: {accepted} tokens, Drafted: {drafted} tokens, "
                f"Per-position acceptance rate: {', '.join(f'{r:.3f}' for r in per_pos)}, "
                f"Avg Draft acceptance rate: {100.0 * accepted / max(drafted, 1):.1f}%"
                f"{gated_text}")
