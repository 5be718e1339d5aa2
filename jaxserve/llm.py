"""EngineArgs -> a warmed-up LLMEngine; and `LLM`, the offline batch API with vLLM's names."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from jaxserve.engine import (
    EngineConfig,
    LLMEngine,
    RequestLimits,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger(__name__)

# JAX's persistent compilation cache (runtime/compile_cache.py); None turns it off.
DEFAULT_COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")
# KV cache on CPU when no budget is given: vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE=4 GiB),
# never more than kv_cache_memory_fraction of the RAM available at start-up.
CPU_KV_CACHE_BYTES = 4 << 30


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
    kv_cache_memory_bytes: int | None = None  # KV cache budget (all layers, K and V)
    kv_cache_memory_fraction: float = 0.9  # of free accelerator memory / available RAM on CPU
    enable_prefix_caching: bool = True
    # launch step N + 1 before reading step N's results (vLLM's --async-scheduling); None:
    # on unless speculative decoding or several processes rule it out (as vLLM >= 0.14)
    async_scheduling: bool | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    attention_backend: str = "auto"  # auto | cpu | blockwise | reference | pallas
    # several processes (jax.distributed's names): process 0 serves, the others follow
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None  # host:port of process 0's coordinator
    cpu_matvec: str = "auto"  # auto | off: decode projections on the C++ CPU kernel
    enable_prompt_logprobs: bool = True  # off: fewer programs to compile at start-up
    compilation_cache_dir: str | None = DEFAULT_COMPILE_CACHE
    show_progress: bool = True
    request_limits: RequestLimits = RequestLimits()  # bounds on n, stop lists (per request)
    # vLLM's names
    max_logprobs: int = 20  # logprobs / prompt_logprobs a request may ask for
    tokenizer: str | None = None  # tokenizer directory (default: the model's)
    chat_template: str | None = None  # a Jinja template, or a file holding one
    generation_config: str = "auto"  # auto | vllm | a directory with generation_config.json
    trust_remote_code: bool = False  # True is refused: checkpoint code is never run
    enforce_eager: bool = False  # no effect: every step is a compiled XLA program
    quantization: str | None = None  # int8 | int4 | fp8 | w8a8 (PTQ at load) | compressed-tensors
    quantize_lm_head: bool = False  # the lm_head too, same method (needs an at-load method)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 | fp8 (layers/kv_quant.py)
    # speculative decoding: {"method": "ngram", "num_speculative_tokens": k,
    # "prompt_lookup_max": N, "prompt_lookup_min": M, "disable_by_acceptance": 0.1,
    # "disable_by_batch_size": None} (a dict, or the same as JSON)
    speculative_config: Any = None

    def __post_init__(self) -> None:
        if self.trust_remote_code:
            raise ValueError(
                "trust_remote_code: jaxserve never runs code shipped with a checkpoint; it "
                "serves only the architectures it implements (leave trust_remote_code False)"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1 (leave it unset for the model's "
                             f"maximum), got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks: must be >= 2 (block 0 is reserved), got "
                             f"{self.num_kv_blocks}")
        if self.quantization not in (None, "int8", "int4", "fp8", "w8a8", "compressed-tensors"):
            raise ValueError(f"quantization: unknown method {self.quantization!r}; supported: "
                             "int8, int4, fp8, w8a8 (at load), compressed-tensors (pre-quantized)")
        if self.quantize_lm_head:
            from jaxserve.weights.quant_loading import check_lm_head_request

            check_lm_head_request(self.quantization)
        from jaxserve.layers.kv_quant import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        from jaxserve.engine.spec_config import parse_speculative_config

        object.__setattr__(self, "speculative_config",
                           parse_speculative_config(self.speculative_config))
        if self.async_scheduling and self.async_scheduling_unsupported:
            raise ValueError(f"async_scheduling: not supported with "
                             f"{self.async_scheduling_unsupported}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs: must be an int >= 0, got {self.max_logprobs!r}")

    @property
    def async_scheduling_unsupported(self) -> str | None:
        """What rules async scheduling out, or None."""
        if self.speculative_config is not None:
            return ("speculative decoding (its drafts are proposed from the tokens of the step "
                    "before)")
        if self.num_processes > 1:
            return "num_processes > 1 (the followers replay each step as it is scheduled)"
        return None

    def resolved_async_scheduling(self) -> bool:
        """async_scheduling, None resolved: on where supported (logged when it is not)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        reason = self.async_scheduling_unsupported
        if reason is not None:
            logger.info("async scheduling is off: not supported with %s", reason)
        return reason is None


def _available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), or total physical RAM where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _kv_budget(args: EngineArgs) -> tuple[int, str]:
    """(KV cache budget in bytes, how it was chosen) from the flags and the device's memory."""
    import jax

    if not 0.0 < args.kv_cache_memory_fraction <= 1.0:
        raise ValueError("kv_cache_memory_fraction: must be in (0, 1]")
    if args.kv_cache_memory_bytes is not None:
        if args.kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes: must be > 0, got {args.kv_cache_memory_bytes}"
            )
        return args.kv_cache_memory_bytes, "kv_cache_memory_bytes"
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        # Leave room for activations of the largest step (not yet profiled: 10% margin).
        frac = args.kv_cache_memory_fraction
        return int(free * frac * 0.9), f"{frac:g} of free device memory, less 10%"
    cap = int(_available_ram() * args.kv_cache_memory_fraction)
    if cap < CPU_KV_CACHE_BYTES:
        return cap, f"{args.kv_cache_memory_fraction:g} of available RAM"
    return CPU_KV_CACHE_BYTES, "CPU default; set kv_cache_memory_bytes to change"


def _num_kv_blocks(args: EngineArgs, block_bytes: int, max_useful: int) -> int:
    """Blocks for the KV cache: the override, or the budget / bytes per block; logged."""
    if args.num_kv_blocks is not None:
        blocks, how = args.num_kv_blocks, "num_kv_blocks"
    else:
        budget, how = _kv_budget(args)
        blocks = max(2, min(budget // block_bytes, max_useful))
        if blocks == max_useful:
            how += f"; capped at {max_useful} blocks: max_num_seqs x max_model_len"
        how = f"budget {budget / (1 << 30):.2f} GiB ({how})"
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB, %d bytes per block, "
        "kv_cache_dtype %s (%s)", blocks, args.block_size, (blocks - 1) * args.block_size,
        blocks * block_bytes / (1 << 30), block_bytes, args.kv_cache_dtype, how,
    )
    return blocks


def create_engine(args: EngineArgs) -> LLMEngine | None:
    """Load the model and tokenizer, size the KV cache, compile every bucket.

    With num_processes > 1, a follower (process_id > 0) then replays process 0's steps until
    process 0 stops, and returns None.

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
    from jaxserve.config import read_generation_eos
    from jaxserve.layers.attention import (
        backend_request,
        check_kv_backend,
        check_pallas_supported,
        select_backend,
    )
    from jaxserve.layers.linear import select_cpu_matvec
    from jaxserve.runtime.compile_cache import use_compilation_cache
    from jaxserve.runtime.draft_model import DraftModel
    from jaxserve.runtime.kv_cache import kv_block_bytes
    from jaxserve.runtime.mesh import make_mesh
    from jaxserve.runtime.model_runner import ModelRunner, RunnerConfig
    from jaxserve.runtime.sampling_rows import BIAS_WIDTH
    from jaxserve.weights.loader import load_model

    import jax

    from jaxserve.runtime import distributed

    dist = distributed.DistributedConfig(args.num_processes, args.process_id,
                                         args.coordinator_address)
    distributed.initialize(dist)  # before any backend is touched
    use_compilation_cache(args.compilation_cache_dir)
    if args.enforce_eager:
        logger.warning("enforce_eager has no effect: jaxserve always runs compiled XLA steps")
    mesh = make_mesh(args.tensor_parallel_size)
    attn = select_backend(backend_request(args.attention_backend, args.kv_cache_dtype),
                          args.tensor_parallel_size)
    if attn.backend == "pallas" and args.tensor_parallel_size > 1:
        attn = dataclasses.replace(attn, mesh=mesh)  # the kernels run under shard_map
    check_kv_backend(attn.backend, args.kv_cache_dtype)
    matvec = select_cpu_matvec(args.cpu_matvec, args.tensor_parallel_size)
    loaded = load_model(args.model, args.dtype, attn, mesh, quantization=args.quantization,
                        cpu_matvec=matvec, quantize_lm_head=args.quantize_lm_head)
    cfg = loaded.config
    check_pallas_supported(
        attn, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        block_size=args.block_size, dtype=loaded.dtype, tp=args.tensor_parallel_size)
    on_cpu = jax.default_backend() == "cpu"
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    if max_model_len > cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    blocks_per_seq = -(-max_model_len // args.block_size)
    draft_loaded = _load_draft(args, loaded, attn, mesh, max_model_len, matvec)
    block_bytes = kv_block_bytes(cfg, args.block_size, loaded.dtype, args.kv_cache_dtype)
    if draft_loaded is not None:  # (the draft's own cache stays in its model dtype)  # the draft's cache has as many blocks: budget both
        block_bytes += kv_block_bytes(draft_loaded.config, args.block_size, draft_loaded.dtype)
    num_blocks = _num_kv_blocks(
        args, block_bytes, max_useful=1 + blocks_per_seq * args.max_num_seqs,
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
        limits=dataclasses.replace(args.request_limits, max_logprobs=args.max_logprobs),
        max_biased_token_ids=BIAS_WIDTH,
        generation_defaults=_generation_defaults(args, loaded.path),
        speculative=args.speculative_config,
        async_scheduling=args.resolved_async_scheduling(),
    )
    runner = ModelRunner(
        loaded,
        RunnerConfig(
            block_size=args.block_size, num_kv_blocks=num_blocks, max_model_len=max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_batched, seed=args.seed,
            max_logprobs=args.max_logprobs,
            prompt_logprobs=args.enable_prompt_logprobs,
            kv_cache_dtype=args.kv_cache_dtype,
            num_speculative_tokens=(args.speculative_config.num_speculative_tokens
                                    if args.speculative_config else 0),
        ),
        mesh,
        draft=(None if draft_loaded is None else DraftModel(
            draft_loaded, num_blocks, args.block_size,
            args.speculative_config.num_speculative_tokens, mesh)),
    )
    runner.warmup(progress=args.show_progress)
    if dist.is_follower:
        logger.info("process %d follows process 0's steps", dist.process_id)
        distributed.follow(runner, distributed.start_watchdog(dist))
        return None
    if dist.enabled:
        import atexit

        runner = distributed.LeaderRunner(runner, distributed.start_watchdog(dist))
        atexit.register(runner.stop_followers)  # before jax.distributed's own shutdown
    tokenizer = load_tokenizer(args, loaded.path)
    logger.info(
        "engine ready: %d KV blocks of %d tokens, max_model_len %d, max_num_seqs %d, "
        "max_num_batched_tokens %d", num_blocks, args.block_size, max_model_len,
        args.max_num_seqs, max_batched,
    )
    return LLMEngine(runner, tokenizer, engine_cfg)


def _load_draft(args: EngineArgs, loaded, attn, mesh, max_model_len: int, matvec: bool):
    """The draft model of draft_model speculation (None otherwise), checked against the
    target: same vocabulary size and, where both ship one, the same tokenizer."""
    spec = args.speculative_config
    if spec is None or spec.method != "draft_model":
        return None
    from transformers import AutoTokenizer

    from jaxserve.runtime.draft_model import check_draft_compatible
    from jaxserve.weights.loader import load_model, read_model_config, resolve_model_path

    draft_path = resolve_model_path(spec.model)
    draft_cfg = read_model_config(draft_path)  # refuse a mismatch before loading weights

    def vocab(path):
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False).get_vocab()
        except (OSError, ValueError):
            logger.info("no tokenizer in %s: the draft is checked by vocab_size only", path)
            return None

    target_tok = args.tokenizer and resolve_model_path(args.tokenizer) or loaded.path
    check_draft_compatible(loaded.config, draft_cfg, max_model_len, vocab(target_tok),
                           vocab(draft_path))
    draft = load_model(draft_path, args.dtype, attn, mesh, cpu_matvec=matvec)  # its kernels too
    logger.info("draft model %s: %d layers, hidden %d, %d speculative tokens", draft_path,
                draft.config.num_layers, draft.config.hidden_size, spec.num_speculative_tokens)
    return draft


def _generation_defaults(args: EngineArgs, model_path: str) -> dict:
    from jaxserve.config import read_generation_defaults

    defaults = read_generation_defaults(model_path, args.generation_config)
    SamplingParams(**defaults)  # a bad generation_config.json fails at start, naming the field
    if defaults:
        logger.info("default sampling parameters from generation_config.json (override per "
                    "request; --generation-config vllm to ignore): %s", defaults)
    return defaults


def load_tokenizer(args: EngineArgs, model_path: str):
    """The tokenizer (args.tokenizer or the model's), with args.chat_template when given."""
    from transformers import AutoTokenizer

    from jaxserve.weights.loader import resolve_model_path

    path = resolve_model_path(args.tokenizer) if args.tokenizer else model_path
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if args.chat_template is not None:
        tokenizer.chat_template = read_chat_template(args.chat_template)
    return tokenizer


def read_chat_template(template: str) -> str:
    """A template given inline, or the contents of the file it names (as vLLM's flag)."""
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    if "{" not in template:  # neither a file nor Jinja: most likely a mistyped path
        raise ValueError(f"chat_template: {template!r} is not a file nor a Jinja template")
    return template


class LLM:
    """Offline generation: `LLM(model=...).generate(prompts, sampling_params)`."""

    def __init__(self, model: str, **kwargs: Any):
        kwargs.setdefault("show_progress", kwargs.pop("use_tqdm_on_load", True))
        if "gpu_memory_utilization" in kwargs:  # vLLM's name for the memory share we may use
            kwargs["kv_cache_memory_fraction"] = kwargs.pop("gpu_memory_utilization")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.engine = create_engine(self.engine_args)  # None: a follower process, done
        self._counter = 0

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's name: SamplingParams with the model's generation_config.json defaults."""
        return SamplingParams(**self.engine.config.generation_defaults)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self):
        return self.engine.get_stats()

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        if self.engine is None:
            raise RuntimeError(f"process {self.engine_args.process_id} followed process 0 "
                               "until it stopped: generate on process 0")
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
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
             add_generation_prompt: bool = True, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations.

        `chat_template` (vLLM's name): the caller's own template, instead of the model's;
        `tools` (OpenAI's function tools) are passed to the template.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        kwargs = dict(chat_template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        if chat_template is not None:
            kwargs["chat_template"] = read_chat_template(chat_template)
        prompts = [_chat_prompt(tok, conv, add_generation_prompt, **kwargs)
                   for conv in conversations]
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


def _chat_prompt(tok, conversation, add_generation_prompt: bool, **template_kwargs) -> dict:
    """One conversation -> {"prompt_token_ids", "prompt"} through the tokenizer's chat template.

    `return_dict=False`: transformers 5 otherwise returns a BatchEncoding for tokenize=True.
    """
    _check_messages(conversation)
    ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                  add_generation_prompt=add_generation_prompt, **template_kwargs)
    text = tok.apply_chat_template(conversation, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **template_kwargs)
    return {"prompt_token_ids": [int(t) for t in ids], "prompt": text}


def _check_messages(conversation) -> None:
    """Each message a dict with a str role and content (a str or text parts), valid Unicode."""
    from jaxserve.engine.errors import InvalidRequestError, require_utf8

    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise InvalidRequestError("messages", f"message {i} is not a dict")
        where = f"messages[{i}]"
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"{where}.role", "must be a string")
        content = message.get("content")
        texts = [content] if isinstance(content, str) else None
        if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content):
            texts = [p["text"] for p in content]
        if texts is None:
            raise InvalidRequestError(f"{where}.content",
                                      "must be a string or a list of text parts")
        for text in [message["role"], *texts]:
            require_utf8(f"{where}.content", text)


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
