"""Decode projections of the small model (Qwen2.5-0.5B widths) per weight format: the CPU kernels
(bf16 matvec.cc, quantized matvec_quant.cc) against XLA's path for the same QuantizedLinear, at
a few token-row counts; median ms per call and the weight GB/s it reaches.

  PYTHONPATH=. python benchmarks/quant_matvec_probe.py --rows 1 4 8 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.layers.linear import Linear
from jaxserve.layers.quant_scheme import QuantConfig, quantize
from jaxserve.layers.quantized_linear import make_linear

SHAPES = {"gate_up": (896, 4864 * 2), "down": (4864, 896), "qkvo": (896, 896 + 128 * 2 + 896),
          "overhead": (4864, 16), "l2": (896, 512)}


def _layer(method: str | None, in_dim: int, out_dim: int, matvec: bool):
    from flax import nnx

    rng = np.random.default_rng(0)
    w = rng.standard_normal((out_dim, in_dim)).astype(np.float32) * in_dim**-0.5
    if method is None:
        lin = Linear(in_dim, out_dim, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                     matvec=matvec)
        lin.weight.set_value(jnp.asarray(w, jnp.bfloat16))
        return lin, w.size * 2
    quant = QuantConfig.online(method)
    lin = make_linear(in_dim, out_dim, bias=False, dtype=jnp.bfloat16, rngs=None, quant=quant,
                      matvec=matvec)
    arrays = quantize(w, method, quant.group_for(in_dim))
    lin.qweight.set_value(jnp.asarray(arrays["qweight"]))
    lin.scales.set_value(jnp.asarray(arrays["scales"]))
    return lin, arrays["qweight"].nbytes + arrays["scales"].nbytes


def time_call(fn, x, repeats: int) -> float:
    fn(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4", "fp8"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--xla", action="store_true", help="also time XLA's path (cpu_matvec off)")
    args = p.parse_args(argv)
    for shape in args.shapes:
        in_dim, out_dim = SHAPES[shape]
        for method in args.methods:
            for matvec in ([True, False] if args.xla else [True]):
                lin, nbytes = _layer(None if method == "bf16" else method, in_dim, out_dim, matvec)
                fn = jax.jit(lambda a, lin=lin: lin(a))
                for t in args.rows:
                    x = jnp.asarray(np.random.default_rng(t).standard_normal((t, in_dim)),
                                    jnp.bfloat16)
                    s = time_call(fn, x, args.repeats)
                    print(json.dumps({"shape": shape, "method": method, "kernel": matvec,
                                      "rows": t, "ms": round(1e3 * s, 4),
                                      "weight_GBps": round(nbytes / s / 1e9, 1)}), flush=True)


if __name__ == "__main__":
    main()
