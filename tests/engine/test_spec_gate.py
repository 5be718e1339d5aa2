"""The speculation gate (no jax): acceptance EWMA, pause / backoff / reset, forgetting finished
requests, the batch-size rule, its config keys, and the scheduler skipping and resuming drafts."""

from __future__ import annotations

import logging

import pytest

from jaxserve.engine import EngineConfig, LLMEngine, SamplingParams
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.sequence import SequenceStatus
from jaxserve.engine.spec_config import SpeculativeConfig, parse_speculative_config
from jaxserve.engine.spec_gate import SpecGate
from jaxserve.runtime.runner_output import ModelRunnerOutput

from tests.engine.conftest import assert_all_free, make_seq, run_to_completion
from tests.engine.test_spec_decode import PROMPTS, FakeSpecRunner, _outputs


# ---------------------------------------------------------------- the gate alone
def _pause_pattern(gate: SpecGate, seq_id: str, steps: int) -> str:
    """'.' for a decode step the gate allows, 'x' for one it pauses."""
    return "".join("." if gate.acceptance_allows(seq_id) else "x" for _ in range(steps))


def test_ewma_math():
    gate = SpecGate(0.1, None)
    assert gate.ewma("a") == 1.0  # before any verified draft
    gate.record("a", 4, 1)  # 1.0 + 0.25 * (0.25 - 1.0)
    assert gate.ewma("a") == pytest.approx(0.8125)
    gate.record("a", 2, 2)
    assert gate.ewma("a") == pytest.approx(0.8125 + 0.25 * (1.0 - 0.8125))
    gate.record("a", 0, 0)  # no drafts: no update
    assert gate.ewma("a") == pytest.approx(0.859375)
    for _ in range(3):
        gate.record("b", 3, 0)
    assert gate.ewma("b") == pytest.approx(0.75 ** 3)


def test_pause_doubles_to_16_and_an_accepted_probe_resets_it():
    gate = SpecGate(0.1, None)
    for _ in range(8):  # 0.75 ** 8 = 0.1001: still drafting
        gate.record("a", 4, 0)
        assert gate.acceptance_allows("a")
    gate.record("a", 4, 0)  # 0.75 ** 9 = 0.075 < 0.1
    assert _pause_pattern(gate, "a", 5) == "xxxx."  # 4 steps, then a probe
    gate.record("a", 4, 0)  # rejected probe
    assert _pause_pattern(gate, "a", 9) == "x" * 8 + "."
    gate.record("a", 4, 0)
    assert _pause_pattern(gate, "a", 17) == "x" * 16 + "."
    gate.record("a", 4, 0)
    assert _pause_pattern(gate, "a", 17) == "x" * 16 + "."  # capped at 16
    low = gate.ewma("a")
    gate.record("a", 4, 1)  # accepted probe, EWMA still below 0.1: pause again, reset to 4
    assert gate.ewma("a") == pytest.approx(low + 0.25 * (0.25 - low))
    assert gate.ewma("a") < 0.1
    assert _pause_pattern(gate, "a", 5) == "xxxx."
    gate.record("a", 4, 0)  # rejected probe after the reset: 8
    assert _pause_pattern(gate, "a", 9) == "x" * 8 + "."
    gate.record("a", 4, 4)  # fully accepted probe: EWMA back above 0.1, drafting goes on
    assert gate.ewma("a") > 0.1
    assert _pause_pattern(gate, "a", 3) == "..."
    while gate.ewma("a") >= 0.1:  # rejected again: the next pause is 4 steps (reset)
        gate.record("a", 4, 0)
    assert _pause_pattern(gate, "a", 5) == "xxxx."


def test_threshold_zero_turns_the_rule_off_and_keeps_no_state():
    gate = SpecGate(0.0, None)
    for _ in range(50):
        gate.record("a", 4, 0)
        assert gate.acceptance_allows("a")
    assert gate.num_tracked == 0


def test_threshold_one_pauses_after_any_rejection():
    gate = SpecGate(1.0, None)
    gate.record("a", 2, 2)
    assert gate.acceptance_allows("a")
    gate.record("a", 2, 1)
    assert _pause_pattern(gate, "a", 5) == "xxxx."


def test_forget_and_sequences_are_independent():
    gate = SpecGate(0.5, None)
    for _ in range(5):
        gate.record("a", 4, 0)
    gate.record("b", 4, 4)
    assert not gate.acceptance_allows("a") and gate.acceptance_allows("b")
    assert gate.num_tracked == 2
    gate.forget("a")
    gate.forget("never-seen")
    assert gate.num_tracked == 1 and gate.ewma("a") == 1.0
    assert gate.acceptance_allows("a")  # a new request with the same id starts afresh


def test_batch_size_rule():
    assert SpecGate(0.1, None).batch_allows(10_000)
    gate = SpecGate(0.1, 3)
    assert gate.batch_allows(2) and not gate.batch_allows(3) and not gate.batch_allows(4)
    assert not SpecGate(0.1, 1).batch_allows(1)


def test_first_pause_is_logged_once(caplog):
    gate = SpecGate(0.1, None)
    with caplog.at_level(logging.INFO, logger="jaxserve.engine.spec_gate"):
        for _ in range(40):
            gate.record("req-7", 4, 0)
            gate.acceptance_allows("req-7")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "req-7" in lines[0] and "0.075" in lines[0]


# ---------------------------------------------------------------- config keys
def test_config_keys_parse():
    cfg = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2, '
                                   '"disable_by_acceptance": 0.3, "disable_by_batch_size": 4}')
    assert (cfg.disable_by_acceptance, cfg.disable_by_batch_size) == (0.3, 4)
    default = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2})
    assert (default.disable_by_acceptance, default.disable_by_batch_size) == (0.1, None)
    off = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                    "disable_by_acceptance": 0, "disable_by_batch_size": None})
    assert (off.disable_by_acceptance, off.disable_by_batch_size) == (0, None)
    draft = parse_speculative_config({"method": "draft_model", "model": "/d",
                                      "num_speculative_tokens": 2, "disable_by_batch_size": 1})
    assert draft.disable_by_batch_size == 1


@pytest.mark.parametrize("key, value", [
    ("disable_by_acceptance", -0.1), ("disable_by_acceptance", 1.5),
    ("disable_by_acceptance", "0.5"), ("disable_by_acceptance", True),
    ("disable_by_acceptance", float("nan")),
    ("disable_by_batch_size", 0), ("disable_by_batch_size", -2),
    ("disable_by_batch_size", 2.0), ("disable_by_batch_size", False),
])
def test_bad_gate_keys_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"^speculative_config.{key}: "):
        parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, key: value})
    with pytest.raises(ValueError, match=f"^speculative_config.{key}: "):
        SpeculativeConfig("ngram", 2, **{key: value})


def test_llm_args_and_cli_flag_take_the_keys():
    import argparse

    from jaxserve.engine_flags import add_engine_args, engine_args_from
    from jaxserve.llm import EngineArgs

    parser = add_engine_args(argparse.ArgumentParser())
    parser.add_argument("model")
    ns = parser.parse_args(["m", "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 3, '
                            '"disable_by_acceptance": 0.25, "disable_by_batch_size": 6}'])
    cfg = engine_args_from(ns).speculative_config
    assert (cfg.disable_by_acceptance, cfg.disable_by_batch_size) == (0.25, 6)
    with pytest.raises(ValueError, match="speculative_config.disable_by_batch_size"):
        EngineArgs(model="m", speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                  "disable_by_batch_size": 0})


# ---------------------------------------------------------------- scheduler
def _scheduler(**spec_kw) -> Scheduler:
    spec = SpeculativeConfig("ngram", 3, 1, 1, **spec_kw)
    return Scheduler(EngineConfig(block_size=4, num_kv_blocks=256, max_model_len=512,
                                  vocab_size=100, max_num_seqs=8, max_num_batched_tokens=64,
                                  speculative=spec))


def _verify(sched: Scheduler, accept: bool) -> list[int]:
    """One step; every chunk with drafts gets all of them accepted (+ a bonus token) or none
    (a token of the prompt unlike the first draft: the 1-gram lookup keeps matching). Returns
    the number of drafts of each sampling chunk, in order."""
    so = sched.schedule()
    out = ModelRunnerOutput()
    for c in so.chunks:
        if not c.sample:
            continue
        if c.spec_token_ids:
            tokens = list(c.spec_token_ids) + [1] if accept else [
                2 if c.spec_token_ids[0] == 1 else 1]
            out.spec_tokens[c.request_id] = tokens
            out.sampled[c.request_id] = tokens[0]
        else:
            out.sampled[c.request_id] = 1
    for seq in sched.update_from_output(so, out):
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish_sequence(seq, SequenceStatus.FINISHED_LENGTH)
    return [len(c.spec_token_ids) for c in so.chunks if c.sample]


def test_scheduler_pauses_low_acceptance_and_resumes(caplog):
    sched = _scheduler(disable_by_acceptance=0.1)
    seq = make_seq("a", [1, 2, 3] * 4, max_tokens=400)
    sched.add_sequence(seq)
    assert _verify(sched, accept=False) == [0]  # the prefill
    with caplog.at_level(logging.INFO, logger="jaxserve.engine.spec_gate"):
        drafted = "".join("d" if _verify(sched, accept=False)[0] else "-" for _ in range(40))
    # 9 rejected drafts take the EWMA from 1 to 0.075; pauses of 4, 8, 16 between probes
    assert drafted == "d" * 9 + "-" * 4 + "d" + "-" * 8 + "d" + "-" * 16 + "d"
    stats = sched.spec_stats
    assert stats.num_gated_by_acceptance == 4 + 8 + 16
    assert stats.num_drafts == 12 and stats.num_accepted_tokens == 0
    assert stats.num_gated_by_batch_size == 0
    assert [r.getMessage() for r in caplog.records if "paused" in r.getMessage()] == [
        "speculative decoding paused for request a: draft acceptance EWMA 0.075 < "
        "disable_by_acceptance 0.1"]
    for _ in range(16):  # the last probe was rejected: 16 steps (capped)
        assert _verify(sched, accept=True) == [0]
    assert stats.num_gated_by_acceptance == 4 + 8 + 16 + 16
    assert "".join("d" if _verify(sched, accept=True)[0] else "-" for _ in range(10)) == "d" * 10
    assert stats.num_accepted_tokens == 30
    sched.finish_sequence(seq, SequenceStatus.FINISHED_ABORTED)
    assert sched.gate.num_tracked == 0
    assert not sched.has_unfinished()


def test_scheduler_without_the_acceptance_rule_keeps_drafting():
    sched = _scheduler(disable_by_acceptance=0.0)
    sched.add_sequence(make_seq("a", [1, 2, 3] * 4, max_tokens=400))
    _verify(sched, accept=False)
    assert all(_verify(sched, accept=False) == [3] for _ in range(30))
    assert sched.spec_stats.num_gated_by_acceptance == 0


def test_scheduler_batch_size_rule_and_resume():
    sched = _scheduler(disable_by_batch_size=3)
    short = [make_seq(f"s{i}", [1, 2, 3] * 3, max_tokens=3, arrival=i) for i in range(2)]
    long = make_seq("long", [1, 2, 3] * 3, max_tokens=200, arrival=2)
    for seq in short + [long]:
        sched.add_sequence(seq)
    assert _verify(sched, accept=True) == [0, 0, 0]  # the prefills
    assert _verify(sched, accept=True) == [0, 0, 0]  # 3 running: no drafts
    assert sched.spec_stats.num_gated_by_batch_size == 3
    # the short ones' last token: no room for drafts (not counted as gated); long is gated
    assert _verify(sched, accept=True) == [0, 0, 0]
    assert sched.spec_stats.num_gated_by_batch_size == 4
    assert len(sched.running) == 1
    assert _verify(sched, accept=True) == [3]  # 1 running: drafting again
    assert sched.spec_stats.num_gated_by_batch_size == 4
    assert sched.spec_stats.num_gated_by_acceptance == 0


# ---------------------------------------------------------------- engine, fake model
@pytest.mark.parametrize("spec_kw", [
    dict(disable_by_acceptance=0.9),  # copy_model rejects often: many pauses
    dict(disable_by_batch_size=3),
])
def test_engine_output_unchanged_and_gate_state_forgotten(spec_kw):
    cfg = dict(block_size=4, num_kv_blocks=64, max_model_len=64, vocab_size=1000,
               max_num_seqs=8, max_num_batched_tokens=32)
    plain_cfg = EngineConfig(**cfg)
    spec_cfg = EngineConfig(**cfg, speculative=SpeculativeConfig("ngram", 4, 3, 1, **spec_kw))
    plain = LLMEngine(FakeSpecRunner(plain_cfg), None, plain_cfg)
    spec = LLMEngine(FakeSpecRunner(spec_cfg), None, spec_cfg)
    params = [SamplingParams(max_tokens=30, ignore_eos=True),
              SamplingParams(max_tokens=25, n=2, seed=3, ignore_eos=True)]
    assert _outputs(spec, PROMPTS, params) == _outputs(plain, PROMPTS, params)
    s = spec.get_stats().spec_decoding
    assert s.num_drafts > 0
    key = "num_gated_by_acceptance" if "disable_by_acceptance" in spec_kw else \
        "num_gated_by_batch_size"
    assert getattr(s, key) > 0
    assert spec.scheduler.gate.num_tracked == 0
    for engine in (plain, spec):
        assert_all_free(engine)


def test_aborted_requests_leave_no_gate_state():
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=64, vocab_size=1000,
                       max_num_seqs=8, max_num_batched_tokens=32,
                       speculative=SpeculativeConfig("ngram", 4, 3, 1,
                                                     disable_by_acceptance=0.9))
    engine = LLMEngine(FakeSpecRunner(cfg), None, cfg)
    for i in range(4):
        engine.add_request(f"r{i}", PROMPTS[i + 1], SamplingParams(max_tokens=40,
                                                                   ignore_eos=True))
    for _ in range(8):
        engine.step()
    assert engine.scheduler.gate.num_tracked > 0
    engine.abort_request(["r0", "r1", "r2", "r3"])
    run_to_completion(engine)
    assert engine.scheduler.gate.num_tracked == 0
    assert_all_free(engine)
