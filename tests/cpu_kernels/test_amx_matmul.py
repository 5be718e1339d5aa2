"""The AMX tile matmul against float math on the same bf16 values, and where the engine uses it."""

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
from jaxserve.layers import linear

from .bf16_oracle import check_matmul

needs_amx = pytest.mark.skipif(not amx.available(), reason="this CPU (or kernel) has no AMX tiles")


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 64, 130])
@pytest.mark.parametrize("k,n", [(896, 1152), (32, 16), (4864, 48), (288, 4000)])
def test_matches_float_math(rows, k, n):
    check_matmul(amx.amx_matmul, rows, k, n, atol_per_sqrt_k=1e-3)


@needs_amx
def test_nan_and_inf_stay_in_their_row_and_column():
    x = jnp.ones((20, 64), jnp.bfloat16).at[17, 3].set(jnp.nan)
    w = jnp.ones((48, 64), jnp.bfloat16).at[5, 0].set(jnp.inf)
    y = np.asarray(amx.amx_matmul(x, w), np.float32)
    assert np.isnan(y[17]).all()
    others = np.delete(y, 17, axis=0)
    assert np.isinf(others[:, 5]).all() and np.isfinite(np.delete(others, 5, axis=1)).all()


@needs_amx
def test_linear_uses_it_between_the_matvec_and_prefill():
    layer = linear.Linear(64, 48, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matvec=True)
    for rows, target in ((2, mv.TARGET), (5, amx.TARGET), (linear.AMX_MAX_ROWS, amx.TARGET),
                         (linear.AMX_MAX_ROWS + 1, None)):
        x = jax.random.normal(jax.random.key(rows), (rows, 64), jnp.bfloat16)
        text = jax.jit(lambda a: layer(a)).lower(x).as_text()
        assert (amx.TARGET in text) == (target == amx.TARGET), rows
        want = jnp.einsum("ti,oi->to", x, layer.weight[...])
        np.testing.assert_allclose(np.asarray(layer(x), np.float32), np.asarray(want, np.float32),
                                   rtol=2**-7, atol=2e-2)


@needs_amx
def test_untileable_weight_is_logged_and_left_to_the_next_kernel(caplog):
    layer = linear.Linear(48, 40, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matvec=True)
    x = jnp.ones((8, 48), jnp.bfloat16)  # K = 48 is not a multiple of 32
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.linear"):
        text = jax.jit(lambda a: layer(a)).lower(x).as_text()
    assert amx.TARGET not in text and "does not fit the AMX tiles" in caplog.text
    assert (dp.TARGET in text) == dp.available()


@needs_amx
def test_refuses_an_untileable_shape_by_name():
    with pytest.raises(Exception, match="K % 32 == 0"):
        amx.amx_matmul(jnp.ones((8, 48), jnp.bfloat16), jnp.ones((16, 48), jnp.bfloat16))


def test_a_cpu_without_amx_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(amx, "cpu_has_amx", lambda: False)
    amx.available.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="jaxserve.cpu_kernels.amx_matmul"):
            assert amx.available() is False
        assert "no AMX tiles on this CPU" in caplog.text
    finally:
        amx.available.cache_clear()
