"""BlockPool: ref counts, null block, LRU free queue, eviction of cached blocks."""

import pytest

from jaxserve.engine.block_pool import NULL_BLOCK_ID, BlockPool, hash_block_tokens


def test_null_block_never_handed_out():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 4
    pool.check_consistency()
    assert NULL_BLOCK_ID not in [b.block_id for b in pool.get_new_blocks(4)]


def test_ref_counts_and_double_free():
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and pool.num_free_blocks == 3
    with pytest.raises(RuntimeError):
        pool.free_blocks([b])
    pool.check_consistency()


def test_hash_chain_depends_on_parent_and_tokens():
    h1 = hash_block_tokens(None, [1, 2, 3, 4])
    assert h1 == hash_block_tokens(None, [1, 2, 3, 4])
    assert h1 != hash_block_tokens(None, [1, 2, 3, 5])
    h2 = hash_block_tokens(h1, [5, 6, 7, 8])
    assert h2 != hash_block_tokens(None, [5, 6, 7, 8])
    assert h2 != hash_block_tokens(hash_block_tokens(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block_tokens(None, [1], b"lora") != hash_block_tokens(None, [1])


def test_cached_block_survives_free_until_evicted_lru():
    pool = BlockPool(4)  # 3 usable
    a, b, c = pool.get_new_blocks(3)
    for blk, tag in ((a, 1), (b, 2), (c, 3)):
        assert pool.cache_full_block(blk, hash_block_tokens(None, [tag]))
    pool.free_blocks([b, a, c])  # free order = eviction order
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 3
    # a hit on a free cached block takes it out of the free queue
    hit = pool.get_cached_block(hash_block_tokens(None, [1]))
    assert hit is a
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 2
    # the least recently freed (b) is evicted first, then c
    (new,) = pool.get_new_blocks(1)
    assert new is b and b.block_hash is None
    assert pool.get_cached_block(hash_block_tokens(None, [2])) is None
    assert pool.get_cached_block(hash_block_tokens(None, [3])) is c
    pool.free_blocks([new, a])
    pool.check_consistency()
    assert pool.num_free_blocks == 3


def test_duplicate_hash_stays_private_and_caching_off():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [9, 9])
    assert pool.cache_full_block(a, h)
    assert not pool.cache_full_block(b, h)
    assert b.block_hash is None and pool.get_cached_block(h) is a
    pool.free_blocks([a, b])
    assert pool.reset_prefix_cache() and pool.num_cached_blocks == 0
    off = BlockPool(4, enable_caching=False)
    (x,) = off.get_new_blocks(1)
    assert not off.cache_full_block(x, h)
    off.free_blocks([x])
    off.check_consistency()
