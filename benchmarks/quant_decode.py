"""Quantized decode on the CPU: ms/token of 1 request (and mixed-batch tok/s) for bf16, int8,
int4 and fp8 weights of the same small random model, in one run, with the weight bytes.

The model is decode_probe's "small" one (Qwen2.5-0.5B widths, 12 layers, vocab 32000, tied).
Quantized runs quantize it at load (`LLM(quantization=...)`). One JSON line per run, a table
last with each run's speed-up over bf16 and its weight bytes over bf16's.

  PYTHONPATH=. python benchmarks/quant_decode.py --methods none int8 int4 fp8 --mixed-prompts 64
  PYTHONPATH=. python benchmarks/quant_decode.py --methods none int8 int8+head  # lm_head too
  PYTHONPATH=. python benchmarks/quant_decode.py --methods none ct:int4-asym ct:int8-asym

`ct:<case>` loads a compressed-tensors checkpoint that the library's own compressors write from
the same model (asymmetric: int4 group 128 pack-quantized, int8 per channel int-quantized).

On a shared machine, --interleave --kv-cache-mb 512 alternates the methods' decode runs.
--no-async-scheduling runs every engine without async scheduling (the engine's default: on).
Beside each engine's ms/token, "step ms" is its compiled decode step alone (bare_step_seconds):
the device's share of a token; the difference is the engine's host work per step.
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

from benchmarks.decode_probe import measure_bandwidth, run_decode, run_mixed, write_small_checkpoint


BARE_CALLS = 10  # calls of the bare decode step per method and repeat (bare_step_seconds)

# compressed-tensors checkpoints written from the small model (tests/quant_checkpoints.py)
CT_CASES = {
    "int4-asym": dict(num_bits=4, type="int", strategy="group", group_size=128,
                      fmt="pack-quantized", symmetric=False),
    "int8-asym": dict(num_bits=8, type="int", strategy="channel", fmt="int-quantized",
                      symmetric=False),
}


def parse_method(name: str) -> tuple[str | None, bool]:
    """'none' -> (None, False); 'int8' -> ('int8', False); 'int8+head' -> ('int8', True): the
    lm_head quantized too (quantize_lm_head); 'ct:int4-asym' -> ('ct:int4-asym', False)."""
    if name.startswith("ct:"):
        if name[3:] not in CT_CASES:
            raise SystemExit(f"--methods: {name!r}: compressed-tensors cases are "
                             f"{', '.join('ct:' + c for c in CT_CASES)}")
        return name, False
    method, plus, rest = name.partition("+")
    if plus and rest != "head":
        raise SystemExit(f"--methods: {name!r}: the only suffix is '+head'")
    return (None if method == "none" else method), bool(plus)


def label(method: str | None, head: bool) -> str:
    return (method or "bf16") + ("+head" if head else "")


def start(path: str, spec: tuple[str | None, bool], args):
    """(LLM, start-up seconds, weight report) of one method (and whether its lm_head is
    quantized)."""
    from jaxserve import LLM
    from jaxserve.layers.quant_scheme import QuantConfig
    from jaxserve.weights.loader import read_raw_config
    from jaxserve.weights.quant_loading import log_weight_bytes, resolve_quantization

    method, head = spec
    kv = dict(kv_cache_memory_bytes=args.kv_cache_mb << 20) if args.kv_cache_mb else {}
    if method and method.startswith("ct:"):  # pre-quantized: the checkpoint says how
        path, method = compressed_checkpoint(path, method[3:]), None
    t = time.perf_counter()
    llm = LLM(path, dtype="bfloat16", quantization=method, quantize_lm_head=head,
              cpu_matvec=args.cpu_matvec,
              max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, max_num_batched_tokens=512,
              async_scheduling=args.async_scheduling, use_tqdm_on_load=False, **kv)
    startup = time.perf_counter() - t
    if method:
        quant = QuantConfig.online(method, head)
    else:
        quant = resolve_quantization(read_raw_config(path), None, False)  # the checkpoint's
    return llm, startup, log_weight_bytes(llm.engine.runner.state, quant, "bfloat16")


def compressed_checkpoint(src: str, case: str) -> str:
    """The compressed-tensors checkpoint of `case` written from src (once; kept beside it)."""
    from tests.quant_checkpoints import write_compressed

    out = f"{src}-ct-{case}"
    if not os.path.exists(os.path.join(out, "config.json")):
        write_compressed(src, out, **CT_CASES[case])
    return out


def bare_step_seconds(llm, position: int, calls: int) -> list[float]:
    """Seconds of the engine's compiled 1-row decode step alone, from its call until its logits
    are ready: the device's share of a token, without the engine's host work (scheduling,
    inputs, sampling, outputs). The step attends `position` earlier tokens, all in the null
    block 0, where it also writes (no request's KV is touched)."""
    from types import SimpleNamespace

    from jaxserve.runtime.inputs import prepare_inputs
    from jaxserve.runtime.model_runner import _step_arrays

    runner = llm.engine.runner
    size = runner.cfg.block_size
    chunk = SimpleNamespace(token_ids=[5], start_pos=position,
                            block_table=[0] * (position // size + 1))
    inp = prepare_inputs([chunk], size, runner.buckets)
    key = runner.buckets.step_key(inp.shape_key)
    step, args = runner.executables.get("step", key), _step_arrays(inp, decode_only=key[3])
    args += runner.no_placeholders(len(inp.token_ids))
    seconds = []
    for _ in range(calls):
        t = time.perf_counter()
        logits, _, runner.kv_cache = step(runner.params.leaves, runner.kv_cache, *args)
        logits.block_until_ready()
        seconds.append(time.perf_counter() - t)
    return seconds


def summary(spec: tuple[str | None, bool], llm, steps, cpu, startup: float, report: dict,
            args, bare) -> dict:
    import jax

    return {"method": label(*spec), "ms_per_token": 1e3 * statistics.median(steps),
            "bare_step_ms": 1e3 * statistics.median(bare),
            "p90_ms": 1e3 * float(np.percentile(steps, 90)), "steps": len(steps),
            "cpu_ms_per_token": 1e3 * statistics.median(cpu),
            "weight_bytes": report["weight_bytes"], "layer_ratio": report.get("layer_ratio"),
            "startup_s": startup, "cpu_matvec": args.cpu_matvec,
            "async_scheduling": llm.engine.config.async_scheduling, "jax": jax.__version__}


def one_run(path: str, spec: tuple[str | None, bool], args) -> dict:
    llm, startup, report = start(path, spec, args)
    steps, cpu, bare = [], [], []
    for rep in range(args.repeats):
        wall_s, cpu_s = run_decode(llm, args.prompt_len, args.decode_tokens, seed=1 + rep)
        steps, cpu = steps + wall_s, cpu + cpu_s
        bare += bare_step_seconds(llm, args.prompt_len + args.decode_tokens // 2, BARE_CALLS)
    row = summary(spec, llm, steps, cpu, startup, report, args, bare)
    for num in args.mixed_prompts:
        row[f"mixed_{num}_output_tok_s"] = run_mixed(llm, num, seed=2)["output_tok_s"]
    del llm
    gc.collect()
    return row


def interleaved(path: str, methods: list[tuple[str | None, bool]], args) -> list[dict]:
    """Every method's engine started first, then their decode runs in turn, repeat after
    repeat: a shared machine's load swings reach every method alike."""
    engines = [start(path, m, args) for m in methods]
    steps = [([], [], []) for _ in methods]
    for rep in range(args.repeats):
        for (llm, _, _), (wall, cpu, bare) in zip(engines, steps):
            wall_s, cpu_s = run_decode(llm, args.prompt_len, args.decode_tokens, seed=1 + rep)
            wall += wall_s
            cpu += cpu_s
            bare += bare_step_seconds(llm, args.prompt_len + args.decode_tokens // 2, BARE_CALLS)
    rows = []
    for m, (llm, startup, report), (wall, cpu, bare) in zip(methods, engines, steps):
        rows.append(summary(m, llm, wall, cpu, startup, report, args, bare))
        for num in args.mixed_prompts:
            rows[-1][f"mixed_{num}_output_tok_s"] = run_mixed(llm, num, seed=2)["output_tok_s"]
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["none", "int8", "int4", "fp8"],
                   help="none (bf16) | int8 | int4 | fp8 | w8a8; a '+head' suffix (int8+head) "
                        "quantizes the lm_head too (quantize_lm_head)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxserve"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mixed-prompts", type=int, nargs="*", default=[])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--cpu-matvec", default="auto", choices=["auto", "off"],
                   help="off: every projection on XLA (the quantized ones without the C++ "
                        "kernel, matvec_quant.cc)")
    p.add_argument("--interleave", action="store_true",
                   help="start every method's engine, then alternate their decode runs")
    p.add_argument("--kv-cache-mb", type=int, default=None,
                   help="KV cache per engine (default: the engine's; give one with --interleave)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the last one's results (default: the "
                        "engine's, on)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    path = write_small_checkpoint(os.path.join(args.cache_dir, "probe-small-bfloat16"),
                                  "bfloat16")
    load0 = os.getloadavg()
    bw0 = measure_bandwidth()
    methods = [parse_method(m) for m in args.methods]
    if args.interleave:
        if not args.kv_cache_mb:
            p.error("--interleave runs several engines at once: give --kv-cache-mb")
        rows = interleaved(path, methods, args)
    else:
        rows = []
        for m in methods:
            rows.append(one_run(path, m, args))
            print(json.dumps(rows[-1]), flush=True)
    bw1 = measure_bandwidth()
    load1 = os.getloadavg()
    base = next((r for r in rows if r["method"] == "bf16"), None)
    print(f"\nread bandwidth {bw0['read_GBps']:.0f} / {bw1['read_GBps']:.0f} GB/s (start / end); "
          f"load average {load0[0]:.2f} / {load1[0]:.2f}")
    print(f"{'method':<10} {'ms/token':>9} {'cpu ms':>7} {'speed-up':>9} {'step ms':>8} "
          f"{'step x':>7} {'weight MB':>10} {'x bf16':>7} {'layers x bf16':>14}")
    for r in rows:
        speed = base["ms_per_token"] / r["ms_per_token"] if base else float("nan")
        step = base["bare_step_ms"] / r["bare_step_ms"] if base else float("nan")
        size = r["weight_bytes"] / base["weight_bytes"] if base else float("nan")
        layers = f"{r['layer_ratio']:.3f}" if r["layer_ratio"] else "-"
        print(f"{r['method']:<10} {r['ms_per_token']:>9.2f} {r['cpu_ms_per_token']:>7.1f} "
              f"{speed:>9.2f} {r['bare_step_ms']:>8.2f} {step:>7.2f} "
              f"{r['weight_bytes'] / 1e6:>10.1f} {size:>7.3f} {layers:>14}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "benchmarks/quant_decode.py " + " ".join(argv or sys.argv[1:]),
                       "bandwidth": [bw0, bw1], "loadavg_1_5_15": [load0, load1],
                       "cpu": _cpu_model(), "rows": rows}, f, indent=1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
