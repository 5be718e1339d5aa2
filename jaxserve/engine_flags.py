"""Command-line flags of an engine (shared by `generate`, `demo` and `serve`) -> EngineArgs."""

from __future__ import annotations

import argparse

from jaxserve.llm import DEFAULT_COMPILE_CACHE, EngineArgs


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The EngineArgs fields as flags (the model itself is each command's own argument)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-prompt-logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the prompt-logprob programs (requests may ask prompt_logprobs)")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "blockwise", "reference", "pallas"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compilation-cache-dir", default=DEFAULT_COMPILE_CACHE,
                   help="JAX's persistent compilation cache: a second start-up loads the "
                        "executables from here instead of compiling (default: %(default)s)")
    g.add_argument("--no-compilation-cache", dest="compilation_cache_dir", action="store_const",
                   const=None, help="no persistent compilation cache")
    return parser


def engine_args_from(args: argparse.Namespace, model: str | None = None) -> EngineArgs:
    return EngineArgs(
        model=model or args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_prompt_logprobs=args.enable_prompt_logprobs,
        tensor_parallel_size=args.tensor_parallel_size,
        attention_backend=args.attention_backend,
        seed=args.seed,
        compilation_cache_dir=args.compilation_cache_dir,
    )
