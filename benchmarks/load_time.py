"""Load time of one checkpoint as an HF directory vs converted to a jaxserve (orbax) checkpoint.

    python benchmarks/load_time.py --hidden 1024 --layers 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax

from converters import convert
from jaxserve.demo import DemoShape, write_random_llama
from jaxserve.weights.loader import load_model


def _timed_load(path: str, dtype: str) -> float:
    start = time.perf_counter()
    loaded = load_model(path, dtype=dtype)
    jax.block_until_ready(jax.tree.leaves(loaded.model))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shape = DemoShape(
            hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256),
        )
        hf_dir = write_random_llama(os.path.join(tmp, "hf"), shape)
        size = os.path.getsize(os.path.join(hf_dir, "model.safetensors"))
        conv_dir = os.path.join(tmp, "converted")
        convert(hf_dir, conv_dir, args.dtype)
        _timed_load(hf_dir, args.dtype)  # first touch: page cache warm for both
        _timed_load(conv_dir, args.dtype)
        hf = [_timed_load(hf_dir, args.dtype) for _ in range(args.repeats)]
        conv = [_timed_load(conv_dir, args.dtype) for _ in range(args.repeats)]
    result = {
        "benchmark": "load_time", "device": jax.devices()[0].device_kind,
        "platform": platform.machine(), "jax": jax.__version__, "dtype": args.dtype,
        "checkpoint_bytes": size, "hf_dir_s_median": statistics.median(hf),
        "converted_s_median": statistics.median(conv),
        "converted_over_hf": statistics.median(conv) / statistics.median(hf),
        "hf_runs": hf, "converted_runs": conv,
    }
    print(json.dumps(result))
    print(f"{size / 2**20:.0f} MiB: HF dir {result['hf_dir_s_median']:.2f}s, "
          f"converted {result['converted_s_median']:.2f}s (x{result['converted_over_hf']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/load_time.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
                **result}, f, indent=2)


if __name__ == "__main__":
    main()
