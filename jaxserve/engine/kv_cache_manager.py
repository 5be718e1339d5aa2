"""KVCacheManager: per-sequence block tables on top of the BlockPool, prefix-cache lookups."""

from __future__ import annotations

from .block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from .sequence import Sequence


class KVCacheManager:
    """Maps each sequence to its blocks; finds prefix hits; registers full computed blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same, as the runner's block table
        self._num_registered: dict[str, int] = {}  # leading blocks already in the prefix cache
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---------------------------------------------------------------- hashing
    def block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[BlockHash]:
        """The hash chain of `seq`'s first `num_full_blocks` full blocks (memoised on seq)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, seq.token_slice(i * bs, (i + 1) * bs)))
        return hashes[:num_full_blocks]

    # ---------------------------------------------------------------- lookup
    def get_computed_blocks(self, seq: Sequence) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks; at least one token is always left to compute."""
        if not self.enable_caching or seq.skip_prefix_cache:
            return [], 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self.block_hashes(seq, max_blocks):
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---------------------------------------------------------------- allocation
    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
    ) -> list[KVBlock] | None:
        """Give `seq` blocks for `num_new_tokens` more tokens (after any prefix hits).

        Returns the whole block list, or None (nothing changed) when too few blocks are free.
        """
        hits = new_computed_blocks or []
        blocks = self._blocks.get(seq.seq_id, [])
        num_computed = seq.num_computed_tokens + len(hits) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(blocks) - len(hits)
        hits_in_free_queue = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - hits_in_free_queue:
            return None
        ids = self._block_ids.setdefault(seq.seq_id, [])
        if hits:
            self.pool.touch(hits)  # before get_new_blocks, so hits cannot be evicted
            blocks.extend(hits)
            ids.extend(b.block_id for b in hits)
            self._num_registered[seq.seq_id] = len(blocks)
        if num_new_blocks > 0:
            new_blocks = self.pool.get_new_blocks(num_new_blocks)
            blocks.extend(new_blocks)
            ids.extend(b.block_id for b in new_blocks)
        self._blocks[seq.seq_id] = blocks
        return blocks

    def cache_computed_blocks(self, seq: Sequence, num_written: int) -> None:
        """Register in the prefix cache `seq`'s full blocks among its first `num_written`
        tokens, whose KV a finished step has written (and whose token ids are known)."""
        if not self.enable_caching:
            return
        blocks = self._blocks.get(seq.seq_id)
        if not blocks:
            return
        start = self._num_registered.get(seq.seq_id, 0)
        num_full = min(min(num_written, seq.num_tokens) // self.block_size, len(blocks))
        if num_full <= start:
            return
        hashes = self.block_hashes(seq, num_full)
        for i in range(start, num_full):
            self.pool.cache_full_block(blocks[i], hashes[i])
        self._num_registered[seq.seq_id] = num_full

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Return `seq`'s blocks past those `num_tokens` tokens need (rejected speculative
        slots) to the pool; they were never registered in the prefix cache."""
        blocks = self._blocks.get(seq.seq_id)
        keep = -(-num_tokens // self.block_size)
        if not blocks or len(blocks) <= keep:
            return
        extra = blocks[keep:]
        del blocks[keep:]
        del self._block_ids[seq.seq_id][keep:]
        assert self._num_registered.get(seq.seq_id, 0) <= keep
        self.pool.free_blocks(reversed(extra))

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s blocks (tail first, so its prefix stays cached longest)."""
        blocks = self._blocks.pop(seq.seq_id, [])
        self._block_ids.pop(seq.seq_id, None)
        self._num_registered.pop(seq.seq_id, None)
        self.pool.free_blocks(reversed(blocks))

    # ---------------------------------------------------------------- queries
    def get_block_ids(self, seq: Sequence) -> list[int]:
        """A copy of `seq`'s block table."""
        return list(self._block_ids.get(seq.seq_id, ()))

    def num_blocks_of(self, seq: Sequence) -> int:
        return len(self._blocks.get(seq.seq_id, []))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached_blocks

    @property
    def num_tracked_sequences(self) -> int:
        return len(self._blocks)
