"""Quantized KV cache on the CPU: decode ms/token with bf16 vs int8 vs fp8 KV at long context.

Two measurements, in one process, side by side, for every `--kv-dtypes` variant KV[:BACKEND]
(BACKEND: the attention backend, default auto = the C++ kernel on CPU; e.g. int8:blockwise):
- attention alone: the decode attention of `--batch` rows over `--context` tokens each, one
  layer's pages of the small model's shape (2 kv heads x 64), bf16 pages vs int8 / fp8 pages +
  f32 scales, through the backend's entry (the kernel's also writes one K/V row per sequence);
  ms per call and the KV bytes it must read.
- end to end: the "small" model (decode_probe's, Qwen2.5-0.5B widths, bf16 weights), one
  engine per variant, each with `--batch` distinct random prompts of `--context` tokens
  prefilled, then their decode steps (every request decoding) interleaved round-robin so all
  see the same machine load; ms per step, bytes per KV block, and the floor (weights + KV
  bytes / read GB/s).

  PYTHONPATH=. python benchmarks/kv_quant_decode.py --batch 16 --context 2048 \
      --kv-dtypes auto int8 int8:blockwise fp8 --out benchmarks/results/cpu_kv_quant_decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.decode_probe import SMALL, FIRST_TOKEN_ID, decode_bytes, measure_bandwidth, \
    write_small_checkpoint


def _variant(name: str) -> tuple[str, str]:
    """"int8:blockwise" -> ("int8", "blockwise"); "int8" -> ("int8", "auto")."""
    kv, _, backend = name.partition(":")
    return kv, backend or "auto"


def attention_alone(variant: str, batch: int, context: int, repeats: int) -> dict:
    """ms per decode-attention call over `batch` x `context` tokens of one layer."""
    import jax
    import jax.numpy as jnp

    from jaxserve.cpu_kernels import paged_attention as cpa
    from jaxserve.layers.attention import backend_request, select_backend
    from jaxserve.layers.blockwise_attention import blockwise_paged_attention
    from jaxserve.layers.kv_quant import (bytes_per_token, pack_rows, page_dtype,
                                          quantize_tokens, value_dtype)

    kv_dtype, requested = _variant(variant)
    backend = select_backend(backend_request(requested, kv_dtype)).backend
    kvh, d, hq, bs = SMALL["num_key_value_heads"], SMALL["head_dim"], 14, 16
    blocks = context // bs
    nb = 1 + batch * blocks
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((nb * bs, kvh, d), np.float32))
    if kv_dtype == "auto":
        k = x.astype(jnp.bfloat16)
    else:
        k = pack_rows(*quantize_tokens(x, value_dtype(page_dtype(kv_dtype, "bfloat16"))))  # [N, Hkv, D + 4]
    k = k.transpose(1, 0, 2).reshape(kvh, nb, bs, -1)
    tables = jnp.asarray(1 + rng.permutation(batch * blocks).reshape(batch, blocks), jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, hq, d), np.float32), jnp.bfloat16)
    lens = jnp.full((batch,), context, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    if backend == "cpu":  # K in the kernel's layout; this step's rows written to the null block
        kv = (jnp.asarray(cpa.k_pages_layout(np.asarray(k))), k)
        new = q[:, :kvh]  # [S, Hkv, D]
        slots = jnp.zeros((batch,), jnp.int32)
        fn = jax.jit(lambda q, kp, vp, t, sl, qs: cpa.write_and_attend(
            q, new, new, kp, vp, slots, t, sl, qs, scale=d**-0.5)[0])
    elif backend == "blockwise":
        kv = (k, k)
        fn = jax.jit(blockwise_paged_attention)
    else:
        raise ValueError(f"attention alone: backend {backend} is not measured here")
    fn(q, *kv, tables, lens, qsl).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(q, *kv, tables, lens, qsl).block_until_ready()
        times.append(time.perf_counter() - t)
    kv_bytes = batch * context * bytes_per_token(kv_dtype, "bfloat16", kvh, d)
    ms = 1e3 * statistics.median(times)
    return {"probe": "attention", "variant": variant, "kv_cache_dtype": kv_dtype,
            "backend": backend, "batch": batch, "context": context, "ms_per_call": ms,
            "kv_bytes": kv_bytes, "GBps": kv_bytes / ms / 1e6}


def _prefill(llm, args) -> float:
    """Adds `batch` distinct random prompts; steps until every request has its first token."""
    from jaxserve import SamplingParams

    eng = llm.engine
    rng = np.random.default_rng(1)
    # early requests decode while later ones prefill: enough tokens that all still run after
    max_tokens = -(-args.batch * args.context // 512) + 2 + 2 * args.decode_tokens
    for i in range(args.batch):
        prompt = rng.integers(FIRST_TOKEN_ID, SMALL["vocab_size"], args.context).tolist()
        eng.add_request(f"r{i}", {"prompt_token_ids": prompt},
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
    started: set[str] = set()
    t = time.perf_counter()
    while len(started) < args.batch:
        for o in eng.step():
            if o.outputs and o.outputs[0].token_ids:
                started.add(o.request_id)
    return time.perf_counter() - t


def end_to_end(path: str, args) -> list[dict]:
    """Decode ms per step of `batch` requests at `context` tokens, one engine per KV dtype,
    all prefilled first, then their decode steps interleaved round-robin (same load for all)."""
    import jax
    from jaxserve import LLM
    from jaxserve.runtime.kv_cache import kv_block_bytes

    max_len = args.context + args.batch * args.context // 512 + 2 * args.decode_tokens + 16
    engines, rows = {}, {}
    for variant in args.kv_dtypes:
        kv, backend = _variant(variant)
        t = time.perf_counter()
        engines[variant] = LLM(path, dtype="bfloat16", kv_cache_dtype=kv,
                               attention_backend=backend, max_num_seqs=args.batch,
                               max_model_len=max_len, max_num_batched_tokens=512,
                               use_tqdm_on_load=False, enable_prompt_logprobs=False)
        startup = time.perf_counter() - t
        prefill_s = _prefill(engines[variant], args)
        cfg = engines[variant].engine.runner.model_config
        rows[variant] = {"probe": "decode", "variant": variant, "kv_cache_dtype": kv,
                    "attention_backend": backend, "batch": args.batch,
                    "context": args.context, "prefill_s": prefill_s, "startup_s": startup,
                    "bytes_per_block": kv_block_bytes(cfg, 16, "bfloat16", kv),
                    "num_kv_blocks": engines[variant].engine.config.num_kv_blocks,
                    "jax": jax.__version__}
    times = {kv: [] for kv in engines}
    cpu = {kv: [] for kv in engines}
    for _ in range(args.decode_tokens):
        for kv, llm in engines.items():
            t, c = time.perf_counter(), time.process_time()
            llm.engine.step()
            times[kv].append(time.perf_counter() - t)
            cpu[kv].append(time.process_time() - c)
    for kv, llm in engines.items():
        assert llm.engine.get_stats().num_requests_running == args.batch  # all decoded each step
        llm.engine.abort_request([f"r{i}" for i in range(args.batch)])
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        rows[kv].update(ms_per_step=1e3 * statistics.median(times[kv]),
                        p90_ms=1e3 * float(np.percentile(times[kv], 90)),
                        cpu_ms_per_step=1e3 * statistics.median(cpu[kv]), steps=len(times[kv]))
    engines.clear()
    gc.collect()
    return list(rows.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-dtypes", nargs="+", default=["auto", "int8", "int8:blockwise", "fp8"],
                   help="KV[:BACKEND] variants (BACKEND default auto)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxserve"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    bw0 = measure_bandwidth()
    rows = [attention_alone(k, args.batch, args.context, args.repeats) for k in args.kv_dtypes]
    for r in rows:
        print(json.dumps(r), flush=True)
    if not args.skip_end_to_end:
        path = write_small_checkpoint(os.path.join(args.cache_dir, "probe-small-bfloat16"),
                                      "bfloat16")
        for row in end_to_end(path, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    bw1 = measure_bandwidth()
    read = statistics.median([bw0["read_GBps"], bw1["read_GBps"]])
    weights = decode_bytes(SMALL, 2, 0)
    for r in rows:
        if r["probe"] == "decode":
            kv = r["batch"] * (r["context"] + args.decode_tokens // 2) * r["bytes_per_block"] / 16
            r["floor_ms"] = 1e3 * (weights + kv) / (read * 1e9)
            r["kv_bytes_per_step"] = kv
    print(f"\nread bandwidth {bw0['read_GBps']:.0f} / {bw1['read_GBps']:.0f} GB/s (start / end)")
    for probe, key in (("attention", "ms_per_call"), ("decode", "ms_per_step")):
        sel = [r for r in rows if r["probe"] == probe]
        base = next((r for r in sel if r["variant"] == "auto"), None)
        for r in sel:
            extra = (f"{r['kv_bytes'] / 1e6:.0f} MB KV, {r['GBps']:.1f} GB/s" if probe == "attention"
                     else f"{r['bytes_per_block']} B/block, floor {r['floor_ms']:.1f} ms, "
                          f"{r['cpu_ms_per_step']:.1f} CPU ms")
            speed = base[key] / r[key] if base else float("nan")
            print(f"{probe:<10} {r['variant']:<15} {r[key]:8.2f} ms  x{speed:.2f} vs bf16"
                  f"  ({extra})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "benchmarks/kv_quant_decode.py " + " ".join(argv or sys.argv[1:]),
                       "bandwidth": [bw0, bw1], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
