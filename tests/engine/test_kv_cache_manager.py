"""KVCacheManager: allocation, prefix hits over full blocks, registration after compute."""

from jaxserve.engine.kv_cache_manager import KVCacheManager

from tests.engine.conftest import make_seq


def _compute(kv, seq, n):
    blocks = kv.allocate_slots(seq, n)
    assert blocks is not None
    seq.num_computed_tokens += n
    kv.cache_computed_blocks(seq, seq.num_computed_tokens)
    return blocks


def test_allocate_exact_blocks_and_free():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    seq = make_seq("a", list(range(1, 11)))  # 10 tokens -> 3 blocks
    blocks = _compute(kv, seq, 10)
    assert len(blocks) == 3 and 0 not in kv.get_block_ids(seq)
    assert kv.num_free_blocks == 6
    # only the 2 full blocks are cached, the partial one is private
    assert kv.num_cached_blocks == 2
    seq.output_token_ids.append(5)  # decode: position 10 is in the 3rd block already
    assert len(kv.allocate_slots(seq, 1)) == 3
    kv.free(seq)
    assert kv.num_free_blocks == 9
    kv.pool.check_consistency()


def test_prefix_hits_are_full_blocks_and_leave_one_token():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(kv, a, 9)
    b = make_seq("b", [1, 2, 3, 4, 5, 6, 7, 8, 100, 101])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.get_block_ids(a)[:2]
    # an identical 8-token prompt may only reuse 1 block: the last token must be computed
    c = make_seq("c", [1, 2, 3, 4, 5, 6, 7, 8])
    assert kv.get_computed_blocks(c)[1] == 4
    # a different first block breaks the chain even if the second block matches
    d = make_seq("d", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(d)[1] == 0
    blocks = kv.allocate_slots(b, 2, hits)
    assert hits[0].ref_cnt == 2 and len(blocks) == 3
    b.num_computed_tokens = 10
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 19 and kv.num_cached_blocks == 2
    kv.pool.check_consistency()


def test_hits_on_free_blocks_count_against_capacity():
    kv = KVCacheManager(num_blocks=4, block_size=2)  # 3 usable
    a = make_seq("a", [1, 2, 3, 4, 5])
    _compute(kv, a, 5)
    kv.free(a)  # 3 free, 2 of them cached
    b = make_seq("b", [1, 2, 3, 4, 9, 9, 9])  # hits 2 blocks, needs 2 more -> 4 > 3
    hits, n = kv.get_computed_blocks(b)
    assert n == 4
    assert kv.allocate_slots(b, 3, hits) is None
    assert kv.num_free_blocks == 3 and all(h.ref_cnt == 0 for h in hits)
    c = make_seq("c", [1, 2, 3, 4, 9])  # hits 2, needs 1 more -> fits
    hits, n = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 1, hits) is not None
    assert kv.num_free_blocks == 0
    kv.free(c)
    kv.pool.check_consistency()


def test_prompt_logprobs_requests_skip_prefix_cache():
    from jaxserve.engine import SamplingParams

    kv = KVCacheManager(num_blocks=10, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    _compute(kv, a, 5)
    b = make_seq("b", [1, 2, 3, 4, 5], params=SamplingParams(prompt_logprobs=1))
    assert kv.get_computed_blocks(b) == ([], 0)
    kv.free(a)


def test_caching_disabled():
    kv = KVCacheManager(num_blocks=10, block_size=2, enable_caching=False)
    a = make_seq("a", [1, 2, 3, 4, 5])
    _compute(kv, a, 5)
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_seq("b", [1, 2, 3, 4, 5]))[1] == 0
    kv.free(a)
    assert kv.num_free_blocks == 9
