"""The on-device sampler: processed logits -> token ids (+ logprobs of the raw logits)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.sample.categorical import first_argmax, sample_from_logits
from jaxserve.sample.filters import filter_logits
from jaxserve.sample.logprobs import gather_logprobs, safe_log_softmax
from jaxserve.sample.metadata import GREEDY_TEMPERATURE_EPS, SamplingMetadata
from jaxserve.sample.processors import apply_logit_bias, apply_penalties


@dataclass(frozen=True)
class SamplerOutput:
    """Sampled ids, and (when asked) logprob rows: column 0 the chosen token, then the top-k."""

    token_ids: jax.Array  # i32[B]
    logprob_token_ids: jax.Array | None = None  # i32[B, 1+num_logprobs]
    logprobs: jax.Array | None = None  # f32[B, 1+num_logprobs]
    ranks: jax.Array | None = None  # i32[B, 1+num_logprobs]


jax.tree_util.register_dataclass(
    SamplerOutput, data_fields=[f.name for f in fields(SamplerOutput)], meta_fields=[]
)


def row_keys(md: SamplingMetadata) -> jax.Array:
    """One PRNG key per row.

    Seeded rows: fold_in(key(seed), output_index) (a seed >= 2**32 folds its high half in first),
    so their draws do not depend on the batch. Unseeded rows: fold_in(key(step_seed), row).
    One vectorised fold_in per level (two threefry hashes in all, not one per kind of row).
    """
    rows = jnp.arange(md.num_rows, dtype=jnp.uint32)
    seed_keys = jax.vmap(jax.random.key)(md.seed_lo)  # key[B]
    high = jax.vmap(jax.random.fold_in)(seed_keys, md.seed_hi)  # key[B]
    seed_data = jnp.where(
        (md.seed_hi == 0)[:, None], jax.random.key_data(seed_keys), jax.random.key_data(high)
    )  # u32[B, 2]
    step_data = jax.random.key_data(jax.random.key(md.step_seed))  # u32[2]
    base = jnp.where(md.has_seed[:, None], seed_data, step_data[None, :])  # u32[B, 2]
    index = jnp.where(md.has_seed, md.output_index.astype(jnp.uint32), rows)  # u32[B]
    return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(base), index)  # key[B]


def _random_sample(logits: jax.Array, md: SamplingMetadata, is_greedy: jax.Array) -> jax.Array:
    """Temperature, top-k, top-p, min-p, then one categorical draw with each row's key."""
    temperature = jnp.where(is_greedy, 1.0, md.temperature)  # [B]
    scaled = logits / temperature[:, None]  # [B, V]
    filtered = filter_logits(scaled, md.top_k, md.top_p, md.min_p)  # [B, V]
    return sample_from_logits(filtered, row_keys(md))  # [B]


def process_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Logit bias / banned ids, then penalties (as vLLM), for the parts md carries.

    logits: [B, V] -> f32 [B, V]. With neither part present this is the identity.
    """
    processed = logits.astype(jnp.float32)  # [B, V]
    if md.bias is not None:
        processed = apply_logit_bias(processed, md.bias)
    if md.penalties is not None:
        processed = apply_penalties(
            processed,
            md.penalties,
            md.repetition_penalty,
            md.frequency_penalty,
            md.presence_penalty,
        )
    return processed


def choose_tokens(processed: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Greedy rows take the exact argmax; random rows go through _random_sample (skipped
    entirely when every row is greedy). processed: f32 [B, V] -> i32 [B]."""
    greedy_ids = first_argmax(processed)  # [B]
    is_greedy = md.temperature < GREEDY_TEMPERATURE_EPS  # [B]
    return lax.cond(
        jnp.all(is_greedy),
        lambda: greedy_ids,
        lambda: jnp.where(is_greedy, greedy_ids, _random_sample(processed, md, is_greedy)),
    )


def _logprob_rows(logits: jax.Array, token_ids: jax.Array, num_logprobs: int):
    return gather_logprobs(safe_log_softmax(logits.astype(jnp.float32)), token_ids, num_logprobs)


def sample(logits: jax.Array, md: SamplingMetadata, *, num_logprobs: int) -> SamplerOutput:
    """Sample one token per row. Wrap as jax.jit(sample, static_argnames=("num_logprobs",)).

    logits: f32[B, V], the unmodified model logits. Order (as vLLM): logit bias / banned ids,
    penalties, then the choice (choose_tokens). num_logprobs >= 1 adds logprob rows computed
    from log_softmax of the unmodified logits; 0 leaves them None.
    """
    token_ids = choose_tokens(process_logits(logits, md), md)
    if num_logprobs <= 0:
        return SamplerOutput(token_ids=token_ids)
    ids, lps, ranks = _logprob_rows(logits, token_ids, num_logprobs)
    return SamplerOutput(token_ids=token_ids, logprob_token_ids=ids, logprobs=lps, ranks=ranks)


def sample_step(
    logits: jax.Array, processed: jax.Array, md: SamplingMetadata, *, num_logprobs: int
) -> SamplerOutput:
    """The serving sampler: one program per row count for every kind of request.

    logits: the unmodified logits f32 [B, V] (logprobs are taken from them); processed: the
    same after process_logits, or logits itself when no row uses bias / penalties (md carries
    neither part here). Logprob rows [B, 1 + num_logprobs] are always returned, computed only
    when md.want_logprobs (zeros otherwise), so asking for logprobs needs no other program.
    """
    token_ids = choose_tokens(processed.astype(jnp.float32), md)
    num_rows = logits.shape[0]

    def skipped(_logits, _ids):
        width = (num_rows, 1 + num_logprobs)
        zeros = jnp.zeros(width, jnp.int32)
        return zeros, jnp.zeros(width, jnp.float32), zeros

    ids, lps, ranks = lax.cond(
        md.want_logprobs,
        partial(_logprob_rows, num_logprobs=num_logprobs),
        skipped,
        logits,
        token_ids,
    )
    return SamplerOutput(token_ids=token_ids, logprob_token_ids=ids, logprobs=lps, ranks=ranks)


def prompt_logprobs(logits: jax.Array, target_ids: jax.Array, *, num_logprobs: int) -> SamplerOutput:
    """Logprob rows for given next tokens: logits f32[T, V], target_ids i32[T] (column 0).

    Same layout as sample(); num_logprobs may be 0 (only the target's logprob and rank).
    token_ids echoes target_ids. Wrap with jax.jit(static_argnames=("num_logprobs",)).
    """
    lp = safe_log_softmax(logits.astype(jnp.float32))  # [T, V]
    ids, lps, ranks = gather_logprobs(lp, target_ids, num_logprobs)
    return SamplerOutput(
        token_ids=target_ids.astype(jnp.int32), logprob_token_ids=ids, logprobs=lps, ranks=ranks
    )


sample_jit = jax.jit(sample, static_argnames=("num_logprobs",))
prompt_logprobs_jit = jax.jit(prompt_logprobs, static_argnames=("num_logprobs",))
