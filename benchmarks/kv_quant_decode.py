"""Quantized KV cache on the CPU: decode ms/token with bf16 vs int8 vs fp8 KV at long context.

Two measurements, in one process, side by side:
- attention alone: the blockwise decode attention (the CPU serving path) of `--batch` rows over
  `--context` tokens each, one layer's pages of the small model's shape (2 kv heads x 64), bf16
  pages vs int8 / fp8 pages + f32 scales; ms per call and the KV bytes it must read.
- end to end: the "small" model (decode_probe's, Qwen2.5-0.5B widths, bf16 weights), `--batch`
  distinct random prompts of `--context` tokens, then the decode steps with every request
  decoding; ms per step, bytes per KV block, and the floor (weights + KV bytes / read GB/s).

  PYTHONPATH=. python benchmarks/kv_quant_decode.py --batch 16 --context 2048 \
      --out benchmarks/results/kv_quant_decode.json
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


def attention_alone(kv_dtype: str, batch: int, context: int, repeats: int) -> dict:
    """ms per blockwise decode-attention call over `batch` x `context` tokens of one layer."""
    import jax
    import jax.numpy as jnp

    from jaxserve.layers.blockwise_attention import blockwise_paged_attention
    from jaxserve.layers.kv_quant import bytes_per_token, page_dtype, quantize_tokens

    kvh, d, hq, bs = SMALL["num_key_value_heads"], SMALL["head_dim"], 14, 16
    blocks = context // bs
    nb = 1 + batch * blocks
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((nb * bs, kvh, d), np.float32))
    if kv_dtype == "auto":
        k = x.astype(jnp.bfloat16).transpose(1, 0, 2).reshape(kvh, nb, bs, d)
        kv, scales = (k, k), {}
    else:
        vals, s = quantize_tokens(x, page_dtype(kv_dtype, "bfloat16"))
        k = vals.transpose(1, 0, 2).reshape(kvh, nb, bs, d)
        kv = (k, k)
        scales = dict(k_scales=s.T.reshape(kvh, nb, bs), v_scales=s.T.reshape(kvh, nb, bs))
    tables = jnp.asarray(1 + rng.permutation(batch * blocks).reshape(batch, blocks), jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, hq, d), np.float32), jnp.bfloat16)
    lens = jnp.full((batch,), context, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    fn = jax.jit(lambda q, k, v, t, n, s, **sc: blockwise_paged_attention(q, k, v, t, n, s, **sc))
    fn(q, *kv, tables, lens, qsl, **scales).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(q, *kv, tables, lens, qsl, **scales).block_until_ready()
        times.append(time.perf_counter() - t)
    kv_bytes = batch * context * bytes_per_token(kv_dtype, "bfloat16", kvh, d)
    ms = 1e3 * statistics.median(times)
    return {"probe": "attention", "kv_cache_dtype": kv_dtype, "batch": batch, "context": context,
            "ms_per_call": ms, "kv_bytes": kv_bytes, "GBps": kv_bytes / ms / 1e6}


def end_to_end(path: str, kv_dtype: str, args) -> dict:
    """Decode ms per step of `batch` requests at `context` tokens, after their prefills."""
    import jax
    from jaxserve import LLM, SamplingParams
    from jaxserve.runtime.kv_cache import kv_block_bytes

    max_len = args.context + args.decode_tokens + 16
    t = time.perf_counter()
    llm = LLM(path, dtype="bfloat16", kv_cache_dtype=kv_dtype, max_num_seqs=args.batch,
              max_model_len=max_len, max_num_batched_tokens=512, use_tqdm_on_load=False,
              enable_prompt_logprobs=False)
    startup = time.perf_counter() - t
    eng = llm.engine
    rng = np.random.default_rng(1)
    for i in range(args.batch):
        prompt = rng.integers(FIRST_TOKEN_ID, SMALL["vocab_size"], args.context).tolist()
        eng.add_request(f"r{i}", {"prompt_token_ids": prompt},
                        SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True,
                                       temperature=0.0))
    started: set[str] = set()
    t = time.perf_counter()
    while len(started) < args.batch:  # prefills (chunked), until every request has a token
        for o in eng.step():
            if o.outputs and o.outputs[0].token_ids:
                started.add(o.request_id)
    prefill_s = time.perf_counter() - t
    times, cpu = [], []
    while eng.has_unfinished_requests():
        t, c = time.perf_counter(), time.process_time()
        outs = eng.step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if any(o.finished for o in outs):
            break  # every request runs the same length: the batch shrinks from here on
    while eng.has_unfinished_requests():
        eng.step()
    block_bytes = kv_block_bytes(llm.engine.runner.model_config, 16, "bfloat16", kv_dtype)
    row = {"probe": "decode", "kv_cache_dtype": kv_dtype, "batch": args.batch,
           "context": args.context, "ms_per_step": 1e3 * statistics.median(times),
           "p90_ms": 1e3 * float(np.percentile(times, 90)), "steps": len(times),
           "cpu_ms_per_step": 1e3 * statistics.median(cpu), "prefill_s": prefill_s,
           "bytes_per_block": block_bytes, "startup_s": startup, "jax": jax.__version__,
           "num_kv_blocks": eng.config.num_kv_blocks}
    del llm, eng
    gc.collect()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-dtypes", nargs="+", default=["auto", "int8", "fp8"])
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
        for k in args.kv_dtypes:
            rows.append(end_to_end(path, k, args))
            print(json.dumps(rows[-1]), flush=True)
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
        base = next((r for r in sel if r["kv_cache_dtype"] == "auto"), None)
        for r in sel:
            extra = (f"{r['kv_bytes'] / 1e6:.0f} MB KV, {r['GBps']:.1f} GB/s" if probe == "attention"
                     else f"{r['bytes_per_block']} B/block, floor {r['floor_ms']:.1f} ms, "
                          f"{r['cpu_ms_per_step']:.1f} CPU ms")
            speed = base[key] / r[key] if base else float("nan")
            print(f"{probe:<10} {r['kv_cache_dtype']:<5} {r[key]:8.2f} ms  x{speed:.2f} vs bf16"
                  f"  ({extra})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "benchmarks/kv_quant_decode.py " + " ".join(argv or sys.argv[1:]),
                       "bandwidth": [bw0, bw1], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
