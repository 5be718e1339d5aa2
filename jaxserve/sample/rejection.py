"""Exact rejection sampling of draft tokens (Leviathan et al. 2023; Chen et al. 2023), one row
per scored position: for a deterministic proposer (q one-hot on the draft token) and for a draft
model's own probabilities q."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.sample.categorical import first_argmax, sample_from_logits
from jaxserve.sample.filters import filter_logits
from jaxserve.sample.metadata import GREEDY_TEMPERATURE_EPS, SamplingMetadata
from jaxserve.sample.sampler import _logprob_rows, row_keys


@dataclass(frozen=True)
class VerifyOutput:
    """Per row: the sampled token (the recovered token of a draft row, a plain sample
    otherwise), whether the row's draft was accepted, and logprob rows of the emitted token
    (the draft where accepted, else token_ids) computed from the unmodified logits."""

    token_ids: jax.Array  # i32[R]
    accepted: jax.Array  # bool[R]; False on rows without a draft
    logprob_token_ids: jax.Array  # i32[R, 1+num_logprobs]
    logprobs: jax.Array  # f32[R, 1+num_logprobs]
    ranks: jax.Array  # i32[R, 1+num_logprobs]


jax.tree_util.register_dataclass(
    VerifyOutput, data_fields=[f.name for f in fields(VerifyOutput)], meta_fields=[]
)

# salt folded into a row's key for the acceptance uniform (the row key itself drives the
# categorical draw, exactly as in the plain sampler)
_ACCEPT_SALT = 0x5bec


def _random_verify(processed, md: SamplingMetadata, draft_ids, has_draft, is_greedy):
    """Random rows: p = softmax(filter(processed / T)); accept the draft x with probability
    p(x) (q is one-hot: min(1, p/q) = p(x)); the token is a draw from p with x removed and
    renormalised (the residual max(0, p - q) normalised), or from p on rows without a draft."""
    num_rows, vocab_size = processed.shape  # [R, V]
    temperature = jnp.where(is_greedy, 1.0, md.temperature)  # [R]
    filtered = filter_logits(processed / temperature[:, None], md.top_k, md.top_p, md.min_p)
    probs = jax.nn.softmax(filtered, axis=-1)  # [R, V]
    safe_draft = jnp.clip(draft_ids, 0, vocab_size - 1)  # [R]
    p_draft = jnp.take_along_axis(probs, safe_draft[:, None], axis=-1)[:, 0]  # [R]
    is_draft = (jnp.arange(vocab_size)[None, :] == safe_draft[:, None]) & has_draft[:, None]
    residual = jnp.where(is_draft, -jnp.inf, filtered)  # [R, V]
    residual_empty = jnp.all(residual == -jnp.inf, axis=-1)  # [R]: p(x) == 1
    keys = row_keys(md)  # key[R]
    accepted = (_accept_uniform(keys) < p_draft) | residual_empty  # [R]
    # rows whose residual is empty accept their draft: draw from p there only to stay finite
    token_ids = sample_from_logits(jnp.where(residual_empty[:, None], filtered, residual), keys)
    return token_ids, accepted


def _accept_uniform(keys):
    return jax.vmap(
        lambda k: jax.random.uniform(jax.random.fold_in(k, _ACCEPT_SALT), (), jnp.float32)
    )(keys)  # [R] in [0, 1)


def _random_verify_q(processed, md: SamplingMetadata, draft_ids, has_draft, is_greedy, q):
    """Random rows against a draft distribution q [R, V] (the probabilities the draft was drawn
    from): accept x with probability min(1, p(x) / q(x)); else draw from norm(max(0, p - q));
    rows without a draft draw from p."""
    vocab_size = processed.shape[1]
    temperature = jnp.where(is_greedy, 1.0, md.temperature)  # [R]
    filtered = filter_logits(processed / temperature[:, None], md.top_k, md.top_p, md.min_p)
    probs = jax.nn.softmax(filtered, axis=-1)  # [R, V]
    safe_draft = jnp.clip(draft_ids, 0, vocab_size - 1)  # [R]
    p_draft = jnp.take_along_axis(probs, safe_draft[:, None], axis=-1)[:, 0]  # [R]
    q_draft = jnp.take_along_axis(q, safe_draft[:, None], axis=-1)[:, 0]  # [R]
    residual = jnp.maximum(probs - q, 0.0)  # [R, V]
    residual_empty = jnp.all(residual <= 0.0, axis=-1)  # [R]: p == q, every draft is accepted
    residual_logits = jnp.where(residual > 0.0, jnp.log(residual), -jnp.inf)  # [R, V]
    keys = row_keys(md)  # key[R]
    ratio = jnp.where(q_draft > 0.0, p_draft / jnp.maximum(q_draft, 1e-30), 1.0)  # [R]
    accepted = (_accept_uniform(keys) < ratio) | residual_empty  # [R]
    use_residual = has_draft & ~residual_empty  # [R]
    token_ids = sample_from_logits(jnp.where(use_residual[:, None], residual_logits, filtered),
                                   keys)
    return token_ids, accepted


def verify_step(
    logits: jax.Array, processed: jax.Array, md: SamplingMetadata, draft_ids: jax.Array,
    q: jax.Array | None = None, *, num_logprobs: int,
) -> VerifyOutput:
    """Verify draft tokens, one row per scored position; wrap with
    jax.jit(verify_step, static_argnames=("num_logprobs",)).

    logits: unmodified f32 [R, V]; processed: the same after the row's bias / penalties (see
    process_logits), or logits itself; draft_ids: i32 [R], the draft token that followed the
    row's position, -1 on rows without one (the bonus position, plain decodes, prefills).
    q: f32 [R, V], the draft model's probabilities each row's draft was drawn from (None: a
    deterministic proposer, q one-hot on the draft).
    Greedy rows accept exactly when the draft is the argmax, whose token is that argmax. A row
    with no draft behaves as the plain sampler (same key, same draw).
    """
    processed = processed.astype(jnp.float32)  # [R, V]
    greedy_ids = first_argmax(processed)  # [R]
    is_greedy = md.temperature < GREEDY_TEMPERATURE_EPS  # [R]
    has_draft = draft_ids >= 0  # [R]

    def all_greedy():
        return greedy_ids, greedy_ids == draft_ids

    def mixed():
        if q is None:
            tokens, accepted = _random_verify(processed, md, draft_ids, has_draft, is_greedy)
        else:
            tokens, accepted = _random_verify_q(processed, md, draft_ids, has_draft, is_greedy,
                                                q.astype(jnp.float32))
        return (jnp.where(is_greedy, greedy_ids, tokens),
                jnp.where(is_greedy, greedy_ids == draft_ids, accepted))

    token_ids, accepted = lax.cond(jnp.all(is_greedy), all_greedy, mixed)
    accepted = accepted & has_draft
    emitted = jnp.where(accepted, draft_ids, token_ids)  # [R]
    num_rows = logits.shape[0]

    def skipped(_logits, _ids):
        width = (num_rows, 1 + num_logprobs)
        return jnp.zeros(width, jnp.int32), jnp.zeros(width, jnp.float32), jnp.zeros(width, jnp.int32)

    ids, lps, ranks = lax.cond(
        md.want_logprobs, partial(_logprob_rows, num_logprobs=num_logprobs), skipped,
        logits, emitted,
    )
    return VerifyOutput(token_ids=token_ids, accepted=accepted, logprob_token_ids=ids,
                        logprobs=lps, ranks=ranks)
