"""Blockwise paged attention in plain XLA loops: the CPU serving path.

Unlike the plain reference (which gathers every sequence's K/V at the padded block-table width),
this walks the block table in chunks of a few blocks with an online softmax, and its loops stop
at the longest context actually present, so the work follows the real lengths:
- decode rows (one query token): all sequences at once, one chunk of blocks per iteration;
- prefill chunks (more than one query token): one sequence at a time, query tiles x KV chunks.
NaN in unused cache slots cannot leak: scores and V rows outside a sequence are selected away.
Gathered K/V chunks are computed on in f32 (XLA:CPU has no bf16 x bf16 -> f32 dot outside its
YNN fusions: a `preferred_element_type` product that misses them fails at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.layers.kv_quant import is_quantized_page, unpack_rows


@dataclass(frozen=True)
class BlockwiseSizes:
    """Loop granularity: blocks per KV chunk (decode rows / prefill tiles), tokens per tile.

    Decode rows gather `decode_gather_tokens` keys per iteration over all rows, in chunks of
    `decode_kv_blocks` to `decode_max_kv_blocks` blocks per row: many rows take short chunks
    (measured on a 2-core CPU, 18M-param Llama, 64 rows at 500 tokens of context: 2 blocks ran
    the step in 66 ms against 77 ms with 4 and 96 ms with 8: the gathered K/V stays in cache),
    few rows take long ones, so a single request loops a few times per layer, not once per 2
    blocks. `decode_gather_tokens=0` keeps every chunk at `decode_kv_blocks`.
    """

    decode_kv_blocks: int = 2
    prefill_kv_blocks: int = 8
    q_tile: int = 64
    decode_gather_tokens: int = 1024
    decode_max_kv_blocks: int = 16

    def decode_chunk(self, num_seqs: int, block_size: int) -> int:
        """Blocks per decode iteration for num_seqs rows (static: shapes are known)."""
        fit = self.decode_gather_tokens // max(1, num_seqs * block_size)
        return max(self.decode_kv_blocks, min(self.decode_max_kv_blocks, fit))


def _visible(key_pos, query_pos, seq_len, sliding_window):
    """Keys a query may see: causal, inside the sequence, inside the window."""
    ok = (key_pos <= query_pos) & (key_pos < seq_len) & (query_pos >= 0)
    if sliding_window is not None:
        ok &= query_pos - key_pos < sliding_window
    return ok


def _online_update(carry, scores, mask, v, v_scale=None):
    """One online-softmax step. scores [..., Ck] f32, mask like scores, v [..., Ck, D] f32;
    v_scale [..., Ck] (quantized V, masked slots already 0): weights p * v_scale meet v."""
    m, l, acc = carry  # [...], [...], [..., D]
    scores = jnp.where(mask, scores, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m_safe[..., None]), 0.0)
    corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    pv = p if v_scale is None else p * v_scale
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + jnp.einsum("...c,...cd->...d", pv, v)


def _finish(carry):
    _, l, acc = carry
    return acc / jnp.where(l == 0.0, 1.0, l)[..., None]


def _gather_chunk(pages, block_ids):
    """pages [Hkv, NB, bs, D], block_ids [..., C] -> ([Hkv, ..., C * bs, D] f32, scales).

    Quantized pages (int8 / fp8 rows [..., D + 4], layers/kv_quant.py) give their values and
    the chunk's scales [Hkv, ..., C * bs] f32; float pages give None. The values stay
    unscaled: a K scale multiplies the chunk's scores, a V scale the softmax weights, [.., Ck]
    wide instead of [.., Ck, D] (scores = (q . k_values) * k_scale).
    """
    g = pages[:, block_ids]  # [Hkv, ..., C, bs, row]
    g = g.reshape(*g.shape[:-3], -1, g.shape[-1])
    if not is_quantized_page(pages.dtype):
        return g.astype(jnp.float32), None
    values, scales = unpack_rows(g)
    return values.astype(jnp.float32), scales


def _soft_cap(scores, cap):
    return scores if cap is None else cap * jnp.tanh(scores / cap)


def _decode_rows(q_last, kv, bt, seq_lens, rows_ok, scale, window, cap, sizes):
    """Last query token of every sequence. q_last [S, Hq, D] -> [S, Hq, D] f32."""
    num_seqs, num_q_heads, head_dim = q_last.shape
    k_pages, v_pages = kv
    kvh, _, bs, _ = k_pages.shape
    group = num_q_heads // kvh
    chunk = sizes.decode_chunk(num_seqs, bs)
    qg = q_last.astype(jnp.float32).reshape(num_seqs, kvh, group, head_dim) * scale
    q_pos = seq_lens - 1  # [S]
    longest = jnp.max(jnp.where(rows_ok, seq_lens, 0))
    lo = 0 if window is None else jnp.min(jnp.where(rows_ok, q_pos - window + 1, 1 << 30))
    first = jnp.maximum(lo, 0) // (chunk * bs)
    last = (longest + chunk * bs - 1) // (chunk * bs)

    def body(j, carry):
        ids = lax.dynamic_slice_in_dim(bt, j * chunk, chunk, axis=1)  # [S, C]
        k, ks = _gather_chunk(k_pages, ids)  # [Hkv, S, Ck, D], [Hkv, S, Ck] | None
        v, vs = _gather_chunk(v_pages, ids)
        key_pos = j * chunk * bs + jnp.arange(chunk * bs)  # [Ck]
        ok = _visible(key_pos[None, :], q_pos[:, None], seq_lens[:, None], window)  # [S, Ck]
        ok &= rows_ok[:, None]
        v = jnp.where(ok[None, :, :, None], v, 0.0)
        s = jnp.einsum("skgd,kscd->skgc", qg, k)  # [S, Hkv, G, Ck]
        if ks is not None:
            s = s * ks.transpose(1, 0, 2)[:, :, None]
        if vs is not None:
            vs = jnp.where(ok[None], vs, 0.0).transpose(1, 0, 2)[:, :, None]  # [S, Hkv, 1, Ck]
        return _online_update(carry, _soft_cap(s, cap), ok[:, None, None, :],
                              v.transpose(1, 0, 2, 3)[:, :, None], vs)

    init = (
        jnp.full((num_seqs, kvh, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_seqs, kvh, group), jnp.float32),
        jnp.zeros((num_seqs, kvh, group, head_dim), jnp.float32),
    )
    out = _finish(lax.fori_loop(first, last, body, init))
    return out.reshape(num_seqs, num_q_heads, head_dim)


def _prefill_sequence(s, out, q_pad, kv, bt, seq_lens, qsl, scale, window, cap, sizes):
    """All query tokens of sequence s, tile by tile; blends its rows into out [T + tile, Hq, D]."""
    _, num_q_heads, head_dim = q_pad.shape
    k_pages, v_pages = kv
    kvh, _, bs, _ = k_pages.shape
    group = num_q_heads // kvh
    tile, chunk = sizes.q_tile, sizes.prefill_kv_blocks
    qlen = qsl[s + 1] - qsl[s]
    seq_len = seq_lens[s]
    row_bt = bt[s]  # [W + chunk]

    def tile_body(t, out):
        start = qsl[s] + t * tile
        offs = t * tile + jnp.arange(tile)  # [Qt] offsets inside the chunk
        valid = offs < qlen
        q_pos = jnp.where(valid, seq_len - qlen + offs, -1)  # [Qt]
        qt = lax.dynamic_slice_in_dim(q_pad, start, tile).astype(jnp.float32) * scale
        qt = qt.reshape(tile, kvh, group, head_dim)
        top = jnp.max(q_pos) + 1
        lo = 0 if window is None else jnp.maximum(seq_len - qlen + t * tile - window + 1, 0)

        def kv_body(j, carry):
            ids = lax.dynamic_slice_in_dim(row_bt, j * chunk, chunk)  # [C]
            k, ks = _gather_chunk(k_pages, ids)  # [Hkv, Ck, D], [Hkv, Ck] | None
            v, vs = _gather_chunk(v_pages, ids)
            key_pos = j * chunk * bs + jnp.arange(chunk * bs)
            ok = _visible(key_pos[None, :], q_pos[:, None], seq_len, window)  # [Qt, Ck]
            in_seq = key_pos < seq_len  # [Ck]
            v = jnp.where(in_seq[None, :, None], v, 0.0)
            sc = jnp.einsum("qkgd,kcd->qkgc", qt, k)  # [Qt, Hkv, G, Ck]
            if ks is not None:
                sc = sc * ks[None, :, None]
            if vs is not None:
                vs = jnp.where(in_seq[None], vs, 0.0)[None, :, None]  # [1, Hkv, 1, Ck]
            return _online_update(carry, _soft_cap(sc, cap), ok[:, None, None, :],
                                  v[None, :, None], vs)

        init = (
            jnp.full((tile, kvh, group), -jnp.inf, jnp.float32),
            jnp.zeros((tile, kvh, group), jnp.float32),
            jnp.zeros((tile, kvh, group, head_dim), jnp.float32),
        )
        res = _finish(lax.fori_loop(lo // (chunk * bs), (top + chunk * bs - 1) // (chunk * bs),
                                    kv_body, init))
        res = res.reshape(tile, num_q_heads, head_dim)
        old = lax.dynamic_slice_in_dim(out, start, tile)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None, None], res, old),
                                               start, axis=0)

    return lax.fori_loop(0, (qlen + tile - 1) // tile, tile_body, out)


def blockwise_paged_attention(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc, *,
                              scale=None, sliding_window=None, logits_soft_cap=None,
                              sizes: BlockwiseSizes = BlockwiseSizes()):
    """Same contract as `pallas_kernels.ragged_paged_attention_reference`.

    q [T, Hq, D]; k_pages, v_pages [Hkv, NB, bs, D]; block_tables [S, W]; seq_lens [S];
    query_start_loc [S + 1]. Returns [T, Hq, D] in q's dtype; padding tokens give zeros.
    Quantized pages (int8 / fp8 rows [Hkv, NB, bs, D + 4] holding each slot's scale,
    layers/kv_quant.py) are dequantized chunk by chunk as they are gathered.
    """
    kv = (k_pages, v_pages)
    num_tokens, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    num_seqs = block_tables.shape[0]
    qsl = query_start_loc.astype(jnp.int32)
    seq_lens = seq_lens.astype(jnp.int32)
    # Extra columns so a chunk that runs past the table reads block 0 (masked), never shifts.
    pad = max(sizes.decode_chunk(num_seqs, k_pages.shape[2]), sizes.prefill_kv_blocks)
    bt = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, pad)))
    qlen = qsl[1:] - qsl[:-1]  # [S]
    is_decode = (qlen == 1) & (seq_lens > 0)
    last = jnp.clip(qsl[1:] - 1, 0, num_tokens - 1)  # [S]
    dec = _decode_rows(q[last], kv, bt, seq_lens, is_decode, scale, sliding_window,
                       logits_soft_cap, sizes)
    out = jnp.zeros((num_tokens + sizes.q_tile, *q.shape[1:]), jnp.float32)
    out = out.at[jnp.where(is_decode, last, num_tokens + sizes.q_tile)].set(dec, mode="drop")
    prefill = (qlen > 1) & (seq_lens > 0)
    order = jnp.nonzero(prefill, size=num_seqs, fill_value=0)[0]  # prefill sequences first
    q_pad = jnp.pad(q, ((0, sizes.q_tile), (0, 0), (0, 0)))

    def seq_body(i, out):
        return _prefill_sequence(order[i], out, q_pad, kv, bt, seq_lens, qsl, scale,
                                 sliding_window, logits_soft_cap, sizes)

    out = lax.fori_loop(0, jnp.sum(prefill), seq_body, out)
    return out[:num_tokens].astype(q.dtype)
