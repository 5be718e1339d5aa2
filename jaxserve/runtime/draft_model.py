"""Draft-model proposer on device: the draft's own paged KV cache under the target's block
tables, a pass over the target's step inputs, then up to k one-token draft steps (as many as
the step's most drafts) drawing from q."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.layers.attention import AttentionMetadata
from jaxserve.runtime.kv_cache import allocate_kv_cache
from jaxserve.runtime.params import FlatParams
from jaxserve.sample.categorical import first_argmax, sample_from_logits
from jaxserve.sample.filters import filter_logits
from jaxserve.sample.metadata import GREEDY_TEMPERATURE_EPS, SamplingMetadata
from jaxserve.sample.sampler import row_keys

# folded into a request's key for its j-th draft draw (distinct from the verifier's salts)
_DRAFT_SALT = 0xD4AF0000


def check_draft_compatible(target_cfg, draft_cfg, max_model_len: int, target_vocab=None,
                           draft_vocab=None) -> None:
    """Refuse a draft whose vocabulary (size, or token -> id map when both have a tokenizer)
    differs from the target's, or that cannot reach max_model_len."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"speculative_config.model: the draft's vocab_size {draft_cfg.vocab_size} differs "
            f"from the target's {target_cfg.vocab_size}; a draft model must share the "
            "target's tokenizer and vocabulary")
    if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
        diff = sum(target_vocab.get(t) != draft_vocab.get(t)
                   for t in set(target_vocab) | set(draft_vocab))
        raise ValueError(
            f"speculative_config.model: the draft's tokenizer differs from the target's "
            f"({diff} tokens with another id or missing); a draft model must share the target's "
            "tokenizer")
    if draft_cfg.max_position_embeddings < max_model_len:
        raise ValueError(
            f"speculative_config.model: the draft's max_position_embeddings "
            f"{draft_cfg.max_position_embeddings} is below max_model_len {max_model_len}")


def _draw(logits, smd: SamplingMetadata, keys):
    """logits f32 [S, V] -> (token i32 [S], q f32 [S, V]): greedy rows take the argmax (q one-hot
    on it), the others draw from softmax(filter(logits / T)) (q that distribution)."""
    vocab = logits.shape[1]
    is_greedy = smd.temperature < GREEDY_TEMPERATURE_EPS  # [S]
    greedy_ids = first_argmax(logits)  # [S]
    one_hot = jax.nn.one_hot(greedy_ids, vocab, dtype=jnp.float32)  # [S, V]

    def random():
        temperature = jnp.where(is_greedy, 1.0, smd.temperature)  # [S]
        filtered = filter_logits(logits / temperature[:, None], smd.top_k, smd.top_p, smd.min_p)
        sampled = sample_from_logits(filtered, keys)  # [S]
        return (jnp.where(is_greedy, greedy_ids, sampled),
                jnp.where(is_greedy[:, None], one_hot, jax.nn.softmax(filtered, axis=-1)))

    return jax.lax.cond(jnp.all(is_greedy), lambda: (greedy_ids, one_hot), random)


def _propose(graphdef, state, kv_cache, token_ids, md, last_idx, num_drafts, row_start, smd,
             *, k: int, num_rows: int, block_size: int, vocab_size: int):
    """One draft proposal pass.

    token_ids i32 [T] (the target's step tokens; draft slots hold placeholders), md the target's
    AttentionMetadata; last_idx i32 [S]: each request's last real token on the token axis;
    num_drafts i32 [S]: lookahead slots the scheduler reserved (0 for prefill / padding, and
    for decodes the scheduler's gate kept from drafting); row_start i32 [S]: the request's
    first logit row of the verification step; smd: sampling metadata of [S] rows. Returns
    drafts i32 [S, k] (column j meaningful where j < num_drafts), q f32 [num_rows, V] (row
    row_start + j holds the distribution of draft j), the target's step tokens with the drafts
    in place of the placeholders i32 [T], each logit row's draft i32 [num_rows] (-1 on rows
    without one, as SpecLayout.draft_ids) and the draft's KV cache: the verification step can
    run on the drafts without a round trip through the host.

    Draft step j runs only when j < max(num_drafts) (none when no request drafts, e.g. the
    scheduler's gate paused them all): each of the k unrolled steps sits under a lax.cond, so
    one executable per bucket serves every draft count. (A fori_loop over max(num_drafts) was
    5-10% slower than unrolled steps at full k on CPU; the conds cost nothing measurable.)
    """
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(jnp.maximum(token_ids, 0), md, kv_cache)  # writes the chunk's KV
    num_seqs = last_idx.shape[0]
    base = md.positions[last_idx]  # [S]: position of the last real token
    keys = row_keys(smd)  # key[S]
    rows = jnp.arange(num_seqs + 1, dtype=jnp.int32)  # query_start_loc of one token per row

    def draft_step(j: int, carry):
        last_hidden, kv_cache, drafts, q_rows = carry  # [S, d], ..., [S, k], [R, V]
        logits = model.compute_logits(last_hidden).astype(jnp.float32)  # [S, V]
        keys_j = jax.vmap(lambda key: jax.random.fold_in(key, _DRAFT_SALT + j))(keys)
        token, q = _draw(logits, smd, keys_j)  # [S], [S, V]
        live = j < num_drafts  # [S]: draft j exists (its slot is reserved)
        q_rows = q_rows.at[jnp.where(live, row_start + j, num_rows)].set(q, mode="drop")
        drafts = drafts.at[:, j].set(token)
        # the draft's own step on draft j at position base + j + 1: its KV is needed when the
        # target accepts it; rows without that slot run on the null block (slot 0)
        pos = jnp.where(live, base + j + 1, 0)  # [S]
        tables = jnp.where(live[:, None], md.block_tables, 0)  # [S, W]
        block = jnp.take_along_axis(tables, (pos // block_size)[:, None], axis=1)[:, 0]
        step_md = AttentionMetadata(
            positions=pos, slot_mapping=block * block_size + pos % block_size,
            block_tables=tables, seq_lens=pos + 1, query_start_loc=rows, max_query_len=1)
        last_hidden, kv_cache = model(jnp.where(live, token, 0), step_md, kv_cache)
        return last_hidden, kv_cache, drafts, q_rows

    carry = (hidden[last_idx], kv_cache, jnp.zeros((num_seqs, k), jnp.int32),
             jnp.zeros((num_rows, vocab_size), jnp.float32))
    num_steps = jnp.max(num_drafts)  # the step's most drafts
    for j in range(k):
        carry = jax.lax.cond(j < num_steps, partial(draft_step, j), lambda c: c, carry)
    _, kv_cache, drafts, q_rows = carry
    j = jnp.arange(k, dtype=jnp.int32)[None, :]  # [1, k]
    live = j < num_drafts[:, None]  # [S, k]
    # draft j of request i replaces placeholder j of the last num_drafts[i] tokens of its chunk
    slots = jnp.where(live, md.query_start_loc[1:, None] - num_drafts[:, None] + j,
                      token_ids.shape[0])  # [S, k]
    filled = token_ids.at[slots.ravel()].set(drafts.ravel(), mode="drop")  # [T]
    rows = jnp.where(live, row_start[:, None] + j, num_rows)  # [S, k]
    draft_ids = jnp.full((num_rows,), -1, jnp.int32).at[rows.ravel()].set(
        drafts.ravel(), mode="drop")  # [R]
    return drafts, q_rows, filled, draft_ids, kv_cache


class DraftModel:
    """The draft model's parameters, its KV cache (same block count and block size as the
    target's, indexed by the same block tables) and its compiled proposal step per bucket."""

    def __init__(self, loaded, num_kv_blocks: int, block_size: int, k: int, mesh):
        self.config = loaded.config
        self.k = k
        self.block_size = block_size
        self.params = FlatParams(loaded.model)
        self.kv_cache = allocate_kv_cache(loaded.config, num_kv_blocks, block_size,
                                          loaded.dtype, mesh)
        kv_shardings = jax.tree.map(lambda a: a.sharding, self.kv_cache)
        replicated = NamedSharding(mesh, P())
        self._propose = jax.jit(
            partial(self.params.bind(_propose), k=k, block_size=block_size,
                    vocab_size=loaded.config.vocab_size),
            donate_argnums=(1,), static_argnames=("num_rows",),
            out_shardings=(replicated, replicated, replicated, replicated, kv_shardings))

    def lower(self, shape, num_rows: int, smd: SamplingMetadata):
        """Lowered proposal step for step shape (t, s, w, decode_only)."""
        t, s, _, _ = shape
        md = AttentionMetadata.abstract(*shape)
        vec = jax.ShapeDtypeStruct((s,), jnp.int32)
        tokens = jax.ShapeDtypeStruct((t,), jnp.int32)
        return self._propose.lower(self.params.leaves, self.kv_cache, tokens, md, vec, vec, vec,
                                   smd, num_rows=num_rows)

    def run(self, executable, token_ids, md, layout, chunks, smd):
        """One proposal pass, left on device: drafts [S, k], q rows [R, V], the step's tokens
        with the drafts in place [T] and each logit row's draft [R] (see _propose)."""
        s = md.seq_lens.shape[0]
        last_idx = np.zeros(s, np.int32)
        num_drafts = np.zeros(s, np.int32)
        row_start = np.zeros(s, np.int32)
        for i, c in enumerate(chunks):
            d = len(c.spec_token_ids)
            last_idx[i] = layout.logits_indices[layout.row_start[i]]
            num_drafts[i] = d
            row_start[i] = layout.row_start[i]
        drafts, q_rows, filled, draft_ids, self.kv_cache = executable(
            self.params.leaves, self.kv_cache, token_ids, md, last_idx, num_drafts, row_start, smd)
        return drafts, q_rows, filled, draft_ids


def with_drafts(chunks, drafts: np.ndarray):
    """The chunks with their drafts (host, [S, k]) in place of the placeholders (new objects;
    the arguments are left as they are)."""
    out = []
    for i, c in enumerate(chunks):
        d = len(c.spec_token_ids)
        if not d:
            out.append(c)
            continue
        real = [int(t) for t in drafts[i, :d]]
        out.append(replace(c, token_ids=list(c.token_ids[:-d]) + real, spec_token_ids=real))
    return out
