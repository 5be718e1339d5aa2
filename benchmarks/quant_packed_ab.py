"""Packed quantized weights against the kernels they replaced, in one process: 64 mixed prompts
(prefill and decode batches) of the small model in bf16, then int8 / int4 / fp8 with their
projections packed for the packed-weight kernel, and the same methods with packing turned off
(QuantizedLinear.packable patched to False while that engine loads: decode rows then run
matvec_quant.cc and longer steps dequantize to bf16 each step, as before packing existed).
Engines alternate pass by pass; each pass draws new prompts (no prefix-cache hits).

  PYTHONPATH=. python benchmarks/quant_packed_ab.py --passes 2 \\
      --out benchmarks/results/quant_packed_ab_cpu_epyc_s8.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from benchmarks.decode_probe import run_mixed, write_small_checkpoint


def load_engines(path: str, methods: list[str], kv_mb: int) -> dict:
    from jaxserve.layers import quantized_linear as ql
    from jaxserve.llm import LLM

    kw = dict(dtype="bfloat16", max_num_seqs=64, max_model_len=1024,
              kv_cache_memory_bytes=kv_mb << 20, show_progress=False)
    engines = {"bf16": LLM(path, **kw)}
    for m in methods:
        engines[f"{m} packed"] = LLM(path, quantization=m, **kw)
        packable = ql.QuantizedLinear.packable
        ql.QuantizedLinear.packable = lambda self: False
        try:
            engines[f"{m} unpacked"] = LLM(path, quantization=m, **kw)
        finally:
            ql.QuantizedLinear.packable = packable
    return engines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["int8", "int4", "fp8"])
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxserve"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    path = write_small_checkpoint(os.path.join(args.cache_dir, "probe-small-bfloat16"),
                                  "bfloat16")
    engines = load_engines(path, args.methods, args.kv_cache_mb)
    for llm in engines.values():  # one small untimed pass each
        run_mixed(llm, 8, seed=1)
    load0 = os.getloadavg()
    tok_s = {name: [] for name in engines}
    for r in range(args.passes):
        for name, llm in engines.items():
            tok_s[name].append(run_mixed(llm, args.prompts, seed=100 + r)["output_tok_s"])
            print(f"pass {r}: {name:<14} {tok_s[name][-1]:7.1f} output tok/s", flush=True)
    rows = []
    for name, vals in tok_s.items():
        method = name.split()[0]
        base = tok_s["bf16"]
        row = {"engine": name, "output_tok_s": [round(v, 1) for v in vals],
               "vs_bf16": [round(v / b, 3) for v, b in zip(vals, base)]}
        if name.endswith("packed") and not name.endswith("unpacked"):
            old = tok_s[f"{method} unpacked"]
            row["vs_unpacked"] = [round(v / o, 3) for v, o in zip(vals, old)]
        rows.append(row)
        extra = f"  x unpacked {statistics.median(row['vs_unpacked']):.2f}" \
            if "vs_unpacked" in row else ""
        print(f"{name:<14} median {statistics.median(vals):7.1f} tok/s  x bf16 "
              f"{statistics.median(row['vs_bf16']):.2f}{extra}")
    result = {"command": "benchmarks/quant_packed_ab.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "prompts": args.prompts, "passes": args.passes,
              "loadavg": [list(load0), list(os.getloadavg())], "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
