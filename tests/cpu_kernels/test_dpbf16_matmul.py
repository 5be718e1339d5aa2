"""The AVX-512 BF16 matmul against float64 math on the same bf16 values, and where the engine
uses it (CPUs with AVX-512 BF16 and no AMX)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.cpu_kernels import amx_matmul as amx
from jaxserve.cpu_kernels import dpbf16_matmul as dp
from jaxserve.cpu_kernels import matvec as mv
from jaxserve.cpu_kernels import packed_matmul as pm
from jaxserve.layers import linear

from .bf16_oracle import check_matmul

needs_dpbf16 = pytest.mark.skipif(not dp.available(), reason="this CPU has no AVX-512 BF16")


@needs_dpbf16
@pytest.mark.parametrize("rows", [1, 5, 15, 16, 17, 33, 48, 64, 65, 130])
@pytest.mark.parametrize("k,n", [(896, 1152), (32, 16), (4864, 50), (7, 13), (289, 101)])
def test_matches_float_math(rows, k, n):
    check_matmul(dp.dpbf16_matmul, rows, k, n, atol_per_sqrt_k=1e-4)


@needs_dpbf16
def test_nan_and_inf_stay_in_their_row_and_column():
    x = jnp.ones((20, 65), jnp.bfloat16).at[17, 64].set(jnp.nan)  # odd K: NaN in the last pair
    w = jnp.ones((50, 65), jnp.bfloat16).at[5, 0].set(jnp.inf)
    y = np.asarray(dp.dpbf16_matmul(x, w), np.float32)
    assert np.isnan(y[17]).all()
    others = np.delete(y, 17, axis=0)  # padding rows 20..31 of the 16-row vectors never leak
    assert np.isinf(others[:, 5]).all() and np.isfinite(np.delete(others, 5, axis=1)).all()


@needs_dpbf16
def test_rounds_each_output_once_to_nearest_even():
    # 1 + 2^-8 + 2^-9 is exact in f32; bf16 keeps 7 fraction bits: it rounds up to 1 + 2^-7
    x = jnp.asarray([[1.0, 2**-8, 2**-9, 0.0]] * 3, jnp.bfloat16)
    w = jnp.ones((2, 4), jnp.bfloat16)
    y = np.asarray(dp.dpbf16_matmul(x, w), np.float32)
    assert (y == np.float32(1 + 2**-7)).all()


@needs_dpbf16
@pytest.mark.skipif(amx.available(), reason="the AMX kernel serves these rows on this CPU")
def test_linear_uses_it_between_the_matvec_and_prefill():
    layer = linear.Linear(64, 48, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matvec=True)
    top = linear.MATVEC_MAX_ROWS_NO_AMX  # without AMX the matvec kernel keeps up to 8 rows
    for rows, target in ((top, mv.TARGET), (top + 1, dp.TARGET),
                         (linear.AMX_MAX_ROWS, dp.TARGET), (linear.AMX_MAX_ROWS + 1, None)):
        x = jax.random.normal(jax.random.key(rows), (rows, 64), jnp.bfloat16)
        text = jax.jit(lambda a: layer(a)).lower(x).as_text()
        assert (dp.TARGET in text) == (target == dp.TARGET), rows
        assert (mv.TARGET in text) == (target == mv.TARGET), rows
        want = jnp.einsum("ti,oi->to", x, layer.weight[...])
        np.testing.assert_allclose(np.asarray(layer(x), np.float32), np.asarray(want, np.float32),
                                   rtol=2**-7, atol=2e-2)


@needs_dpbf16
def test_refuses_mismatched_operands_by_name():
    with pytest.raises(Exception, match="must share K"):
        dp.dpbf16_matmul(jnp.ones((8, 48), jnp.bfloat16), jnp.ones((16, 40), jnp.bfloat16))
    with pytest.raises(Exception, match="must be bfloat16"):
        dp.dpbf16_matmul(jnp.ones((8, 48), jnp.float32), jnp.ones((16, 48), jnp.float32))


def test_a_cpu_without_either_kernel_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(amx, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(dp, "cpu_has_avx512_bf16", lambda: False)
    for kernel in (amx, dp, pm):
        kernel.available.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="jaxserve.layers.linear"):
            assert linear.select_cpu_matvec("auto") == (jax.default_backend() == "cpu")
        if jax.default_backend() == "cpu":
            assert "neither AMX nor AVX-512 BF16" in caplog.text
        assert dp.available() is False and pm.available() is False
    finally:
        for kernel in (amx, dp, pm):
            kernel.available.cache_clear()
