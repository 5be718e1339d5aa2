"""The C++ decode matmul against float math on the same bf16 values, and where the engine uses it."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.cpu_kernels import build
from jaxserve.cpu_kernels import matvec as mv
from jaxserve.layers import linear

PORTABLE = "jaxserve_cpu_matvec_portable"


def _portable() -> str:
    build.register(mv.SOURCE, mv.SYMBOL, PORTABLE, extra_flags=("-mno-avx512f",))
    return PORTABLE


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("k,n", [(896, 1152), (100, 37), (33, 130)])
def test_matches_float_math(rows, k, n, portable):
    rng = np.random.default_rng(rows * 1000 + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    kw = dict(target=_portable()) if portable else {}
    y = np.asarray(jax.jit(lambda a, b: mv.matvec(a, b, **kw))(x, w), np.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    # f32 accumulation then one rounding to bf16 (relative 2^-9) of each output
    np.testing.assert_allclose(y, want, rtol=2**-8, atol=1e-3 * np.sqrt(k))


def test_nan_and_inf_propagate():
    x = jnp.ones((2, 64), jnp.bfloat16).at[1, 3].set(jnp.nan)
    w = jnp.ones((40, 64), jnp.bfloat16).at[5, 0].set(jnp.inf)
    y = np.asarray(mv.matvec(x, w), np.float32)
    assert np.isnan(y[1]).all() and np.isinf(y[0, 5]) and np.isfinite(np.delete(y[0], 5)).all()


def test_linear_uses_it_only_for_few_bf16_rows():
    layer = linear.Linear(64, 48, bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matvec=True)
    for rows, used in ((2, True), (linear.matvec_max_rows() + 1, False)):
        x = jnp.ones((rows, 64), jnp.bfloat16)
        text = jax.jit(lambda a: layer(a)).lower(x).as_text()
        assert (mv.TARGET in text) == used
        want = jnp.einsum("ti,oi->to", x, layer.weight[...]) + layer.bias[...]
        np.testing.assert_allclose(np.asarray(layer(x), np.float32), np.asarray(want, np.float32),
                                   rtol=2**-7, atol=1e-2)


def test_selection_is_logged_and_refuses_unknown(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="jaxserve.layers.linear"):
        assert linear.select_cpu_matvec("auto") is True
        assert linear.select_cpu_matvec("auto", tensor_parallel_size=2) is False
    assert "CPU decode kernel" in caplog.text and "not sharded" in caplog.text
    assert linear.select_cpu_matvec("off") is False
    with pytest.raises(ValueError, match="cpu_matvec"):
        linear.select_cpu_matvec("on")

    def broken():
        raise build.KernelBuildError("no C++ compiler found")

    monkeypatch.setattr(mv, "ensure_built", broken)
    with caplog.at_level(logging.WARNING, logger="jaxserve.layers.linear"):
        assert linear.select_cpu_matvec("auto") is False
    assert "could not be built" in caplog.text and "no C++ compiler" in caplog.text
