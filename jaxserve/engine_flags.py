"""Command-line flags of an engine (shared by `generate`, `demo` and `serve`) -> EngineArgs."""

from __future__ import annotations

import argparse

from jaxserve.llm import EngineArgs


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The EngineArgs fields as flags (the model itself is each command's own argument)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None,
                   help="KV cache budget, e.g. 4GiB or 512MB (default on CPU: 4 GiB, at most "
                        "--kv-cache-memory-fraction of the available RAM)")
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.9,
                   help="share of free accelerator memory (or available RAM on CPU) the KV "
                        "cache may take")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "blockwise", "reference", "pallas"])
    g.add_argument("--seed", type=int, default=0)
    return parser


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1e9' or '1073741824' -> bytes (argparse type)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):].strip()
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (e.g. 4GiB, 512MB, 1073741824)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return int(value)


def engine_args_from(args: argparse.Namespace, model: str | None = None) -> EngineArgs:
    return EngineArgs(
        model=model or args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        attention_backend=args.attention_backend,
        seed=args.seed,
    )
