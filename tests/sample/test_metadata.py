"""build_sampling_metadata: padding, optional parts, buckets, seeds."""

import numpy as np
import pytest

from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata, next_power_of_two


def test_plain_rows_have_no_optional_parts_and_greedy_padding():
    rows = [SamplingRow(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1), SamplingRow()]
    md = build_sampling_metadata(rows, 4, step_key_seed=3)
    assert md.penalties is None and md.bias is None
    assert md.num_rows == 4
    np.testing.assert_allclose(np.asarray(md.temperature), [0.7, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(md.top_k), [5, 0, 0, 0])
    np.testing.assert_allclose(np.asarray(md.top_p), [0.9, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(np.asarray(md.repetition_penalty), [1.0] * 4)
    assert int(md.step_seed) == 3


def test_penalty_inputs_bucketed_and_padded():
    rows = [
        SamplingRow(),
        SamplingRow(repetition_penalty=1.1, prompt_token_ids=list(range(10)), output_token_ids=[7] * 9),
        SamplingRow(presence_penalty=0.5, prompt_token_ids=[1, 2], output_token_ids=[]),
    ]
    md = build_sampling_metadata(rows, 4, 0)
    ids, plen = np.asarray(md.penalties.token_ids), np.asarray(md.penalties.prompt_lens)
    assert ids.shape == (4, 32)  # 19 tokens -> bucket 32
    np.testing.assert_array_equal(ids[1, :19], list(range(10)) + [7] * 9)
    assert (ids[1, 19:] == -1).all() and (ids[0] == -1).all() and (ids[3] == -1).all()
    np.testing.assert_array_equal(ids[2, :3], [1, 2, -1])
    np.testing.assert_array_equal(plen, [0, 10, 2, 0])
    assert md.bias is None
    with pytest.raises(ValueError, match="penalty_len"):
        build_sampling_metadata(rows, 4, 0, penalty_len=16)
    assert build_sampling_metadata(rows, 4, 0, penalty_len=64).penalties.token_ids.shape == (4, 64)


def test_sparse_bias_holds_bias_then_banned():
    rows = [SamplingRow(logit_bias={3: 1.5, 9: -2.0}, banned_token_ids=(0, 1)), SamplingRow()]
    md = build_sampling_metadata(rows, 2, 0)
    ids, vals = np.asarray(md.bias.token_ids), np.asarray(md.bias.values)
    assert ids.shape == (2, 8) and md.penalties is None
    np.testing.assert_array_equal(ids[0, :4], [3, 9, 0, 1])
    np.testing.assert_array_equal(vals[0, :4], [1.5, -2.0, -np.inf, -np.inf])
    assert (ids[0, 4:] == -1).all() and (ids[1] == -1).all() and (vals[1] == 0).all()


def test_seeds_split_into_halves():
    big = (5 << 32) | 17
    rows = [SamplingRow(seed=big), SamplingRow(seed=0), SamplingRow(), SamplingRow(seed=-1)]
    md = build_sampling_metadata(rows, 4, 0)
    np.testing.assert_array_equal(np.asarray(md.seed_lo), [17, 0, 0, 0xFFFFFFFF])
    np.testing.assert_array_equal(np.asarray(md.seed_hi), [5, 0, 0, 0xFFFFFFFF])
    np.testing.assert_array_equal(np.asarray(md.has_seed), [True, True, False, True])


def test_too_many_rows_and_buckets():
    with pytest.raises(ValueError):
        build_sampling_metadata([SamplingRow()] * 3, 2, 0)
    assert [next_power_of_two(n, 8) for n in (0, 1, 8, 9, 100)] == [8, 8, 8, 16, 128]
