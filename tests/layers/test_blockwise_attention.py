"""The blockwise CPU attention path equals an independent naive numpy attention."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve.layers.blockwise_attention import BlockwiseSizes, blockwise_paged_attention
from tests.pallas_kernels._paged_cases import make_case, naive_ragged

CASES = {
    # mixed: decodes, a long prefill crossing many blocks and tiles, padding rows and tokens
    "mixed": dict(seq_lens=[1, 37, 130, 0, 16, 77], q_lens=[1, 1, 70, 0, 16, 3], num_tokens=100),
    "decode_only": dict(seq_lens=[5, 200, 17, 64], q_lens=[1, 1, 1, 1]),
    "prefill_only": dict(seq_lens=[90, 33], q_lens=[90, 20]),
    "gqa8_bs32": dict(seq_lens=[50, 3, 129], q_lens=[1, 3, 60], num_q_heads=8, num_kv_heads=1,
                      block_size=32),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("window,cap", [(None, None), (24, None), (None, 5.0)])
@pytest.mark.parametrize("gather", [0, 512])  # decode chunks: always 2 blocks / 5-8 blocks
def test_blockwise_matches_naive(name, window, cap, gather):
    spec = dict(CASES[name])
    case = make_case(spec.pop("seq_lens"), spec.pop("q_lens"), max_blocks=14, seed=3, **spec)
    fn = jax.jit(lambda *a: blockwise_paged_attention(
        *a, sliding_window=window, logits_soft_cap=cap, sizes=BlockwiseSizes(2, 3, 16, decode_gather_tokens=gather)))
    got = np.asarray(fn(case.q, case.k_pages, case.v_pages, case.block_tables, case.seq_lens,
                        case.query_start_loc))
    want = naive_ragged(case, sliding_window=window, logits_soft_cap=cap)
    assert not np.isnan(got).any()  # poisoned (NaN) slots outside the sequences never leak
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)  # float32 vs float64 naive
