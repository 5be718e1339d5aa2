"""Speculative decoding metrics under vLLM's names, and the "SpecDecoding metrics" log line."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from jaxserve.engine.stats import EngineStats, SpecDecodingStats
from jaxserve.serving.metrics import EngineMetrics, StatLogger


def _values(registry) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if s.name.startswith("jaxserve:spec_decode") and s.name.endswith("_total"):
                out[(s.name, s.labels.get("position", s.labels.get("reason")))] = s.value
    return out


def test_spec_counters_and_log_line():
    metrics = EngineMetrics("m")
    log = StatLogger(metrics)
    metrics.on_stats(EngineStats(kv_blocks_total=8, kv_blocks_free=8))
    assert _values(metrics.registry) == {} and log.spec_line(1.0) is None  # speculation off
    spec = SpecDecodingStats.empty(3)
    for drafted, accepted in ((3, 3), (3, 1), (2, 0), (3, 2)):
        spec.record(drafted, accepted)
    metrics.on_stats(EngineStats(num_steps=4, spec_decoding=spec.copy()))
    v = _values(metrics.registry)
    assert v[("jaxserve:spec_decode_num_drafts_total", None)] == 4
    assert v[("jaxserve:spec_decode_num_draft_tokens_total", None)] == 11
    assert v[("jaxserve:spec_decode_num_accepted_tokens_total", None)] == 6
    assert [v[("jaxserve:spec_decode_num_accepted_tokens_per_pos_total", str(p))]
            for p in range(3)] == [3, 2, 1]
    line = log.spec_line(2.0)
    assert line.startswith("SpecDecoding metrics: Mean acceptance length: 2.50, ")
    assert "Accepted: 6 tokens, Drafted: 11 tokens" in line
    assert "Per-position acceptance rate: 0.750, 0.500, 0.250" in line
    assert line.endswith("Avg Draft acceptance rate: 54.5%")
    spec.record(2, 2)
    metrics.on_stats(EngineStats(num_steps=5, spec_decoding=spec.copy()))
    assert _values(metrics.registry)[("jaxserve:spec_decode_num_accepted_tokens_total", None)] == 8
    assert "Accepted: 2 tokens, Drafted: 2 tokens" in log.spec_line(1.0)  # per interval
    assert log.spec_line(1.0) is None  # nothing new


def test_log_line_shows_gated_decodes():
    metrics = EngineMetrics("m")
    log = StatLogger(metrics)
    spec = SpecDecodingStats.empty(2)
    spec.record(2, 1)
    spec.num_gated_by_acceptance, spec.num_gated_by_batch_size = 5, 2
    metrics.on_stats(EngineStats(num_steps=1, spec_decoding=spec.copy()))
    v = _values(metrics.registry)
    assert v[("jaxserve:spec_decode_num_gated_decodes_total", "acceptance")] == 5
    assert v[("jaxserve:spec_decode_num_gated_decodes_total", "batch_size")] == 2
    line = log.spec_line(1.0)
    assert line.endswith("Avg Draft acceptance rate: 50.0%, Gated decodes: 5 by acceptance, "
                         "2 by batch size")
    spec.num_gated_by_batch_size += 8  # a step of 8 gated decodes, nothing drafted
    metrics.on_stats(EngineStats(num_steps=2, spec_decoding=spec.copy()))
    assert log.spec_line(1.0) == ("SpecDecoding metrics: Drafted: 0 tokens, Gated decodes: "
                                  "0 by acceptance, 8 by batch size")
    assert log.spec_line(1.0) is None  # nothing new
    v = _values(metrics.registry)
    assert v[("jaxserve:spec_decode_num_gated_decodes_total", "batch_size")] == 10
    assert v[("jaxserve:spec_decode_num_gated_decodes_total", "acceptance")] == 5
