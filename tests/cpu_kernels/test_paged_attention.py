"""The C++ CPU attention kernel against the float64 numpy oracle and the jnp reference.

Every case writes this step's K/V through the kernel into slots that held NaN (as a fresh cache
does) and leaves every other unused slot NaN too: nothing outside a sequence may leak.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve.cpu_kernels import build
from jaxserve.cpu_kernels import paged_attention as cpa
from jaxserve.layers import attention
from pallas_kernels import ragged_paged_attention_reference
from tests.pallas_kernels._paged_cases import make_case, naive_ragged

BF16 = ml_dtypes.bfloat16


def _new_token_slots(case):
    """Slot of every real query token (the last q_len positions of each sequence)."""
    bs = case.k_pages.shape[2]
    slots = []
    for s, seq_len in enumerate(case.seq_lens):
        q_len = int(case.query_start_loc[s + 1] - case.query_start_loc[s])
        for pos in range(int(seq_len) - q_len, int(seq_len)):
            slots.append(case.block_tables[s, pos // bs] * bs + pos % bs)
    return np.asarray(slots, np.int32)


PORTABLE = "jaxserve_cpu_paged_attention_portable"


def _portable_target() -> str:
    """The same kernel built without AVX-512: the paths a CPU without it runs."""
    build.register(cpa.SOURCE, cpa.SYMBOL, PORTABLE, extra_flags=("-mno-avx512f",))
    return PORTABLE


def _run(case, slots, **kw):
    """Hand the kernel pages whose new-token slots are NaN plus the new K/V rows."""
    kvh, nb, bs, d = case.k_pages.shape
    flat_k = case.k_pages.reshape(kvh, nb * bs, d)
    flat_v = case.v_pages.reshape(kvh, nb * bs, d)
    k_new = flat_k[:, slots].transpose(1, 0, 2)  # [n, Hkv, D]
    v_new = flat_v[:, slots].transpose(1, 0, 2)
    pad = len(case.q) - len(slots)  # padding tokens write into the null block's slot 0
    k_new = np.concatenate([k_new, np.zeros((pad, kvh, d), k_new.dtype)])
    v_new = np.concatenate([v_new, np.zeros((pad, kvh, d), v_new.dtype)])
    all_slots = np.concatenate([slots, np.zeros(pad, np.int32)])
    k_in, v_in = case.k_pages.copy(), case.v_pages.copy()
    k_in.reshape(kvh, -1, d)[:, slots] = np.nan
    v_in.reshape(kvh, -1, d)[:, slots] = np.nan
    fn = jax.jit(lambda *a: cpa.write_and_attend(*a, **kw))
    out, k_pages, v_pages = fn(case.q, k_new, v_new, cpa.k_pages_layout(k_in), v_in, all_slots,
                               case.block_tables, case.seq_lens, case.query_start_loc)
    return np.asarray(out, np.float32), np.asarray(k_pages), np.asarray(v_pages)


CASES = [  # (seq_lens, q_lens, extra padding tokens)
    ([37, 20, 200, 1], [1, 5, 40, 1], 3),  # decode rows, a short and a long prefill chunk
    ([64, 16], [64, 16], 0),  # whole prompts, block-aligned
    ([300], [1], 1),  # one long decode row
    ([30, 9, 50], [8, 9, 3], 2),  # chunks at and past the per-token limit (kShortChunk = 8)
]


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (BF16, 2e-2)])
@pytest.mark.parametrize("block_size,head_dim,heads", [(16, 64, (8, 2)), (32, 128, (4, 4)),
                                                      (8, 64, (6, 3)), (16, 64, (12, 1))])
@pytest.mark.parametrize("seq_lens,q_lens,pad", CASES)
def test_kernel_matches_oracles(seq_lens, q_lens, pad, block_size, head_dim, heads, dtype, tol):
    _check_case(seq_lens, q_lens, pad, block_size, head_dim, heads, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (BF16, 2e-2)])
def test_portable_paths_match_oracles(dtype, tol):
    """Built without AVX-512 (as on a CPU without it): same results."""
    _check_case([37, 20, 200, 1], [1, 5, 40, 1], 3, 16, 64, (8, 2), dtype, tol,
                target=_portable_target())


def _check_case(seq_lens, q_lens, pad, block_size, head_dim, heads, dtype, tol, **target):
    case = make_case(seq_lens, q_lens, num_q_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=head_dim, block_size=block_size,
                     num_tokens=sum(q_lens) + pad, dtype=dtype)
    slots = _new_token_slots(case)
    out, k_pages, v_pages = _run(case, slots, scale=head_dim**-0.5, **target)
    n = sum(q_lens)
    assert not np.isnan(out).any()
    assert np.all(out[n:] == 0)  # padding tokens
    want = naive_ragged(case)
    np.testing.assert_allclose(out[:n], want[:n], rtol=tol, atol=tol)
    ref = ragged_paged_attention_reference(jnp.asarray(case.q), jnp.asarray(case.k_pages),
                                           jnp.asarray(case.v_pages), case.block_tables,
                                           case.seq_lens, case.query_start_loc)
    np.testing.assert_allclose(out[:n], np.asarray(ref, np.float32)[:n], rtol=tol, atol=tol)
    # the new rows landed in their slots, K in the kernel's layout (block 0 takes padding)
    want_k = cpa.k_pages_layout(case.k_pages)
    f32 = lambda a: np.asarray(a[:, 1:], np.float32)  # NaN compares equal to NaN in float32
    np.testing.assert_array_equal(f32(k_pages), f32(want_k))
    np.testing.assert_array_equal(f32(v_pages), f32(case.v_pages))


@pytest.mark.parametrize("window,cap", [(7, None), (None, 20.0), (33, 5.0)])
@pytest.mark.parametrize("portable", [False, True])
def test_sliding_window_and_soft_cap(window, cap, portable):
    case = make_case([90, 41], [30, 1], num_q_heads=4, num_kv_heads=2, dtype=BF16)
    target = dict(target=_portable_target()) if portable else {}
    out, _, _ = _run(case, _new_token_slots(case), scale=0.125, sliding_window=window,
                     logits_soft_cap=cap, **target)
    want = naive_ragged(case, scale=0.125, sliding_window=window, logits_soft_cap=cap)
    np.testing.assert_allclose(out[:31], want[:31], rtol=2e-2, atol=2e-2)


def test_auto_backend_on_cpu_is_the_kernel(caplog):
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.attention"):
        assert attention.select_backend("auto").backend == "cpu"
    assert "attention backend: cpu" in caplog.text
    assert attention.select_backend("auto", tensor_parallel_size=2).backend == "blockwise"
    with pytest.raises(ValueError, match="attention_backend"):
        attention.select_backend("cpu", tensor_parallel_size=2)
    # the kernel reads quantized pages too: auto stays auto (the kernel), no blockwise fallback
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.attention"):
        caplog.clear()
        assert attention.backend_request("auto", "int8") == "auto"
        assert attention.select_backend(attention.backend_request("auto", "fp8")).backend == "cpu"
    assert "blockwise" not in caplog.text
    attention.check_kv_backend("cpu", "fp8")
    attention.check_kv_backend("cpu", "int8")


def test_failed_build_falls_back_to_blockwise_and_says_why(monkeypatch, caplog):
    def broken(*a, **k):
        raise build.KernelBuildError("no C++ compiler found (set CXX, or install g++)")

    monkeypatch.setattr(cpa, "ensure_built", broken)
    with caplog.at_level(logging.WARNING, logger="jaxserve.layers.attention"):
        assert attention.select_backend("auto").backend == "blockwise"
    assert "could not be built" in caplog.text and "no C++ compiler" in caplog.text


def test_build_error_names_the_compiler_message(tmp_path, monkeypatch):
    src = tmp_path / "broken.cc"
    src.write_text("this is not C++\n")
    with pytest.raises(build.KernelBuildError, match="failed"):
        build.load_library(src, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler"):
        build.load_library(tmp_path / "other.cc", cache_dir=tmp_path / "cache")
