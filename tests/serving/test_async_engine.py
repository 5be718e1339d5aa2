"""AsyncEngine over a real LLMEngine with the fake runner: streaming, aborts, limits, failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from jaxserve.engine.async_engine import (
    AsyncEngine,
    AsyncEngineConfig,
    EngineDeadError,
    EngineNotAcceptingError,
    QueueFullError,
    RequestDeadlineError,
    RequestFailedError,
)
from jaxserve.engine.sampling_params import SamplingParams
from tests.serving.harness import make_fake_engine


def _sync_tokens(tokenizer, prompt, params) -> list[int]:
    engine = make_fake_engine(tokenizer)
    engine.add_request("r", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return list(final.outputs[0].token_ids)


async def _collect(engine: AsyncEngine, prompt, params, request_id: str, **kw):
    outputs = []
    async for out in engine.generate(prompt, params, request_id, **kw):
        outputs.append(out)
    return outputs


def _wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = engine.last_stats
        if (stats is not None and not engine.engine.has_unfinished_requests()
                and stats.kv_blocks_free == stats.kv_blocks_total):
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.last_stats}")


def test_streams_match_sync_engine(demo_tokenizer):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    expected = _sync_tokens(demo_tokenizer, "The quick brown fox", params)
    engine = AsyncEngine(make_fake_engine(demo_tokenizer))
    try:
        async def main():
            return await asyncio.gather(*[
                _collect(engine, "The quick brown fox", params, f"r{i}") for i in range(8)])

        results = asyncio.run(main())
        for outputs in results:
            assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
            assert list(outputs[-1].outputs[0].token_ids) == expected
            lengths = [len(o.outputs[0].token_ids) for o in outputs]
            assert lengths == sorted(lengths)  # cumulative
        _wait_idle(engine)
    finally:
        engine.shutdown()


def test_cancel_and_deadline_abort_and_free_blocks(demo_tokenizer):
    engine = AsyncEngine(make_fake_engine(demo_tokenizer, step_delay_s=0.01))
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    try:
        async def cancel_midway():
            seen = 0
            async for out in engine.generate("Once upon a time", params, "cancel-me"):
                seen = len(out.outputs[0].token_ids)
                if seen >= 3:
                    break  # leaving the iteration aborts the request
            return seen

        assert asyncio.run(cancel_midway()) >= 3
        _wait_idle(engine)

        async def with_deadline():
            await _collect(engine, "Once upon a time", params, "late",
                           deadline=time.monotonic() + 0.1)

        with pytest.raises(RequestDeadlineError):
            asyncio.run(with_deadline())
        _wait_idle(engine)

        async def task_cancelled():
            task = asyncio.ensure_future(_collect(engine, "Once", params, "task"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(task_cancelled())
        _wait_idle(engine)
    finally:
        engine.shutdown()


def test_bad_input_and_queue_limit(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer, step_delay_s=0.01, max_num_seqs=1)
    engine = AsyncEngine(llm, AsyncEngineConfig(max_queued_requests=2))
    try:
        with pytest.raises(ValueError, match="prompt"):
            asyncio.run(_collect(engine, "x" * 2000, SamplingParams(max_tokens=4), "long"))

        async def flood():
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            return await asyncio.gather(
                *[_collect(engine, "Hello", params, f"q{i}") for i in range(6)],
                return_exceptions=True)

        results = asyncio.run(flood())
        refused = [r for r in results if isinstance(r, QueueFullError)]
        done = [r for r in results if isinstance(r, list)]
        assert refused and done and len(refused) + len(done) == 6
        assert all(r[-1].outputs[0].finish_reason == "length" for r in done)
        _wait_idle(engine)
    finally:
        engine.shutdown()


def test_drain_refuses_new_and_abort_all_ends_streams(demo_tokenizer):
    engine = AsyncEngine(make_fake_engine(demo_tokenizer, step_delay_s=0.01))
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    try:
        async def main():
            task = asyncio.ensure_future(_collect(engine, "Hello", params, "inflight"))
            while engine.last_stats is None or engine.last_stats.num_requests_running == 0:
                await asyncio.sleep(0.01)
            engine.stop_accepting()
            with pytest.raises(EngineNotAcceptingError):
                await _collect(engine, "Hello", params, "late")
            assert not await engine.wait_until_idle(0.05)
            engine.abort_all()
            outputs = await task
            assert await engine.wait_until_idle(2.0)
            return outputs

        outputs = asyncio.run(main())
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
        _wait_idle(engine)
    finally:
        engine.shutdown()


def test_runner_failure_fails_only_its_requests(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer)
    engine = AsyncEngine(llm)
    try:
        llm.runner.fail_steps = 1
        with pytest.raises(RequestFailedError):
            asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=4), "fails"))
        outputs = asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=4), "ok"))
        assert outputs[-1].outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()


def test_engine_loop_crash_propagates_instead_of_hanging(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer)
    engine = AsyncEngine(llm)

    def broken_step():
        raise MemoryError("boom")

    llm.step = broken_step
    try:
        with pytest.raises(EngineDeadError, match="boom"):
            asyncio.run(asyncio.wait_for(
                _collect(engine, "Hello", SamplingParams(max_tokens=4), "x"), 10))
        assert engine.is_dead
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(engine, "Hello", SamplingParams(max_tokens=4), "y"))
    finally:
        engine.shutdown()


def test_duplicate_request_id_is_refused_without_harming_the_first(demo_tokenizer):
    engine = AsyncEngine(make_fake_engine(demo_tokenizer, step_delay_s=0.01))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    try:
        async def main():
            first = asyncio.ensure_future(_collect(engine, "Hello", params, "same"))
            while engine.num_in_flight == 0 or engine.last_stats is None \
                    or engine.last_stats.num_requests_running == 0:
                await asyncio.sleep(0.01)
            with pytest.raises(ValueError, match="request_id"):
                await _collect(engine, "Hello", params, "same")
            return await first

        outputs = asyncio.run(main())
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert len(outputs[-1].outputs[0].token_ids) == 10
    finally:
        engine.shutdown()
