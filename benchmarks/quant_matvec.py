"""Which matmul form streams quantized weights on XLA:CPU: HLO evidence + ms per weight pass.

For 24 weights of the small model's MLP shape ([4864, 896], as a decode step reads them) and T
tokens, compiles each form, reports the fusion kinds, any full-size buffer the ENTRY
computation materialises besides the parameters (a dequantised copy of the weight), and the
median wall / CPU ms of one pass over all weights, bf16 first as the baseline.

  PYTHONPATH=. python benchmarks/quant_matvec.py --tokens 1 8 64 256
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.layers.linear import Linear
from jaxserve.layers.quant_scheme import QuantConfig, quantize
from jaxserve.layers.quantized_linear import QuantizedLinear

OUT, IN, COUNT = 4864, 896, 24
_SHAPE = re.compile(r"= (\w+)\[([\d,]+)\]")


def materialised(hlo: str) -> list[str]:
    """ENTRY instructions (not parameters) with >= OUT * IN / 2 elements (int4's packed size)."""
    entry = hlo[hlo.index("ENTRY"):]
    found = []
    for line in entry.splitlines():
        m = _SHAPE.search(line)
        if not m or "parameter(" in line:
            continue
        n = int(np.prod([int(d) for d in m.group(2).split(",")]))
        if n >= OUT * IN // 2:
            found.append(line.strip().split(", metadata")[0][:160])
    return found


def build(form: str, rng) -> list:
    layers = []
    for _ in range(COUNT):
        w = (rng.standard_normal((OUT, IN)) * 0.02).astype(np.float32)
        if form == "bf16":
            lin = Linear(IN, OUT, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            lin.weight.set_value(jnp.asarray(w, dtype=jnp.bfloat16))  # [out, in]
        else:
            quant = QuantConfig.online(form)
            lin = QuantizedLinear(IN, OUT, bias=False, dtype=jnp.bfloat16, quant=quant)
            arrays = quantize(w, quant.method, quant.group_for(IN))
            lin.qweight.set_value(jnp.asarray(arrays["qweight"]))
            lin.scales.set_value(jnp.asarray(arrays["scales"]))
        layers.append(lin)
    return layers


def run(form: str, tokens: int, repeats: int) -> dict:
    layers = build(form, np.random.default_rng(0))
    graphdef, state = nnx.split(nnx.List(layers))

    def passes(state, x):  # every weight once; x feeds forward so nothing is hoisted
        mods = nnx.merge(graphdef, state)
        acc = jnp.zeros((tokens, OUT), jnp.float32)
        for lin in mods:
            acc = acc + lin(x).astype(jnp.float32)
            x = x + acc[:, :IN].astype(x.dtype) * 1e-3
        return acc

    x = jnp.ones((tokens, IN), jnp.bfloat16)
    compiled = jax.jit(passes).lower(state, x).compile()
    hlo = compiled.as_text()
    kinds = sorted(set(re.findall(r'"kind":"(\w+)"', hlo)))
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        compiled(state, x).block_until_ready()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(state))
    return dict(form=form, tokens=tokens, weight_mb=round(nbytes / 1e6, 1),
                wall_ms=round(1e3 * statistics.median(walls), 2),
                cpu_ms=round(1e3 * statistics.median(cpus), 2), fusion_kinds=kinds,
                materialised=materialised(hlo)[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--forms", nargs="+", default=["bf16", "int8", "int4", "fp8", "w8a8"])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rows = []
    for tokens in args.tokens:
        for form in args.forms:
            row = run(form, tokens, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'form':6} {'T':>4} {'MB':>7} {'wall ms':>9} {'cpu ms':>8} {'vs bf16':>8}  copy?")
    base = {r["tokens"]: r["wall_ms"] for r in rows if r["form"] == "bf16"}
    for r in rows:
        ratio = base.get(r["tokens"], float("nan")) / r["wall_ms"]
        print(f"{r['form']:6} {r['tokens']:>4} {r['weight_mb']:>7} {r['wall_ms']:>9} "
              f"{r['cpu_ms']:>8} {ratio:>8.2f}  {'yes' if r['materialised'] else 'no'}")


if __name__ == "__main__":
    main()
