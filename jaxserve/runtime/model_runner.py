"""ModelRunner: scheduled chunks -> packed inputs -> one jitted step -> sampled token ids."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.layers.attention import AttentionMetadata
from jaxserve.runtime.buckets import BucketSpec
from jaxserve.runtime.compile_counter import CompileCounter
from jaxserve.runtime.inputs import StepInputs, prepare_inputs
from jaxserve.runtime.kv_cache import allocate_kv_cache
from jaxserve.runtime.runner_output import LogprobsRow, ModelRunnerOutput
from jaxserve.runtime.sampling_rows import SamplerVariant, build_metadata, rows_for
from jaxserve.sample.sampler import prompt_logprobs, sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    """Shapes the runner compiles for; fixed at start-up."""

    block_size: int
    num_kv_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_logprobs: int = 20
    seed: int = 0


def _forward(graphdef, state, kv_cache, token_ids, md, logits_indices):
    """token_ids int32 [T] -> (logits f32 [S, vocab] at logits_indices, hidden [T, d], kv_cache)."""
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(token_ids, md, kv_cache)
    return model.compute_logits(hidden[logits_indices]), hidden, kv_cache


def _all_logits(graphdef, state, hidden):
    """hidden [T, d] -> f32 logits [T, vocab] (only for prompt logprobs)."""
    return nnx.merge(graphdef, state).compute_logits(hidden)


class ModelRunner:
    """Owns the parameters, the KV cache and the compiled steps; stateless about requests."""

    def __init__(self, loaded, cfg: RunnerConfig, mesh):
        CompileCounter.install()
        self.cfg = cfg
        self.model_config = loaded.config
        self.graphdef, self.state = nnx.split(loaded.model)
        self.kv_cache = allocate_kv_cache(
            loaded.config, cfg.num_kv_blocks, cfg.block_size, loaded.dtype, mesh
        )
        max_blocks = -(-cfg.max_model_len // cfg.block_size)
        self.buckets = BucketSpec.build(cfg.max_num_batched_tokens, cfg.max_num_seqs, max_blocks)
        self.penalty_len = 1 << (cfg.max_model_len - 1).bit_length()
        self._step = jax.jit(partial(_forward, self.graphdef), donate_argnums=(1,))
        self._all_logits = jax.jit(partial(_all_logits, self.graphdef))
        self._sample = jax.jit(sample, static_argnames=("num_logprobs",))
        self._prompt_lp = jax.jit(prompt_logprobs, static_argnames=("num_logprobs",))
        self._steps = 0

    @property
    def num_compilations(self) -> int:
        return CompileCounter.count

    # ------------------------------------------------------------------ one step
    def execute(self, scheduler_output) -> ModelRunnerOutput:
        chunks = scheduler_output.chunks
        out = ModelRunnerOutput()
        if not chunks:
            return out
        inp = prepare_inputs(chunks, self.cfg.block_size, self.buckets)
        logits, hidden = self._run_model(inp)
        self._steps += 1
        if any(c.sampling_params.prompt_logprobs is not None for c in chunks):
            self._collect_prompt_logprobs(chunks, inp, hidden, out)
        sampled_rows = [i for i, c in enumerate(chunks) if c.sample]
        if not sampled_rows:
            return out
        rows, variant = rows_for(chunks, self.cfg.max_logprobs)
        md = build_metadata(rows, len(inp.seq_lens), self._step_seed(), variant, self.penalty_len)
        result = self._sample(logits, md, num_logprobs=variant.num_logprobs)
        host = jax.device_get(result)  # the one device -> host transfer of the step
        for i in sampled_rows:
            c = chunks[i]
            out.sampled[c.request_id] = int(host.token_ids[i])
            k = c.sampling_params.logprobs
            if k is not None:
                out.logprobs[c.request_id] = LogprobsRow(
                    host.logprob_token_ids[i, : k + 1].tolist(),
                    host.logprobs[i, : k + 1].tolist(),
                    host.ranks[i, : k + 1].tolist(),
                )
        return out

    def _run_model(self, inp: StepInputs):
        md = AttentionMetadata(
            positions=jnp.asarray(inp.positions),
            slot_mapping=jnp.asarray(inp.slot_mapping),
            block_tables=jnp.asarray(inp.block_tables),
            seq_lens=jnp.asarray(inp.seq_lens),
            query_start_loc=jnp.asarray(inp.query_start_loc),
            max_query_len=1 if inp.decode_only else 0,
        )
        logits, hidden, self.kv_cache = self._step(
            self.state, self.kv_cache, jnp.asarray(inp.token_ids), md,
            jnp.asarray(inp.logits_indices),
        )
        return logits, hidden

    def _step_seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + self._steps) & 0xFFFFFFFF

    def _collect_prompt_logprobs(self, chunks, inp: StepInputs, hidden, out: ModelRunnerOutput):
        """Logprob of prompt token p + 1 at every prompt position p the step computed."""
        targets = np.zeros(len(inp.token_ids), np.int32)
        for i, c in enumerate(chunks):
            if c.sampling_params.prompt_logprobs is None:
                continue
            lo = int(inp.query_start_loc[i])
            for j in range(len(c.token_ids)):
                p = c.start_pos + j
                if p + 1 < len(c.prompt_token_ids):
                    targets[lo + j] = c.prompt_token_ids[p + 1]
        res = jax.device_get(
            self._prompt_lp(
                self._all_logits(self.state, hidden), jnp.asarray(targets),
                num_logprobs=self.cfg.max_logprobs,
            )
        )
        for i, c in enumerate(chunks):
            k = c.sampling_params.prompt_logprobs
            if k is None:
                continue
            lo = int(inp.query_start_loc[i])
            n = min(len(c.token_ids), len(c.prompt_token_ids) - 1 - c.start_pos)
            out.prompt_logprobs[c.request_id] = [
                LogprobsRow(
                    res.logprob_token_ids[lo + j, : k + 1].tolist(),
                    res.logprobs[lo + j, : k + 1].tolist(),
                    res.ranks[lo + j, : k + 1].tolist(),
                )
                for j in range(max(0, n))
            ]

    # ------------------------------------------------------------------ warm-up
    def warmup(self, progress: bool = True) -> float:
        """Compile every step shape and sampler variant now, so serving never compiles.

        The sampler and prompt-logprob functions are warmed on real step outputs, so their
        argument shardings are exactly those they will see when serving.
        """
        start = time.perf_counter()
        shapes = self.buckets.step_shapes()
        variants = SamplerVariant.all(self.cfg.max_logprobs)
        seq_sizes = sorted({s for _, s, _, _ in shapes})
        token_sizes = sorted({t for t, _, _, _ in shapes})
        bar = _progress(len(shapes) + len(seq_sizes) * len(variants) + len(token_sizes), progress)
        logits_by_rows, hidden_by_tokens = {}, {}
        for shape in shapes:
            logits, hidden = self._warm_step(shape)
            logits_by_rows[logits.shape[0]] = logits
            hidden_by_tokens[hidden.shape[0]] = hidden
            bar.update(1)
        for s in seq_sizes:
            for variant in variants:
                md = build_metadata([], s, 0, variant, self.penalty_len)
                out = self._sample(logits_by_rows[s], md, num_logprobs=variant.num_logprobs)
                jax.block_until_ready(out)
                bar.update(1)
        for t in token_sizes:
            logits = self._all_logits(self.state, hidden_by_tokens[t])
            targets = jnp.asarray(np.zeros(t, np.int32))
            jax.block_until_ready(
                self._prompt_lp(logits, targets, num_logprobs=self.cfg.max_logprobs)
            )
            bar.update(1)
        bar.close()
        took = time.perf_counter() - start
        logger.info("warm-up: %d shapes compiled or loaded from cache in %.1fs", bar.n, took)
        return took

    def _warm_step(self, shape):
        t, s, w, decode_only = shape
        qsl = np.zeros(s + 1, np.int32)
        qsl[1:] = np.minimum(np.arange(1, s + 1), t)  # one token per row, rest padding
        inp = StepInputs(
            np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.int32),
            np.zeros((s, w), np.int32), np.ones(s, np.int32), qsl, np.zeros(s, np.int32),
            s, t, decode_only,
        )
        return jax.block_until_ready(self._run_model(inp))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Compiling buckets", disable=not enabled, unit="shape")
