"""BlockPool: fixed-size KV blocks, ref counts, the hash -> block prefix cache and the LRU free queue."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

NULL_BLOCK_ID = 0  # reserved: never handed out; padding slots point at it

BlockHash = bytes


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: bytes = b""
) -> BlockHash:
    """Hash of one FULL block: chains the parent block's hash with this block's token ids."""
    h = hashlib.sha256()
    h.update(parent_hash or b"\x00" * 32)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(extra_key)
    return h.digest()


class KVBlock:
    """Metadata of one physical KV block."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        cached = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={cached})"


class BlockPool:
    """Owns every block. Free blocks (ref count 0) sit in an LRU queue; the front is evicted first.

    A free block may still hold a cached prefix (its hash stays registered) until it is handed
    out again; a cache hit on a free block takes it out of the queue (`touch`).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("num_blocks: must be >= 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # pinned forever
        self._free: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:]
        )
        self._cached: dict[BlockHash, KVBlock] = {}

    # ---------------------------------------------------------------- queries
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached ones included)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    # ---------------------------------------------------------------- allocation
    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Pop `num_blocks` from the front of the free queue (evicting their cached hashes)."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"cannot allocate {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on (cached) blocks; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the queue's tail in the given order.

        Pass a request's blocks tail-first so its last blocks are evicted before its prefix.
        """
        for block in ordered_blocks:
            if block.block_id == NULL_BLOCK_ID:
                continue
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    # ---------------------------------------------------------------- prefix cache
    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its hash. False if caching is off, the block is
        already cached, or another block already holds that hash (this one then stays private)."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True

    # ---------------------------------------------------------------- checks
    def check_consistency(self) -> None:
        """Assert the pool's invariants (used by tests)."""
        assert self.null_block.ref_cnt >= 1 and NULL_BLOCK_ID not in self._free
        for block in self.blocks[1:]:
            in_free = block.block_id in self._free
            assert block.ref_cnt >= 0, block
            assert in_free == (block.ref_cnt == 0), block
        for h, block in self._cached.items():
            assert block.block_hash == h, block
