"""Decode projections of the small model (Qwen2.5-0.5B widths) per weight format: the CPU kernels
(bf16 matvec.cc, quantized matvec_quant.cc) against XLA's path for the same QuantizedLinear, at
a few token-row counts; median ms per call and the weight GB/s it reaches.

  PYTHONPATH=. python benchmarks/quant_matvec_probe.py --rows 1 4 8 16

--model: every decoder projection of the 12-layer small model (7 per layer, no lm_head) in one
jitted call per format, the formats alternated call by call, median ms and the speed-up over
bf16: the weight-streaming part of a decode step without the rest of the step.

  PYTHONPATH=. python benchmarks/quant_matvec_probe.py --model --rows 1 --repeats 20

--prefill: the kernel against the bf16 dot on the weight dequantized in the step, per row count
(where QuantizedLinear switches from one to the other).

  PYTHONPATH=. python benchmarks/quant_matvec_probe.py --prefill --rows 1 2 4 8 16 32 \
      --shapes gate_up down --repeats 10
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

LAYER = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)]
SHAPES = {"gate_up": (896, 4864 * 2), "down": (4864, 896), "qkvo": (896, 896 + 128 * 2 + 896),
          "overhead": (4864, 16), "l2": (896, 512)}


def _layer(method: str | None, in_dim: int, out_dim: int, matvec: bool, seed: int = 0):
    from flax import nnx

    rng = np.random.default_rng(seed)
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


def model_probe(args) -> None:
    """All 84 decoder projections of the small model per format, alternated call by call."""
    import os

    from flax import nnx

    fns, nbytes = {}, {}
    shapes = LAYER * args.layers
    for method in args.methods:
        made = [_layer(None if method == "bf16" else method, i, o, True, seed=n)
                for n, (i, o) in enumerate(shapes)]  # distinct weights, passed as arguments
        graphdef, state = nnx.split(nnx.List([lin for lin, _ in made]))

        def run(state, xs, graphdef=graphdef):
            # one projection after another, as in a decode step (each input depends on the
            # previous output through a zero-valued term; XLA would otherwise overlap them)
            x, wide, total = xs[0], xs[1], 0.0
            for (i, _), lin in zip(shapes, nnx.merge(graphdef, state)):
                y = lin(x if i == 896 else wide)  # [T, out]
                dep = (y[:, :1] * 0).astype(x.dtype)  # [T, 1]
                x, wide, total = x + dep, wide + dep, total + y[0, 0]
            return total

        step = jax.jit(run)
        fns[method] = lambda xs, step=step, state=state: step(state, xs)
        nbytes[method] = sum(b for _, b in made)
    for t in args.rows:
        rng = np.random.default_rng(t)
        xs = [jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16) for d in (896, 4864)]
        times = {m: [] for m in fns}
        for f in fns.values():
            jax.block_until_ready(f(xs))
        for _ in range(args.repeats):
            for m, f in fns.items():
                s = time.perf_counter()
                jax.block_until_ready(f(xs))
                times[m].append(time.perf_counter() - s)
        ms = {m: 1e3 * statistics.median(v) for m, v in times.items()}
        base = ms.get("bf16")
        for m in fns:
            print(json.dumps({"model_projections": args.layers * len(LAYER), "method": m,
                              "rows": t, "ms": round(ms[m], 3),
                              "weight_MB": round(nbytes[m] / 1e6, 1),
                              "weight_GBps": round(nbytes[m] / ms[m] / 1e6, 1),
                              "speedup_vs_bf16": round(base / ms[m], 2) if base else None,
                              "loadavg": os.getloadavg()[0]}), flush=True)


def prefill_probe(args) -> None:
    """Per quantized format and row count: the kernel against the bf16 dot on the weight
    dequantized in the step (QuantizedLinear's two bf16 forms), the crossover for
    KERNEL_MAX_ROWS."""
    from jaxserve.cpu_kernels.matvec_quant import matvec_quant

    for shape in args.shapes:
        in_dim, out_dim = SHAPES[shape]
        for method in [m for m in args.methods if m != "bf16"]:
            lin, _ = _layer(method, in_dim, out_dim, True)
            zeros = None if lin.zeros is None else lin.zeros[...]
            kernel = jax.jit(lambda a, lin=lin, z=zeros, m=method: matvec_quant(
                a, lin.qweight[...], lin.scales[...], z, m))
            dot = jax.jit(lambda a, lin=lin: jnp.einsum(
                "ti,oi->to", a, lin.dequantized(jnp.bfloat16),
                preferred_element_type=jnp.float32))
            for t in args.rows:
                x = jnp.asarray(np.random.default_rng(t).standard_normal((t, in_dim)),
                                jnp.bfloat16)
                row = {"shape": shape, "method": method, "rows": t}
                for name, fn in (("kernel", kernel), ("dequant_dot", dot)):
                    row[f"{name}_ms"] = round(1e3 * time_call(fn, x, args.repeats), 3)
                print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4", "fp8"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--xla", action="store_true", help="also time XLA's path (cpu_matvec off)")
    p.add_argument("--model", action="store_true", help="the whole model's projections")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--kernel-max-rows", type=int, default=None,
                   help="override QuantizedLinear.KERNEL_MAX_ROWS (every format) for an A/B")
    p.add_argument("--prefill", action="store_true",
                   help="kernel vs the bf16 dot on the dequantized weight, per row count")
    args = p.parse_args(argv)
    if args.kernel_max_rows is not None:
        from jaxserve.layers import quantized_linear

        quantized_linear.KERNEL_MAX_ROWS.update(dict.fromkeys(("int8", "int4", "fp8"),
                                                              args.kernel_max_rows))
    if args.model:
        return model_probe(args)
    if args.prefill:
        return prefill_probe(args)
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
