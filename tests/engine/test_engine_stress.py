"""Randomised mixes of requests on tight pools: same tokens as the reference, pool stays sane."""

import random

import pytest

from jaxserve.engine import SamplingParams

from tests.engine.conftest import reference_tokens


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    return request.param


@pytest.mark.parametrize("seed,prefix_caching", [(s, True) for s in range(6)] +
                         [(s, False) for s in range(6, 8)])
def test_random_mix_tight_pool(make_engine, seed, prefix_caching, async_scheduling):
    """Several sequences at once on a pool that cannot hold them all: the test checks that the
    pressure happened (preemptions, and prefix-cache hits where caching is on). With async
    scheduling, preemptions and aborts also hit sequences with a step in flight."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    engine = make_engine(
        block_size=bs, num_kv_blocks=48 // bs + rng.randint(1, 8), max_model_len=48,
        max_num_seqs=rng.randint(3, 6), max_num_batched_tokens=rng.randint(8, 40),
        enable_prefix_caching=prefix_caching,
    )
    shared = [rng.randrange(1, 1000) for _ in range(20)]
    expected, aborted, added = {}, set(), 0
    for step in range(400):
        if added < 20 and rng.random() < 0.3:
            plen = rng.randint(1, 30)
            prompt = (shared[:plen] if rng.random() < 0.5 else
                      [rng.randrange(1, 1000) for _ in range(plen)])
            n = rng.choice([1, 1, 2, 3])
            max_tokens = rng.randint(1, 48 - plen)
            req_seed = rng.choice([None, rng.randrange(100)])
            params = SamplingParams(n=n, max_tokens=max_tokens, seed=req_seed,
                                    prompt_logprobs=rng.choice([None, None, 1]))
            rid = f"r{added}"
            engine.add_request(rid, prompt, params)
            seeds = [req_seed] if n == 1 else [None if req_seed is None else req_seed + i
                                               for i in range(n)]
            expected[rid] = [reference_tokens(prompt, max_tokens, 1000, seed=s) for s in seeds]
            added += 1
        if engine.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(engine.requests))
            engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            want = expected[out.request_id]
            for comp in out.outputs:
                assert comp.token_ids == want[comp.index][:len(comp.token_ids)]
            if out.finished and out.request_id not in aborted:
                assert [c.token_ids for c in out.outputs] == want
                assert all(c.finish_reason == "length" for c in out.outputs)
        engine.scheduler.kv.pool.check_consistency()
        if added >= 20 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats.num_preemptions > 0, "the pool was never under pressure"
    assert (stats.prefix_cache_hits > 0) == prefix_caching, stats
    # async: decodes took the token of the step in flight
    assert (engine.runner.num_placeholders_filled > 0) == async_scheduling
