"""EngineArgs -> a warmed-up LLMEngine; and `LLM`, the offline batch API with vLLM's names."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from jaxserve.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

# JAX's persistent compilation cache (runtime/compile_cache.py); None turns it off.
DEFAULT_COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")
CPU_KV_CACHE_BYTES = 1 << 30  # the "modest default" KV cache on CPU: 1 GiB


@dataclass(frozen=True)
class EngineArgs:
    """Everything that configures an engine; the CLI and `LLM(...)` both fill this."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    attention_backend: str = "auto"  # auto | blockwise | reference | pallas
    enable_prompt_logprobs: bool = True  # off: fewer programs to compile at start-up
    compilation_cache_dir: str | None = DEFAULT_COMPILE_CACHE
    show_progress: bool = True


def _num_kv_blocks(args: EngineArgs, block_bytes: int, max_useful: int) -> int:
    """Blocks for the KV cache: the override, or a share of free device memory."""
    import jax

    if args.num_kv_blocks is not None:
        return args.num_kv_blocks
    if not 0.0 < args.kv_cache_memory_fraction <= 1.0:
        raise ValueError("kv_cache_memory_fraction: must be in (0, 1]")
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        # Leave room for activations of the largest step (not yet profiled: 10% margin).
        budget = int(free * args.kv_cache_memory_fraction * 0.9)
    else:
        budget = CPU_KV_CACHE_BYTES
    return max(2, min(budget // block_bytes, max_useful))


def create_engine(args: EngineArgs) -> LLMEngine:
    """Load the model and tokenizer, size the KV cache, compile every bucket.

    Python's cyclic garbage collector is paused meanwhile: start-up (tracing above all) makes
    many short-lived objects, and its collections cost ~15% of a warm start's CPU time.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _create_engine(args)
    finally:
        if gc_was_enabled:
            gc.enable()


def _create_engine(args: EngineArgs) -> LLMEngine:
    from transformers import AutoTokenizer

    from jaxserve.config import read_generation_eos
    from jaxserve.layers.attention import select_backend
    from jaxserve.runtime.compile_cache import use_compilation_cache
    from jaxserve.runtime.kv_cache import kv_block_bytes
    from jaxserve.runtime.mesh import make_mesh
    from jaxserve.runtime.model_runner import ModelRunner, RunnerConfig
    from jaxserve.weights.loader import load_model

    import jax

    use_compilation_cache(args.compilation_cache_dir)
    mesh = make_mesh(args.tensor_parallel_size)
    attn = select_backend(args.attention_backend)
    if attn.backend == "pallas" and args.tensor_parallel_size > 1:
        raise ValueError(
            "tensor_parallel_size: > 1 is not supported with the pallas attention backend yet "
            "(its kernels are not wrapped in shard_map); use --attention-backend blockwise"
        )
    loaded = load_model(args.model, args.dtype, attn, mesh)
    cfg = loaded.config
    on_cpu = jax.default_backend() == "cpu"
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    if max_model_len > cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    blocks_per_seq = -(-max_model_len // args.block_size)
    num_blocks = _num_kv_blocks(
        args, kv_block_bytes(cfg, args.block_size, loaded.dtype),
        max_useful=1 + blocks_per_seq * args.max_num_seqs,
    )
    if args.max_model_len is None and num_blocks - 1 < blocks_per_seq:
        max_model_len = (num_blocks - 1) * args.block_size  # capped by the cache
        logger.warning("max_model_len capped to %d by the KV cache size", max_model_len)
    max_batched = args.max_num_batched_tokens or (512 if on_cpu else 2048)
    engine_cfg = EngineConfig(
        num_kv_blocks=num_blocks,
        max_model_len=max_model_len,
        vocab_size=cfg.vocab_size,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_batched,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_prompt_logprobs=args.enable_prompt_logprobs,
        eos_token_ids=read_generation_eos(loaded.path, cfg),
    )
    runner = ModelRunner(
        loaded,
        RunnerConfig(
            block_size=args.block_size, num_kv_blocks=num_blocks, max_model_len=max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_batched, seed=args.seed,
            prompt_logprobs=args.enable_prompt_logprobs,
        ),
        mesh,
    )
    runner.warmup(progress=args.show_progress)
    tokenizer = AutoTokenizer.from_pretrained(loaded.path, trust_remote_code=False)
    logger.info(
        "engine ready: %d KV blocks of %d tokens, max_model_len %d, max_num_seqs %d, "
        "max_num_batched_tokens %d", num_blocks, args.block_size, max_model_len,
        args.max_num_seqs, max_batched,
    )
    return LLMEngine(runner, tokenizer, engine_cfg)


class LLM:
    """Offline generation: `LLM(model=...).generate(prompts, sampling_params)`."""

    def __init__(self, model: str, **kwargs: Any):
        kwargs.setdefault("show_progress", kwargs.pop("use_tqdm_on_load", True))
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.engine = create_engine(self.engine_args)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self):
        return self.engine.get_stats()

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = _broadcast_params(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, sp in zip(prompts, params):
                rid = f"gen-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, sp)  # raises ValueError naming the field
                ids.append(rid)
        except ValueError:
            self._abort_and_drain(ids)  # all-or-nothing: no half-submitted batch stays queued
            raise
        return self._run(ids, use_tqdm)

    def _abort_and_drain(self, ids: list[str]) -> None:
        self.engine.abort_request(ids)
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [_chat_prompt(tok, conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, unit="req")
        start, in_toks, out_toks = time.perf_counter(), 0, 0
        try:
            while len(final) < len(ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        in_toks += len(out.prompt_token_ids or [])
                        out_toks += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(
                            f"est. speed input: {in_toks / elapsed:.1f} toks/s, "
                            f"output: {out_toks / elapsed:.1f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            self._abort_and_drain([i for i in ids if i not in final])
            raise
        finally:
            bar.close()
        return [final[i] for i in ids]


def _chat_prompt(tok, conversation, add_generation_prompt: bool) -> dict:
    """One conversation -> {"prompt_token_ids", "prompt"} through the tokenizer's chat template.

    `return_dict=False`: transformers 5 otherwise returns a BatchEncoding for tokenize=True.
    """
    ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                  add_generation_prompt=add_generation_prompt)
    text = tok.apply_chat_template(conversation, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    return {"prompt_token_ids": [int(t) for t in ids], "prompt": text}


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    return list(prompts)


def _broadcast_params(sampling_params, n: int) -> Sequence[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(
            f"sampling_params: {len(params)} given for {n} prompts (give one, or one per prompt)"
        )
    return params
