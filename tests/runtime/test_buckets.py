"""Bucket shapes: every step the inputs can be packed into maps to one warmed-up executable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from jaxserve.runtime.buckets import BucketSpec, decode_has_own_program, seq_buckets
from jaxserve.runtime.inputs import prepare_inputs

BLOCK = 16


@dataclass
class Chunk:
    token_ids: list[int]
    start_pos: int
    block_table: list[int]


def _steps(rng, max_tokens, max_seqs, max_len):
    """Random decode-only and mixed steps within the limits."""
    for _ in range(300):
        n = int(rng.integers(1, max_seqs + 1))
        decode = rng.random() < 0.5
        lens = np.ones(n, int) if decode else rng.integers(1, max_tokens // n + 1, n)
        if lens.sum() > max_tokens:
            continue
        starts = [int(rng.integers(0, max_len - q)) for q in lens]
        yield [Chunk([1] * int(q), s, list(range(1, max_len // BLOCK + 1)))
               for q, s in zip(lens, starts)]


@pytest.mark.parametrize("decode_programs", [True, False])
def test_every_packed_step_has_a_warmed_up_key(decode_programs):
    spec = BucketSpec.build(128, 16, 32, bucket_widths=False, decode_programs=decode_programs)
    keys = spec.step_shapes()
    assert len(keys) == len(set(keys))
    # decode 2..16 + mixed 16..128: decode 16 folds into mixed (16, 16) unless it has its own
    assert len(keys) == (8 if decode_programs else 7)
    seen = set()
    for chunks in _steps(np.random.default_rng(0), 128, 16, 32 * BLOCK):
        key = spec.step_key(prepare_inputs(chunks, BLOCK, spec).shape_key)
        assert key in keys
        seen.add(key)
    assert seen == set(keys)


def test_only_the_reference_attention_has_decode_programs():
    assert decode_has_own_program("reference")
    assert not decode_has_own_program("blockwise") and not decode_has_own_program("pallas")


def test_decode_rows_get_midpoint_buckets_from_32_on():
    assert seq_buckets(2, 16) == (2, 4, 8, 16)
    assert seq_buckets(2, 64) == (2, 4, 8, 16, 32, 48, 64)
    assert seq_buckets(2, 256) == (2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
    assert seq_buckets(2, 40) == (2, 4, 8, 16, 32, 40)
    spec = BucketSpec.build(512, 64, 32, bucket_widths=False)
    keys = spec.step_shapes()
    for rows, want in ((33, 48), (48, 48), (49, 64)):
        chunks = [Chunk([1], 20, [1, 2]) for _ in range(rows)]
        key = spec.step_key(prepare_inputs(chunks, BLOCK, spec).shape_key)
        assert key[:2] == (want, want) and key in keys


def test_verification_steps_get_buckets_of_their_own():
    """With speculation (k = 4) a lone request's verification (5 tokens) packs into (5, 2), not
    (8, 8); two such requests into (16, 16) as before; eight into the midpoint bucket 48 (not
    64); every step has a key."""
    plain = BucketSpec.build(128, 16, 32, min_tokens=8, bucket_widths=False)
    spec = BucketSpec.build(128, 16, 32, min_tokens=8, bucket_widths=False, verify_tokens=5)
    assert spec.tokens == (5, 8, 16, 32, 48, 64, 96, 128) and plain.tokens == (8, 16, 32, 64, 128)
    lone = [Chunk([1] * 5, 40, [1, 2, 3, 4])]
    assert prepare_inputs(lone, BLOCK, plain).shape_key[:2] == (8, 8)
    assert prepare_inputs(lone, BLOCK, spec).shape_key[:2] == (5, 2)
    three = [Chunk([1] * 2, 40, [1, 2, 3, 4]), Chunk([1], 40, [1, 2, 3, 4]),
             Chunk([1], 40, [1, 2, 3, 4])]
    assert prepare_inputs(three, BLOCK, spec).shape_key[:2] == (5, 4)
    two = [Chunk([1] * 5, 40, [1, 2, 3, 4]) for _ in range(2)]
    assert prepare_inputs(two, BLOCK, spec).shape_key[:2] == (16, 16)
    keys = spec.step_shapes()
    assert set(keys) - set(plain.step_shapes()) == {
        *((5, s, 32, False) for s in (2, 4, 5)), (48, 16, 32, False), (96, 16, 32, False)}
    eight = [Chunk([1] * 5, 40, [1, 2, 3, 4]) for _ in range(8)]
    assert prepare_inputs(eight, BLOCK, spec).shape_key[:2] == (48, 16)
    for chunks in _steps(np.random.default_rng(1), 128, 16, 32 * BLOCK):
        assert spec.step_key(prepare_inputs(chunks, BLOCK, spec).shape_key) in keys
    # k + 1 on a power of two (k = 7) or between two (k = 10): that bucket gets the few rows
    k7 = BucketSpec.build(128, 16, 32, min_tokens=8, bucket_widths=False, verify_tokens=8)
    assert k7.tokens[:2] == (8, 16) and k7.mixed_seqs(8) == (2, 4, 8)
    assert prepare_inputs([Chunk([1] * 8, 40, [1, 2, 3, 4])], BLOCK, k7).shape_key[:2] == (8, 2)
    k10 = BucketSpec.build(128, 16, 32, min_tokens=16, bucket_widths=False, verify_tokens=11)
    assert k10.tokens[:3] == (11, 16, 32) and k10.mixed_seqs(11) == (2, 4, 8, 11)
