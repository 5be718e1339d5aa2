"""LLMEngine end to end with a deterministic fake runner (no jax)."""

import pytest

from jaxserve.engine import EngineStepError, InvalidRequestError, SamplingParams

from tests.engine.conftest import reference_tokens, run_to_completion

PROMPTS = [list(range(1, 4 + 3 * i)) + [i + 500] * (i % 3) for i in range(6)]


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Every test here runs with both schedulers: async scheduling must not change outputs."""
    return request.param


def _generate(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    return run_to_completion(engine)


def test_outputs_match_reference(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=7)
    final = _generate(engine, PROMPTS, params)
    assert sorted(final) == [f"r{i}" for i in range(len(PROMPTS))]
    for i, p in enumerate(PROMPTS):
        out = final[f"r{i}"]
        assert out.finished and out.prompt_token_ids == p and out.prompt is None
        (comp,) = out.outputs
        assert comp.token_ids == reference_tokens(p, 7, 1000)
        assert comp.finish_reason == "length" and comp.stop_reason is None
        assert comp.text == "" and comp.cumulative_logprob is None and comp.logprobs is None
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("overrides", [
    dict(num_kv_blocks=9, max_model_len=32),  # 8 usable blocks of 4: forces preemption
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=5),  # prompts split into chunks
    dict(max_num_seqs=1),
])
def test_same_tokens_under_pressure(make_engine, overrides):
    params = SamplingParams(max_tokens=12)
    prompts = PROMPTS + [PROMPTS[3][:9] + [7, 7], PROMPTS[3]]  # shared prefixes too
    expected = {f"r{i}": reference_tokens(p, 12, 1000) for i, p in enumerate(prompts)}
    engine = make_engine(**overrides)
    final = _generate(engine, prompts, params)
    assert {k: v.outputs[0].token_ids for k, v in final.items()} == expected
    if overrides.get("num_kv_blocks") == 9:
        assert engine.get_stats().num_preemptions > 0


def test_prefix_caching_reports_cached_tokens(make_engine):
    engine = make_engine()
    shared = list(range(100, 120))  # 5 full blocks of 4
    engine.add_request("a", shared + [1, 2], SamplingParams(max_tokens=2))
    run_to_completion(engine)
    engine.add_request("b", shared + [3], SamplingParams(max_tokens=2))
    final = run_to_completion(engine)
    assert final["b"].num_cached_tokens == 20
    assert final["b"].outputs[0].token_ids == reference_tokens(shared + [3], 2, 1000)
    stats = engine.get_stats()
    assert stats.prefix_cache_hits == 20 and stats.prefix_cache_queries == 22 + 21
    assert stats.kv_blocks_cached >= 5 and stats.kv_blocks_free == stats.kv_blocks_total


def test_streaming_outputs_are_cumulative(make_engine, tokenizer):
    engine = make_engine(tokenizer=tokenizer, vocab_size=len(tokenizer),
                         avoid=tokenizer.all_special_ids)
    engine.add_request("s", "hello world", SamplingParams(max_tokens=10))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out)
    assert [len(o.outputs[0].token_ids) for o in seen] == list(range(1, 11))
    assert [o.finished for o in seen] == [False] * 9 + [True]
    for prev, cur in zip(seen, seen[1:]):
        assert cur.outputs[0].text.startswith(prev.outputs[0].text)
    last = seen[-1]
    assert last.prompt == "hello world"
    assert last.prompt_token_ids == tokenizer.encode("hello world")
    assert last.outputs[0].text == tokenizer.decode(last.outputs[0].token_ids)


def test_n_children_seeds_and_shared_prompt_blocks(make_engine):
    engine = make_engine()
    prompt = list(range(200, 215))  # 3 full blocks + 3 tokens
    engine.add_request("n", prompt, SamplingParams(n=3, seed=42, max_tokens=6))
    engine.add_request("solo", [1, 2, 3], SamplingParams(seed=42, max_tokens=6))
    final = run_to_completion(engine)
    out = final["n"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, c in enumerate(out.outputs):
        assert c.token_ids == reference_tokens(prompt, 6, 1000, seed=42 + i)
        assert c.finish_reason == "length"
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert out.num_cached_tokens == 12  # siblings reused the first child's full prompt blocks
    assert final["solo"].outputs[0].token_ids == reference_tokens([1, 2, 3], 6, 1000, seed=42)


def test_n_without_prefix_caching(make_engine):
    engine = make_engine(enable_prefix_caching=False)
    engine.add_request("n", list(range(1, 12)), SamplingParams(n=2, max_tokens=3))
    out = run_to_completion(engine)["n"]
    assert len(out.outputs) == 2 and all(c.finish_reason == "length" for c in out.outputs)


def test_abort_frees_blocks_and_reports_abort(make_engine):
    engine = make_engine()
    engine.add_request("a", list(range(1, 30)), SamplingParams(max_tokens=20))
    engine.add_request("b", [5, 6, 7], SamplingParams(n=2, max_tokens=20))
    engine.add_request("c", [8, 9], SamplingParams(max_tokens=3))
    engine.step()
    engine.step()
    assert engine.get_stats().kv_blocks_free < engine.get_stats().kv_blocks_total
    engine.abort_request(["a", "b", "unknown"])
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].outputs[0].finish_reason == "abort"
    assert [c.finish_reason for c in outs["b"].outputs] == ["abort", "abort"]
    final = run_to_completion(engine)
    assert final["c"].outputs[0].token_ids == reference_tokens([8, 9], 3, 1000)
    engine.abort_request("c")  # already finished: ignored
    assert not engine.has_unfinished_requests()


def test_abort_waiting_request_before_any_step(make_engine):
    engine = make_engine()
    engine.add_request("w", [1, 2, 3], SamplingParams())
    engine.abort_request("w")
    assert engine.has_unfinished_requests()
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].token_ids == []
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, params, field", [
    ("", None, "prompt"),
    ([], None, "prompt"),
    ({"prompt_token_ids": []}, None, "prompt"),
    ([1, 2, 1000], None, "prompt_token_ids"),
    ([1, -1], None, "prompt_token_ids"),
    ([1, 2.5], None, "prompt_token_ids"),
    (list(range(1, 60)), SamplingParams(max_tokens=10), "max_tokens"),
    (list(range(1, 65)), SamplingParams(max_tokens=1), "prompt"),
    ([1, 2], SamplingParams(logit_bias={5000: 1.0}), "logit_bias"),
    ([1, 2], SamplingParams(stop="x"), "stop"),  # no tokenizer
    ("text", None, "prompt"),  # no tokenizer
    (12, None, "prompt"),
])
def test_bad_input_names_field_and_engine_keeps_serving(make_engine, prompt, params, field):
    engine = make_engine()
    engine.add_request("ok1", [1, 2, 3], SamplingParams(max_tokens=3))
    engine.step()
    with pytest.raises(ValueError, match=field) as info:
        engine.add_request("bad", prompt, params)
    assert isinstance(info.value, InvalidRequestError) and info.value.field == field
    assert "bad" not in engine.requests
    engine.add_request("ok2", [4, 5], SamplingParams(max_tokens=3))
    final = run_to_completion(engine)
    assert set(final) == {"ok1", "ok2"}


def test_prompt_logprobs_refused_when_not_enabled(make_engine):
    engine = make_engine(enable_prompt_logprobs=False)
    with pytest.raises(InvalidRequestError, match="enable-prompt-logprobs") as info:
        engine.add_request("pl", [1, 2, 3], SamplingParams(max_tokens=2, prompt_logprobs=1))
    assert info.value.field == "prompt_logprobs" and "pl" not in engine.requests
    engine.add_request("lp", [1, 2, 3], SamplingParams(max_tokens=2, logprobs=1))
    assert set(run_to_completion(engine)) == {"lp"}


def test_duplicate_request_id_rejected(make_engine):
    engine = make_engine()
    engine.add_request("x", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("x", [3, 4], SamplingParams(max_tokens=2))
    engine.add_request("y", [1], SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("y#1", [1], SamplingParams(max_tokens=2))
    assert set(run_to_completion(engine)) == {"x", "y"}
    engine.add_request("x", [3, 4], SamplingParams(max_tokens=2))  # id free again
    run_to_completion(engine)


def test_max_tokens_none_fills_model_len(make_engine):
    engine = make_engine(max_model_len=20)
    engine.add_request("r", list(range(1, 15)), SamplingParams(max_tokens=None))
    out = run_to_completion(engine)["r"].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_eos_stop_token_ids_min_tokens_ignore_eos(make_engine):
    script = [11, 12, 2, 13, 9, 14, 15, 16]
    engine = make_engine(script=script, eos_token_ids=(2,))
    engine.add_request("eos", [1], SamplingParams(max_tokens=8))
    engine.add_request("stopid", [1], SamplingParams(max_tokens=8, stop_token_ids=[9],
                                                     ignore_eos=True))
    engine.add_request("ign", [1], SamplingParams(max_tokens=8, ignore_eos=True))
    final = run_to_completion(engine)
    eos = final["eos"].outputs[0]
    assert eos.token_ids == [11, 12, 2] and eos.finish_reason == "stop"
    assert eos.stop_reason is None
    stop = final["stopid"].outputs[0]
    assert stop.token_ids == [11, 12, 2, 13, 9] and stop.stop_reason == 9
    ign = final["ign"].outputs[0]
    assert ign.token_ids == script and ign.finish_reason == "length"


def test_min_tokens_passes_banned_ids_to_runner(make_engine):
    engine = make_engine(eos_token_ids=(2, 3))
    engine.add_request("m", [1], SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[7]))
    run_to_completion(engine)
    bans = [c.banned_token_ids for so in engine.runner.steps for c in so.chunks]
    assert bans == [(2, 3, 7), (2, 3, 7), (), (), ()]


def test_stop_strings_through_engine(make_engine, tokenizer):
    text = "the quick brown fox jumps over the lazy dog. stop here please!"
    script = tokenizer.encode(text)
    for include in (False, True):
        engine = make_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), script=script)
        params = SamplingParams(max_tokens=60, stop=["lazy dog"],
                                include_stop_str_in_output=include)
        engine.add_request("s", "hi", params)
        texts = []
        while engine.has_unfinished_requests():
            texts += [o.outputs[0].text for o in engine.step()]
        expected = "the quick brown fox jumps over the " + ("lazy dog" if include else "")
        assert texts[-1] == expected
        assert all(expected.startswith(t) for t in texts)


def test_stop_token_text_excluded(make_engine, tokenizer):
    script = tokenizer.encode("hello world.")
    dot = script[-1]
    engine = make_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), script=script)
    engine.add_request("a", "x", SamplingParams(max_tokens=20, stop_token_ids=[dot]))
    engine.add_request("b", "x", SamplingParams(max_tokens=20, stop_token_ids=[dot],
                                                include_stop_str_in_output=True))
    final = run_to_completion(engine)
    assert final["a"].outputs[0].text == "hello world"
    assert final["b"].outputs[0].text == "hello world."
    assert final["a"].outputs[0].stop_reason == dot


def test_logprobs_and_prompt_logprobs(make_engine, tokenizer):
    engine = make_engine(tokenizer=tokenizer, vocab_size=len(tokenizer),
                         avoid=tokenizer.all_special_ids)
    prompt_ids = tokenizer.encode("the quick brown fox")
    engine.add_request("lp", {"prompt_token_ids": prompt_ids},
                       SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=1))
    out = run_to_completion(engine)["lp"]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    total = 0.0
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        first_id, first = next(iter(lp.items()))
        assert first_id == tok and 2 <= len(lp) <= 3
        assert first.decoded_token == tokenizer.decode([tok])
        total += first.logprob
    assert comp.cumulative_logprob == pytest.approx(total)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt_ids)
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert next(iter(entry)) == prompt_ids[pos] and len(entry) <= 2


def test_prompt_logprobs_collected_once_with_preemption_and_chunks(make_engine):
    prompts = [list(range(10 + i, 30 + i)) for i in range(4)]
    engine = make_engine(num_kv_blocks=14, max_model_len=52, max_num_batched_tokens=7)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, SamplingParams(max_tokens=30, prompt_logprobs=0,
                                                      logprobs=0))
    final = run_to_completion(engine)
    assert engine.get_stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        out = final[f"p{i}"]
        assert out.num_cached_tokens == 0
        assert [next(iter(d)) if d else None for d in out.prompt_logprobs] == [None] + p[1:]
        assert len(out.outputs[0].logprobs) == 30
        assert out.outputs[0].token_ids == reference_tokens(p, 30, 1000)


def test_runner_failure_fails_step_requests_and_engine_recovers(make_engine):
    engine = make_engine()
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    engine.step()
    engine.runner.fail_next = True
    with pytest.raises(EngineStepError) as info:
        engine.step()
    assert info.value.failed_request_ids == ["a"]
    assert not engine.has_unfinished_requests()
    engine.scheduler.kv.pool.check_consistency()
    engine.add_request("b", [4, 5], SamplingParams(max_tokens=3))
    assert run_to_completion(engine)["b"].outputs[0].token_ids == reference_tokens([4, 5], 3, 1000)


def test_stats(make_engine):
    engine = make_engine(max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=3))
    engine.add_request("n", list(range(1, 10)), SamplingParams(n=2, max_tokens=3))
    stats = engine.get_stats()
    assert stats.num_requests_waiting == 5 and stats.num_requests_running == 0
    assert stats.num_compilations == 3 and stats.kv_blocks_total == 63
    engine.step()
    stats = engine.get_stats()
    assert stats.num_requests_running == 2 and stats.num_requests_waiting == 3
    assert stats.kv_blocks_free == 61
    run_to_completion(engine)
    stats = engine.get_stats()
    assert stats.num_requests_running == stats.num_requests_waiting == 0
    assert stats.prefix_cache_queries > 0


def test_engine_layer_does_not_import_jax():
    import subprocess
    import sys

    code = ("import sys, jaxserve.engine, jaxserve.engine.llm_engine, jaxserve.engine.scheduler;"
            "bad = [m for m in ('jax', 'flax', 'jaxlib') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("eos_last", [False, True])
def test_stop_string_in_flushed_partial_character(make_engine, tokenizer, eos_last):
    """A stop string inside text held back for an incomplete UTF-8 character is found when the
    sequence ends (max_tokens or EOS): finish_reason "stop", the string cut (issue 9, item 12)."""
    tid = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "na\ufffd")
    eos = tokenizer.eos_token_id
    script = tokenizer.encode("hello ") + [tid] + ([eos] if eos_last else [])
    engine = make_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), script=script,
                         eos_token_ids=(eos,))
    engine.add_request("a", "x", SamplingParams(max_tokens=len(script), stop=["na"]))
    out = run_to_completion(engine)["a"].outputs[0]
    assert out.text == "hello "
    assert out.finish_reason == "stop" and out.stop_reason == "na"


def _steps_of(engine, request_id: str) -> int:
    return sum(any(c.request_id == request_id for c in so.chunks) for so in engine.runner.steps)


@pytest.mark.parametrize("async_scheduling", [True], ids=["async"])
def test_async_computes_one_dropped_token_after_a_stop_and_none_after_max_tokens(make_engine):
    """A stop is seen one step late: that step's token for the stopped sequence is dropped.
    max_tokens is known ahead: the sequence is not scheduled past it."""
    engine = make_engine(script=[11, 12, 2, 13, 14], eos_token_ids=(2,))
    engine.add_request("eos", [1], SamplingParams(max_tokens=8))
    engine.add_request("len", [1, 5], SamplingParams(max_tokens=4, ignore_eos=True))
    final = run_to_completion(engine)
    assert final["eos"].outputs[0].token_ids == [11, 12, 2]
    assert final["len"].outputs[0].token_ids == [11, 12, 2, 13]
    assert _steps_of(engine, "eos") == 4  # the prefill, 2 decodes and the dropped one
    assert _steps_of(engine, "len") == 4  # the prefill and 3 decodes
    assert engine.runner.num_placeholders_filled == 6  # every decode of both


@pytest.mark.parametrize("async_scheduling", [True], ids=["async"])
def test_async_penalties_take_the_token_in_flight(make_engine):
    """Penalties read every generated token: the one in flight reaches them as a placeholder
    (filled by the runner), so their steps are not waited for."""
    engine = make_engine()
    engine.add_request("p", [1, 2, 3], SamplingParams(max_tokens=6, repetition_penalty=1.2))
    final = run_to_completion(engine)
    assert final["p"].outputs[0].token_ids == reference_tokens([1, 2, 3], 6, 1000)
    assert engine.runner.num_placeholders_filled == 5
    assert engine._num_waits == 0


@pytest.mark.parametrize("async_scheduling", [True], ids=["async"])
def test_async_abort_with_a_step_in_flight(make_engine):
    engine = make_engine()
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10))
    engine.add_request("b", [4, 5], SamplingParams(max_tokens=10))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.num_steps_in_flight == 1
    engine.abort_request("a")  # its blocks go back while its next token is being computed
    engine.scheduler.kv.pool.check_consistency()
    final = run_to_completion(engine)
    assert final["a"].outputs[0].finish_reason == "abort"
    assert len(final["a"].outputs[0].token_ids) == 2  # what had landed when it was aborted
    assert final["b"].outputs[0].token_ids == reference_tokens([4, 5], 10, 1000)


def test_async_scheduling_is_refused_with_speculative_decoding():
    from jaxserve.engine import EngineConfig
    from jaxserve.engine.spec_config import parse_speculative_config

    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="async_scheduling: not supported with speculative"):
        EngineConfig(num_kv_blocks=8, max_model_len=16, vocab_size=10, speculative=spec,
                     async_scheduling=True)
