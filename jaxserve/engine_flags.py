"""Command-line flags of an engine (shared by `generate`, `demo` and `serve`) -> EngineArgs."""

from __future__ import annotations

import argparse

from jaxserve.engine import RequestLimits
from jaxserve.llm import DEFAULT_COMPILE_CACHE, EngineArgs

_LIMITS = RequestLimits()


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The EngineArgs fields as flags (the model itself is each command's own argument)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float", "bfloat16", "float16", "half"])
    g.add_argument("--quantization", "-q", default=None,
                   choices=["int8", "int4", "fp8", "w8a8", "compressed-tensors"],
                   help="quantize the decoder projections at load: int8 (W8A16, per channel), "
                        "int4 (W4A16, groups of 128), fp8 (e4m3 weights, per channel), w8a8 "
                        "(int8 weights and per-token int8 activations); a compressed-tensors "
                        "checkpoint loads quantized without it")
    g.add_argument("--quantize-lm-head", action="store_true",
                   help="with --quantization int8 / int4 / fp8 / w8a8: quantize the lm_head too "
                        "(tied embeddings: one quantized table, token lookups dequantize their "
                        "rows); fewer bytes read per decode step")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8", "fp8_e4m3"],
                   help="KV cache storage: auto (the model's dtype), int8 or fp8 (e4m3), each "
                        "with a float32 scale per token and kv head; about half of bf16's bytes")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None,
                   help="KV cache budget, e.g. 4GiB or 512MB (default on CPU: 4 GiB, at most "
                        "--kv-cache-memory-fraction of the available RAM)")
    g.add_argument("--kv-cache-memory-fraction", "--gpu-memory-utilization", type=float,
                   default=0.9, dest="kv_cache_memory_fraction",
                   help="share of free accelerator memory (or available RAM on CPU) the KV "
                        "cache may take (vLLM's name also works)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch each step before the last one's results are read, "
                        "overlapping the host's work with the device's (default: on, except with "
                        "speculative decoding or several processes)")
    g.add_argument("--enable-prompt-logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the prompt-logprob programs (requests may ask prompt_logprobs)")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--num-processes", type=int, default=1,
                   help="processes of one engine (jax.distributed); process 0 serves")
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0's jax.distributed coordinator")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "blockwise", "reference", "pallas"])
    g.add_argument("--cpu-matvec", default="auto", choices=["auto", "off"],
                   help="decode projections (bf16, int8 / int4 / fp8 weights) on the C++ CPU "
                        "kernels (auto) or XLA's matmul")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / prompt_logprobs one request may ask for")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--chat-template", default=None,
                   help="the chat template (a file, or the template itself) instead of the model's")
    g.add_argument("--generation-config", default="auto",
                   help="sampling defaults: 'auto' (the model's generation_config.json), "
                        "'vllm' (none), or a directory holding a generation_config.json")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="refused: jaxserve never runs code shipped with a checkpoint")
    g.add_argument("--enforce-eager", action="store_true",
                   help="accepted for vLLM compatibility; no effect (steps are always compiled)")
    g.add_argument("--speculative-config", default=None,
                   help='speculative decoding as JSON, vLLM\'s keys: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                        '"prompt_lookup_min": 2}\'')
    lim = parser.add_argument_group("per-request limits")
    lim.add_argument("--max-n-sequences", type=int, default=_LIMITS.max_n,
                     help="largest n / best_of of one request (vLLM: VLLM_MAX_N_SEQUENCES)")
    lim.add_argument("--max-stop-strings", type=int, default=_LIMITS.max_stop_strings)
    lim.add_argument("--max-stop-string-length", type=int, default=_LIMITS.max_stop_string_chars,
                     help="characters")
    lim.add_argument("--max-stop-token-ids", type=int, default=_LIMITS.max_stop_token_ids)
    g.add_argument("--compilation-cache-dir", default=DEFAULT_COMPILE_CACHE,
                   help="JAX's persistent compilation cache: a second start-up loads the "
                        "executables from here instead of compiling (default: %(default)s)")
    g.add_argument("--no-compilation-cache", dest="compilation_cache_dir", action="store_const",
                   const=None, help="no persistent compilation cache")
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
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        async_scheduling=args.async_scheduling,
        enable_prompt_logprobs=args.enable_prompt_logprobs,
        tensor_parallel_size=args.tensor_parallel_size,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_address=args.coordinator_address,
        attention_backend=args.attention_backend,
        cpu_matvec=args.cpu_matvec,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        generation_config=args.generation_config,
        trust_remote_code=args.trust_remote_code,
        enforce_eager=args.enforce_eager,
        speculative_config=args.speculative_config,
        request_limits=RequestLimits(
            max_n=args.max_n_sequences, max_stop_strings=args.max_stop_strings,
            max_stop_string_chars=args.max_stop_string_length,
            max_stop_token_ids=args.max_stop_token_ids,
        ),
        compilation_cache_dir=args.compilation_cache_dir,
    )
