"""ModelRunner: scheduled chunks -> packed inputs -> one jitted step -> sampled token ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.engine.scheduler_output import PLACEHOLDER_TOKEN_ID
from jaxserve.layers.attention import AttentionMetadata
from jaxserve.runtime.buckets import MIN_LOGIT_ROWS, MIN_SEQS, BucketSpec, decode_has_own_program
from jaxserve.runtime.compile_counter import CompileCounter
from jaxserve.runtime.executables import ExecutableTable, WarmupReport
from jaxserve.runtime.inputs import StepInputs, prepare_inputs
from jaxserve.runtime.kv_cache import allocate_kv_cache
from jaxserve.runtime.params import FlatParams
from jaxserve.runtime.runner_output import LogprobsRow, ModelRunnerOutput
from jaxserve.runtime.sampling_rows import build_metadata, rows_for
from jaxserve.runtime import draft_model, spec_decode
from jaxserve.sample.rejection import verify_step
from jaxserve.sample.processors import apply_token_bitmask
from jaxserve.sample.sampler import process_logits, prompt_logprobs, sample_step

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
    prompt_logprobs: bool = True  # compile the prompt-logprob programs
    num_speculative_tokens: int = 0  # > 0: steps score up to k + 1 positions per request
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 | fp8 (layers/kv_quant.py)


def _forward(graphdef, state, kv_cache, token_ids, md, logits_indices, prev_tokens, prev_rows):
    """token_ids int32 [T] -> (logits f32 [S, vocab] at logits_indices, hidden [T, d], kv_cache).

    Async scheduling: where prev_rows int32 [T] is >= 0 the token is prev_tokens[prev_rows],
    prev_tokens int32 [carry rows] being the previous step's sampled tokens, still on device."""
    token_ids = jnp.where(prev_rows >= 0, prev_tokens[jnp.maximum(prev_rows, 0)], token_ids)
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(token_ids, md, kv_cache)
    return model.compute_logits(hidden[logits_indices]), hidden, kv_cache


def _sample_and_carry(logits, chosen, md, *, num_logprobs, carry_rows):
    """The sampler, and its token ids padded to carry_rows int32 [carry_rows] (the shape every
    step program takes them in: the next step's placeholders read them on device)."""
    out = sample_step(logits, chosen, md, num_logprobs=num_logprobs)
    carry = jnp.zeros(carry_rows, jnp.int32).at[: out.token_ids.shape[0]].set(out.token_ids)
    return out, carry


def _process_with_placeholders(logits, md, prev_tokens, prev_rows):
    """process_logits, the penalty histories' placeholders (PLACEHOLDER_TOKEN_ID: a row's
    newest token, still in flight) first taking prev_tokens[prev_rows[row]].

    logits f32 [R, V]; prev_tokens int32 [carry rows]; prev_rows int32 [R] (-1: none)."""
    if md.penalties is not None:
        ids = md.penalties.token_ids  # [R, L]
        latest = prev_tokens[jnp.maximum(prev_rows, 0)][:, None]  # [R, 1]
        filled = jnp.where(ids == PLACEHOLDER_TOKEN_ID, latest, ids)
        md = replace(md, penalties=replace(md.penalties, token_ids=filled))
    return process_logits(logits, md)


@dataclass(frozen=True)
class StepHandle:
    """A launched step whose results are still on device (async scheduling)."""

    chunks: list
    inp: StepInputs
    result: Any  # SamplerOutput on device, None when no chunk samples
    carry: jax.Array | None  # int32 [carry rows]: the sampled tokens (the next step reads them)
    rows: dict[str, int]  # request id -> its sampler row, for the chunks that sample
    prompt_logprobs: Any  # the prompt-logprob program's output on device, or None


def _prompt_logprobs(graphdef, state, hidden, targets, *, num_logprobs):
    """hidden [T, d], targets int32 [T] -> logprob rows of each target (prompt logprobs)."""
    logits = nnx.merge(graphdef, state).compute_logits(hidden)  # [T, vocab]
    return prompt_logprobs(logits, targets, num_logprobs=num_logprobs)


class ModelRunner:
    """Owns the parameters, the KV cache and the compiled steps; stateless about requests."""

    def __init__(self, loaded, cfg: RunnerConfig, mesh, draft=None):
        """draft: a DraftModel (draft-model speculation; needs num_speculative_tokens == its k)."""
        CompileCounter.install()
        if draft is not None and draft.k != cfg.num_speculative_tokens:
            raise ValueError(f"draft model drafts {draft.k} tokens, the runner verifies "
                             f"{cfg.num_speculative_tokens}")
        self.draft = draft
        self.cfg = cfg
        self.model_config = loaded.config
        self.model_dtype = jnp.dtype(loaded.dtype)
        self.params = FlatParams(loaded.model)
        self.kv_cache = allocate_kv_cache(
            loaded.config, cfg.num_kv_blocks, cfg.block_size, loaded.dtype, mesh,
            cfg.kv_cache_dtype,
        )
        max_blocks = -(-cfg.max_model_len // cfg.block_size)
        # speculation: small prefill chunks and 2-request verification steps (2 (k + 1) <= 8
        # tokens) get an 8-token bucket; a lone verification step gets k + 1 (verify_tokens)
        min_tokens = 8 if 0 < cfg.num_speculative_tokens < 8 else 16
        # a lone request decodes in a 1-row step where the CPU kernel writes the KV cache (see
        # BucketSpec.seqs); with speculation its steps keep the 2-row minimum
        self.attention_backend = loaded.attention.backend
        one_row = self.attention_backend == "cpu" and cfg.num_speculative_tokens == 0
        self.buckets = BucketSpec.build(
            cfg.max_num_batched_tokens, cfg.max_num_seqs, max_blocks, min_tokens=min_tokens,
            bucket_widths=self.attention_backend == "reference",
            decode_programs=decode_has_own_program(self.attention_backend),
            min_seqs=1 if one_row else MIN_SEQS,
            verify_tokens=cfg.num_speculative_tokens + 1 if cfg.num_speculative_tokens else 0,
        )
        self.penalty_len = 1 << (cfg.max_model_len - 1).bit_length()
        # Logits and hidden states come out replicated (gathered over `tp`): the sampler and
        # prompt-logprob executables are compiled for exactly that sharding.
        self.replicated = NamedSharding(mesh, P())
        kv_shardings = jax.tree.map(lambda a: a.sharding, self.kv_cache)
        self._step = jax.jit(
            self.params.bind(_forward), donate_argnums=(1,),
            out_shardings=(self.replicated, self.replicated, kv_shardings),
        )
        self.spec_k = cfg.num_speculative_tokens
        # async scheduling: the sampled tokens reach the next step padded to one length
        self.carry_rows = max(self._logit_rows(t, s) for t, s, _, _ in self.buckets.step_shapes())
        self._no_carry = jax.device_put(np.zeros(self.carry_rows, np.int32), self.replicated)
        self._no_placeholders: dict[int, np.ndarray] = {}  # T -> int32 [T] of -1
        if self.spec_k:
            self._sample = jax.jit(verify_step, static_argnames=("num_logprobs",))
        else:
            self._sample = jax.jit(partial(_sample_and_carry, carry_rows=self.carry_rows),
                                   static_argnames=("num_logprobs",),
                                   out_shardings=self.replicated)
        self._process = jax.jit(_process_with_placeholders, out_shardings=self.replicated)
        self._mask = jax.jit(apply_token_bitmask, out_shardings=self.replicated)
        self.mask_words = (loaded.config.vocab_size + 31) // 32  # packed bitmask row width
        self._prompt_lp = jax.jit(
            self.params.bind(_prompt_logprobs), static_argnames=("num_logprobs",)
        )
        self.executables = ExecutableTable()
        self.warmup_report: WarmupReport | None = None  # set by warmup()
        self._steps = 0

    @property
    def state(self):
        """The parameters as an nnx.State (weight reports; the steps take params.leaves)."""
        return self.params.state

    @property
    def num_compilations(self) -> int:
        return CompileCounter.count

    # ------------------------------------------------------------------ one step
    def execute(self, scheduler_output) -> ModelRunnerOutput:
        if self.spec_k:
            return self._execute_speculative(scheduler_output.chunks)
        return self.collect(self.dispatch(scheduler_output, None))

    def dispatch(self, scheduler_output, previous: StepHandle | None) -> StepHandle:
        """Launch one step (no speculation) and return at once: its results stay on device
        until collect. previous: the step launched just before, not collected yet; its sampled
        tokens fill this step's placeholders on device (async scheduling)."""
        chunks = scheduler_output.chunks
        inp = prepare_inputs(chunks, self.cfg.block_size, self.buckets)
        sources = _placeholder_sources(chunks, previous)  # [S]
        prev_tokens = previous.carry if sources.max(initial=-1) >= 0 else self._no_carry
        logits, hidden = self._run_model(inp, (prev_tokens, self._token_rows(inp, sources)))
        self._steps += 1
        prompt_lp = None
        if any(c.sampling_params.prompt_logprobs is not None for c in chunks):
            prompt_lp = self._launch_prompt_logprobs(chunks, inp, hidden)
        rows = {c.request_id: i for i, c in enumerate(chunks) if c.sample}
        result = carry = None
        if rows:
            result, carry = self._sample_rows(chunks, logits, len(inp.logits_indices),
                                              placeholders=(prev_tokens, sources))
        return StepHandle(chunks, inp, result, carry, rows, prompt_lp)

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """Wait for a launched step and read its results (one transfer)."""
        out = ModelRunnerOutput()
        host, prompt_lp = jax.device_get((handle.result, handle.prompt_logprobs))
        if prompt_lp is not None:
            self._read_prompt_logprobs(handle.chunks, handle.inp, prompt_lp, out)
        for request_id, i in handle.rows.items():
            out.sampled[request_id] = int(host.token_ids[i])
            k = handle.chunks[i].sampling_params.logprobs
            if k is not None:
                out.logprobs[request_id] = LogprobsRow(
                    host.logprob_token_ids[i, : k + 1].tolist(),
                    host.logprobs[i, : k + 1].tolist(),
                    host.ranks[i, : k + 1].tolist(),
                )
        return out

    def _token_rows(self, inp: StepInputs, sources: np.ndarray) -> np.ndarray:
        """prev_rows int32 [T] of the step program: each placeholder token's row in the
        previous step's sampled tokens, -1 elsewhere (sources: see _placeholder_sources)."""
        placed = sources >= 0
        if not placed.any():
            return self.no_placeholders(len(inp.token_ids))[1]
        prev_rows = np.full(len(inp.token_ids), -1, np.int32)
        last = inp.query_start_loc[1 : len(sources) + 1] - 1  # each chunk's last token
        prev_rows[last[placed]] = sources[placed]
        return prev_rows

    def no_placeholders(self, num_tokens: int) -> tuple[jax.Array, np.ndarray]:
        """(prev_tokens, prev_rows) of a step of num_tokens tokens without placeholders."""
        rows = self._no_placeholders.get(num_tokens)
        if rows is None:
            rows = self._no_placeholders[num_tokens] = np.full(num_tokens, -1, np.int32)
        return self._no_carry, rows

    def _execute_speculative(self, chunks) -> ModelRunnerOutput:
        """One verification step: every scored position sampled, the drafts checked."""
        out = ModelRunnerOutput()
        if not chunks:
            return out
        inp = prepare_inputs(chunks, self.cfg.block_size, self.buckets)
        t, s = len(inp.token_ids), len(inp.seq_lens)
        layout = spec_decode.build_layout(chunks, inp.query_start_loc, self._logit_rows(t, s))
        inp = replace(inp, logits_indices=layout.logits_indices)
        q_rows = drafts = None
        if self.draft is not None:
            chunks, inp, layout, q_rows, drafts = self._run_draft(chunks, inp, layout)
        logits, hidden = self._run_model(inp, self.no_placeholders(t))
        self._steps += 1
        if any(c.sampling_params.prompt_logprobs is not None for c in chunks):
            lp = jax.device_get(self._launch_prompt_logprobs(chunks, inp, hidden))
            self._read_prompt_logprobs(chunks, inp, lp, out)
        if not any(c.sample for c in chunks):
            return out
        result = self._sample_rows(chunks, logits, len(layout.logits_indices), layout, q_rows)
        host, drafts = jax.device_get((result, drafts))  # the step's one transfer
        if drafts is not None:  # the drafts stayed on device until now
            chunks = draft_model.with_drafts(chunks, drafts)
        spec_decode.collect(host, chunks, layout, out)
        return out

    def _run_draft(self, chunks, inp: StepInputs, layout):
        """The draft model over this step's inputs, then its k drafts: (chunks, inputs, layout,
        q rows [R, V], drafts [S, k]), the inputs' tokens and the layout's draft ids the device
        arrays the proposal wrote. The drafts stay on device (None comes back for them once
        they are in the chunks) unless the host needs them before verification: penalties see
        the drafts as generated tokens and a grammar's masks follow them."""
        key = self.buckets.step_key(inp.shape_key)
        token_ids, md, _ = _step_arrays(inp, decode_only=key[3])
        s = len(inp.seq_lens)
        # the draft draws with temperature / top-k / top-p / min-p only: its q need not see
        # penalties or bias (any q keeps the output exact; closer to p accepts more)
        rows, processed = rows_for(chunks)
        smd = build_metadata(rows, s, self._step_seed(), False, self.penalty_len)
        smd = replace(smd, penalties=None, bias=None)
        drafts, q_rows, filled, draft_ids = self.draft.run(
            self.executables.get("draft", key), token_ids, md, layout, chunks, smd)
        inp = replace(inp, token_ids=filled)  # replicated, as the step takes its tokens
        layout = replace(layout, draft_ids=draft_ids)
        if processed or any(c.sample and c.grammar is not None for c in chunks):
            chunks = draft_model.with_drafts(chunks, np.asarray(jax.device_get(drafts)))
            drafts = None
        return chunks, inp, layout, q_rows, drafts

    def _sample_rows(self, chunks, logits, num_rows: int, layout=None, q_rows=None,
                     placeholders=None):
        """The sampler's output for one step, on device (logprob rows only when asked), and
        its tokens as the next step takes them (carry); with a speculative layout, the
        verifier's output alone: one row per scored position, checked against the drafts.
        placeholders: (prev_tokens, sources int32 [S], see _placeholder_sources) for the
        penalty histories (None: no row has a token in flight)."""
        rows, processed = rows_for(chunks)
        if layout is not None:
            rows = spec_decode.expand_rows(chunks, rows)
        md = build_metadata(rows, num_rows, self._step_seed(), processed, self.penalty_len)
        # computed on the host while the device step (dispatched asynchronously) runs
        bitmask = self._grammar_bitmask(chunks, num_rows, layout)
        chosen = logits
        if processed:  # bias / penalties: their own small program before the sampler
            prev_tokens, sources = placeholders or (self._no_carry, ())
            prev_rows = np.full(num_rows, -1, np.int32)  # sampler row -> its placeholder's
            prev_rows[: len(sources)] = sources
            chosen = self.executables.get("process", num_rows)(logits, md, prev_tokens, prev_rows)
            md = replace(md, penalties=None, bias=None)
        if bitmask is not None:  # structured outputs: one more small program
            chosen = self.executables.get("mask", num_rows)(chosen, bitmask)
        extra = (layout.draft_ids,) if layout is not None else ()
        if q_rows is not None:
            extra += (q_rows,)
        result = self.executables.get("sample", num_rows)(logits, chosen, md, *extra)
        if layout is not None:
            return result
        out, carry = result
        if not any(r.num_logprobs is not None for r in rows):
            out = replace(out, logprob_token_ids=None, logprobs=None, ranks=None)
        return out, carry

    def _grammar_bitmask(self, chunks, num_rows: int, layout=None) -> np.ndarray | None:
        """Packed allowed-token bitmask int32 [num_rows, ceil(vocab / 32)] of the rows that
        sample under a grammar (all ones elsewhere), or None when no chunk has one. With a
        speculative layout, a chunk's rows after the first get the masks after its drafts."""
        items = []
        for i, c in enumerate(chunks):
            if c.sample and c.grammar is not None:
                row = layout.row_start[i] if layout is not None else i
                items.append((c.grammar, row, list(c.spec_token_ids) if layout else []))
        if not items:
            return None
        bitmask = np.full((num_rows, self.mask_words), -1, np.int32)  # [R, W]
        items[0][0].backend.fill_bitmasks(items, bitmask)
        return bitmask

    def _run_model(self, inp: StepInputs, placeholders):
        """placeholders: (prev_tokens, prev_rows), see dispatch and _token_rows."""
        key = self.buckets.step_key(inp.shape_key)
        args = _step_arrays(inp, decode_only=key[3])
        step = self.executables.get("step", key)
        logits, hidden, self.kv_cache = step(
            self.params.leaves, self.kv_cache, *args, *placeholders)
        return logits, hidden

    def _step_seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + self._steps) & 0xFFFFFFFF

    def _launch_prompt_logprobs(self, chunks, inp: StepInputs, hidden):
        """Logprob rows of prompt token p + 1 at every prompt position p the step computed
        (launched; on device)."""
        targets = np.zeros(len(inp.token_ids), np.int32)
        for i, c in enumerate(chunks):
            if c.sampling_params.prompt_logprobs is None:
                continue
            lo = int(inp.query_start_loc[i])
            for j in range(len(c.token_ids)):
                p = c.start_pos + j
                if p + 1 < len(c.prompt_token_ids):
                    targets[lo + j] = c.prompt_token_ids[p + 1]
        run = self.executables.get("prompt_logprobs", len(targets))
        return run(self.params.leaves, hidden, targets)

    def _read_prompt_logprobs(self, chunks, inp: StepInputs, res, out: ModelRunnerOutput):
        """res: the prompt-logprob rows on the host."""
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
    def warmup(self, progress: bool = True) -> WarmupReport:
        """Compile every step, sampler, logits-processor and prompt-logprob shape ahead of time.

        The sampler and prompt-logprob inputs are described with the step's own output
        shardings, so they are exactly what serving will pass.
        """
        shapes = self.buckets.step_shapes()
        jobs = [("step", shape, partial(self._lower_step, shape)) for shape in shapes]
        vocab, d = self.model_config.vocab_size, self.model_config.hidden_size
        hidden_dtype = self.model_dtype  # the step's hidden states (prompt logprobs)
        for s in sorted({self._logit_rows(t, s) for t, s, _, _ in shapes}):
            logits = jax.ShapeDtypeStruct((s, vocab), jnp.float32, sharding=self.replicated)
            plain = build_metadata([], s, 0, False, self.penalty_len)
            extra = (jax.ShapeDtypeStruct((s,), jnp.int32),) if self.spec_k else ()
            if self.draft is not None:
                extra += (logits,)  # q rows: [R, V] f32, replicated like the logits
            jobs.append(("sample", s, partial(
                self._sample.lower, logits, logits, plain, *extra,
                num_logprobs=self.cfg.max_logprobs)))
            full = build_metadata([], s, 0, True, self.penalty_len)
            prev_tokens = jax.ShapeDtypeStruct((self.carry_rows,), jnp.int32,
                                               sharding=self.replicated)
            prev_rows = jax.ShapeDtypeStruct((s,), jnp.int32)
            jobs.append(("process", s, partial(self._process.lower, logits, full, prev_tokens,
                                               prev_rows)))
            bitmask = jax.ShapeDtypeStruct((s, self.mask_words), jnp.int32)
            jobs.append(("mask", s, partial(self._mask.lower, logits, bitmask)))
        if self.draft is not None:
            for shape in shapes:
                smd = build_metadata([], shape[1], 0, False, self.penalty_len)
                jobs.append(("draft", shape, partial(
                    self.draft.lower, shape, self._logit_rows(shape[0], shape[1]), smd)))
        for t in sorted({t for t, _, _, _ in shapes} if self.cfg.prompt_logprobs else ()):
            hidden = jax.ShapeDtypeStruct((t, d), hidden_dtype, sharding=self.replicated)
            targets = jax.ShapeDtypeStruct((t,), jnp.int32)
            jobs.append(("prompt_logprobs", t, partial(
                self._prompt_lp.lower, self.params.leaves, hidden, targets,
                num_logprobs=self.cfg.max_logprobs)))
        self.warmup_report = self.executables.compile_all(jobs, progress)
        return self.warmup_report

    def _lower_step(self, shape):
        t, s, _, _ = shape
        md = AttentionMetadata.abstract(*shape)
        tokens = jax.ShapeDtypeStruct((t,), jnp.int32)
        rows = jax.ShapeDtypeStruct((self._logit_rows(t, s),), jnp.int32)
        prev_tokens = jax.ShapeDtypeStruct((self.carry_rows,), jnp.int32,
                                           sharding=self.replicated)
        return self._step.lower(self.params.leaves, self.kv_cache, tokens, md, rows,
                                prev_tokens, tokens)

    def _logit_rows(self, t: int, s: int) -> int:
        return max(MIN_LOGIT_ROWS, spec_decode.logit_rows(t, s, self.spec_k))


def _placeholder_sources(chunks, previous: StepHandle | None) -> np.ndarray:
    """int32 [S]: for each chunk whose last token is a placeholder, the row of the previous
    step's sampler that samples it (-1 for the other chunks)."""
    sources = np.full(len(chunks), -1, np.int32)
    for i, c in enumerate(chunks):
        if c.token_ids[-1] != PLACEHOLDER_TOKEN_ID:
            continue
        row = previous.rows.get(c.request_id) if previous is not None else None
        if row is None:
            raise RuntimeError(f"{c.request_id!r}: a placeholder token, but the step launched "
                               "before samples nothing for it")
        sources[i] = row
    return sources


def _step_arrays(inp: StepInputs, decode_only: bool):
    """(token_ids, metadata, logits_indices) of one step as the step executable takes them;
    decode_only: whether that executable was compiled for decode-only steps (max_query_len 1)."""
    md = AttentionMetadata(
        positions=inp.positions,
        slot_mapping=inp.slot_mapping,
        block_tables=inp.block_tables,
        seq_lens=inp.seq_lens,
        query_start_loc=inp.query_start_loc,
        max_query_len=1 if decode_only else 0,
    )
    return inp.token_ids, md, inp.logits_indices
