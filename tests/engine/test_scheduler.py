"""Scheduler: token budget, max_num_seqs, decode-first order, chunked prefill, preemption, abort."""

from jaxserve.engine import EngineConfig
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.sequence import SequenceStatus
from jaxserve.runtime.runner_output import ModelRunnerOutput

from tests.engine.conftest import make_seq


def _config(**kw):
    base = dict(block_size=4, num_kv_blocks=64, max_model_len=64, vocab_size=100,
                max_num_seqs=8, max_num_batched_tokens=16)
    base.update(kw)
    return EngineConfig(**base)


def _step(sched, token=7):
    """Schedule, pretend the runner sampled `token` for every sampling chunk, update."""
    so = sched.schedule()
    out = ModelRunnerOutput(sampled={c.request_id: token for c in so.chunks if c.sample})
    sampled = sched.update_from_output(so, out)
    for seq in sampled:
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish_sequence(seq, SequenceStatus.FINISHED_LENGTH)
    return so


def _assert_all_free(sched):
    sched.kv.pool.check_consistency()
    assert sched.kv.num_free_blocks == sched.config.num_kv_blocks - 1
    assert not sched.has_unfinished()


def test_budget_and_chunked_prefill():
    sched = Scheduler(_config(max_num_batched_tokens=8))
    seq = make_seq("long", list(range(1, 21)), max_tokens=2)  # 20-token prompt, budget 8
    sched.add_sequence(seq)
    sizes = []
    while sched.has_unfinished():
        so = _step(sched)
        assert so.num_batched_tokens <= 8
        sizes.append([(c.start_pos, len(c.token_ids), c.sample) for c in so.chunks])
    assert sizes == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)], [(20, 1, True)]]
    _assert_all_free(sched)


def test_decodes_first_then_prefills_and_max_num_seqs():
    sched = Scheduler(_config(max_num_seqs=2, max_num_batched_tokens=16))
    a = make_seq("a", [1, 2, 3], max_tokens=5, arrival=0)
    sched.add_sequence(a)
    _step(sched)  # a prefilled, now decoding
    b = make_seq("b", list(range(1, 30)), max_tokens=2, arrival=1)
    c = make_seq("c", [5, 6], max_tokens=2, arrival=2)
    sched.add_sequence(b)
    sched.add_sequence(c)
    so = _step(sched)
    assert [ch.request_id for ch in so.chunks] == ["a", "b"]  # c blocked by max_num_seqs=2
    assert len(so.chunks[0].token_ids) == 1 and len(so.chunks[1].token_ids) == 15
    so = _step(sched)
    assert [ch.request_id for ch in so.chunks] == ["a", "b"]
    assert [len(ch.token_ids) for ch in so.chunks] == [1, 14]  # decode first, then prefill
    while sched.has_unfinished():
        so = _step(sched)
        assert len(so.chunks) <= 2
    _assert_all_free(sched)


def test_preemption_by_recompute_keeps_every_request():
    # 6 usable blocks of 4 tokens; 3 sequences that each grow to 4 blocks
    sched = Scheduler(_config(num_kv_blocks=7, max_model_len=16, max_num_batched_tokens=64))
    seqs = [make_seq(f"s{i}", [i + 1] * 6, max_tokens=10, arrival=i) for i in range(3)]
    for s in seqs:
        sched.add_sequence(s)
    steps = 0
    while sched.has_unfinished():
        so = _step(sched)
        steps += 1
        assert steps < 200
        # a preempted sequence restarts from position 0 with prompt + generated tokens
        for ch in so.chunks:
            if ch.start_pos == 0 and ch.output_token_ids:
                assert ch.token_ids == ch.prompt_token_ids + ch.output_token_ids
        sched.kv.pool.check_consistency()
    assert sched.num_preemptions > 0
    assert all(s.num_output_tokens == 10 for s in seqs)
    _assert_all_free(sched)


def test_oldest_request_is_never_the_victim():
    sched = Scheduler(_config(num_kv_blocks=5, max_model_len=16, max_num_batched_tokens=64))
    old = make_seq("old", [1] * 4, max_tokens=12, arrival=0)
    new = make_seq("new", [2] * 4, max_tokens=12, arrival=1)
    sched.add_sequence(old)
    sched.add_sequence(new)
    while sched.has_unfinished():
        so = _step(sched)
        if old.status is SequenceStatus.RUNNING:
            assert "old" in [c.request_id for c in so.chunks]
    assert sched.num_preemptions > 0
    _assert_all_free(sched)


def test_finish_waiting_and_running_frees_blocks():
    sched = Scheduler(_config())
    a = make_seq("a", list(range(1, 10)), arrival=0)
    b = make_seq("b", list(range(1, 10)), arrival=1)
    sched.add_sequence(a)
    _step(sched)
    sched.add_sequence(b)
    assert sched.kv.num_free_blocks < 63
    sched.finish_sequence(a, SequenceStatus.FINISHED_ABORTED)
    sched.finish_sequence(b, SequenceStatus.FINISHED_ABORTED)
    _assert_all_free(sched)


def test_min_tokens_bans_eos_and_stop_ids():
    from jaxserve.engine import SamplingParams

    sched = Scheduler(_config(eos_token_ids=(2,)))
    params = SamplingParams(min_tokens=2, max_tokens=4, stop_token_ids=[9])
    s = make_seq("s", [1, 3], max_tokens=4, params=params)
    sched.add_sequence(s)
    bans = []
    while sched.has_unfinished():
        so = _step(sched)
        bans.append(so.chunks[0].banned_token_ids)
    assert bans == [(2, 9), (2, 9), (), ()]
    _assert_all_free(sched)
