"""Pack one step's chunks into flat, bucket-padded numpy arrays (host side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from jaxserve.runtime.buckets import MIN_LOGIT_ROWS, BucketSpec, pick


class ChunkLike(Protocol):
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]


@dataclass
class StepInputs:
    """Numpy arrays of one step; sizes are the bucket sizes."""

    token_ids: np.ndarray  # int32 [T] (on device once a draft model wrote its drafts in)
    positions: np.ndarray  # int32 [T]
    slot_mapping: np.ndarray  # int32 [T]
    block_tables: np.ndarray  # int32 [S, W]
    seq_lens: np.ndarray  # int32 [S]
    query_start_loc: np.ndarray  # int32 [S + 1]
    logits_indices: np.ndarray  # int32 [S]: last token of each request's chunk
    num_seqs: int  # real requests (rows past it are padding)
    num_tokens: int  # real tokens
    decode_only: bool

    @property
    def shape_key(self) -> tuple[int, int, int, bool]:
        return (len(self.token_ids), len(self.seq_lens), self.block_tables.shape[1], self.decode_only)


def prepare_inputs(chunks: Sequence[ChunkLike], block_size: int, buckets: BucketSpec) -> StepInputs:
    """Flatten chunks (decodes and prefill chunks) onto one token axis padded to a bucket."""
    lens = np.fromiter((len(c.token_ids) for c in chunks), np.int32, len(chunks))
    starts = np.fromiter((c.start_pos for c in chunks), np.int32, len(chunks))
    num_seqs, num_tokens = len(chunks), int(lens.sum())
    decode_only = bool(np.all(lens == 1))
    if decode_only:
        t_pad = s_pad = pick(buckets.seqs, num_seqs)
    else:
        t_pad = pick(buckets.tokens, num_tokens)
        rows = buckets.mixed_seqs(t_pad)
        if num_seqs > rows[-1]:
            raise ValueError(f"{num_seqs} requests exceed the {rows[-1]} rows of bucket {t_pad}")
        s_pad = pick(rows, num_seqs)
    seq_lens = starts + lens
    blocks_needed = (seq_lens + block_size - 1) // block_size
    w_pad = pick(buckets.widths, int(blocks_needed.max()))

    block_tables = np.zeros((s_pad, w_pad), np.int32)
    for i, c in enumerate(chunks):
        n = int(blocks_needed[i])
        block_tables[i, :n] = c.block_table[:n]
    token_ids = np.zeros(t_pad, np.int32)
    token_ids[:num_tokens] = np.concatenate([np.asarray(c.token_ids, np.int32) for c in chunks])
    seq_of_token = np.repeat(np.arange(num_seqs, dtype=np.int32), lens)  # [num_tokens]
    qsl = np.zeros(s_pad + 1, np.int32)
    qsl[1 : num_seqs + 1] = np.cumsum(lens)
    qsl[num_seqs + 1 :] = num_tokens
    positions = np.zeros(t_pad, np.int32)
    positions[:num_tokens] = starts[seq_of_token] + np.arange(num_tokens) - qsl[seq_of_token]
    slot_mapping = np.zeros(t_pad, np.int32)  # padding writes land in the null block 0
    real_pos = positions[:num_tokens]
    slot_mapping[:num_tokens] = (
        block_tables[seq_of_token, real_pos // block_size] * block_size + real_pos % block_size
    )
    padded_lens = np.zeros(s_pad, np.int32)
    padded_lens[:num_seqs] = seq_lens
    logits_indices = np.zeros(max(s_pad, MIN_LOGIT_ROWS), np.int32)  # padding rows: token 0
    logits_indices[:num_seqs] = qsl[1 : num_seqs + 1] - 1
    return StepInputs(
        token_ids, positions, slot_mapping, block_tables, padded_lens, qsl, logits_indices,
        num_seqs, num_tokens, decode_only,
    )
