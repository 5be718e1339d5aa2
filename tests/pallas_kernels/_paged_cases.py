"""Random paged-KV test cases (shuffled block tables, NaN-poisoned unused slots) + naive numpy."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PagedCase:
  q: np.ndarray  # [T, Hq, D]
  k_pages: np.ndarray  # [Hkv, num_blocks, block_size, D]
  v_pages: np.ndarray  # [Hkv, num_blocks, block_size, D]
  block_tables: np.ndarray  # int32 [S, max_blocks]
  seq_lens: np.ndarray  # int32 [S]
  query_start_loc: np.ndarray  # int32 [S + 1]


def make_case(seq_lens, q_lens, *, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
              max_blocks=None, num_tokens=None, dtype=np.float32, seed=0, poison=True,
              extra_blocks=3):
  """Builds a ragged batch. Every KV slot outside all sequences' first seq_len tokens is NaN
  (when `poison`), block 0 included; block-table tails point at random blocks (null, garbage or
  other sequences' pages). `num_tokens` > sum(q_lens) adds padding tokens (NaN-free queries)."""
  rng = np.random.default_rng(seed)
  seq_lens = np.asarray(seq_lens, np.int32)
  q_lens = np.asarray(q_lens, np.int32)
  blocks_needed = [-(-int(n) // block_size) for n in seq_lens]
  if max_blocks is None:
    max_blocks = max(1, max(blocks_needed, default=1))
  num_blocks = 1 + sum(blocks_needed) + extra_blocks  # block 0 is the null block
  perm = rng.permutation(np.arange(1, num_blocks))
  shape = (num_kv_heads, num_blocks, block_size, head_dim)
  k_pages = rng.standard_normal(shape).astype(np.float32)
  v_pages = rng.standard_normal(shape).astype(np.float32)
  used = np.zeros((num_blocks, block_size), bool)
  block_tables = rng.integers(0, num_blocks, (len(seq_lens), max_blocks)).astype(np.int32)
  block_tables[:, ::2] = 0  # some tails point at the null block, others anywhere
  start = 0
  for s, n in enumerate(seq_lens):
    own = perm[start:start + blocks_needed[s]]
    start += blocks_needed[s]
    block_tables[s, :len(own)] = own
    for j in range(int(n)):
      used[own[j // block_size], j % block_size] = True
  if poison:
    k_pages[:, ~used] = np.nan
    v_pages[:, ~used] = np.nan
  qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  total = int(qsl[-1]) if num_tokens is None else num_tokens
  q = rng.standard_normal((total, num_q_heads, head_dim)).astype(np.float32)
  cast = lambda x: x.astype(dtype)
  return PagedCase(cast(q), cast(k_pages), cast(v_pages), block_tables, seq_lens, qsl)


def naive_ragged(case: PagedCase, *, scale=None, sliding_window=None, logits_soft_cap=None):
  """Per-sequence, per-query loops in float64: reads only the slots a query may see."""
  q = case.q.astype(np.float64)
  k_pages = case.k_pages.astype(np.float64)
  v_pages = case.v_pages.astype(np.float64)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, block_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
  out = np.zeros((num_tokens, num_q_heads, head_dim))
  qsl = case.query_start_loc
  for s, seq_len in enumerate(case.seq_lens):
    q_len = int(qsl[s + 1] - qsl[s])
    for i in range(q_len):
      pos = int(seq_len) - q_len + i
      first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
      keys = range(first, pos + 1)
      if not keys:
        continue
      blocks = [case.block_tables[s, j // block_size] for j in keys]
      slots = [j % block_size for j in keys]
      for h in range(num_q_heads):
        kh = h // group
        kk = np.stack([k_pages[kh, b, o] for b, o in zip(blocks, slots)])  # [n, D]
        vv = np.stack([v_pages[kh, b, o] for b, o in zip(blocks, slots)])  # [n, D]
        logits = kk @ q[qsl[s] + i, h] * scale
        if logits_soft_cap is not None:
          logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
        p = np.exp(logits - logits.max())
        out[qsl[s] + i, h] = (p / p.sum()) @ vv
  return out


def quantize_case(case: PagedCase, name: str, seed: int = 0):
  """(k rows, v rows, the case on the dequantized pages): pages quantized to jaxserve's KV rows
  [Hkv, NB, bs, D + 4] (int8, or uint8 holding float8_e4m3fn bits; each row its values, then
  its f32 scale = max |x| / qmax). Every slot no sequence owns (NaN in `case`) gets a NaN scale
  and garbage (int8) or NaN (e4m3) values, so reading it leaks NaN."""
  import ml_dtypes

  unused = np.isnan(np.asarray(case.k_pages[0, :, :, 0], np.float32))  # [NB, bs]
  rng = np.random.default_rng(seed)
  qmax = np.float32(127.0 if name == "int8" else 448.0)
  rows, deq = [], []
  for pages in (case.k_pages, case.v_pages):
    x = np.nan_to_num(np.asarray(pages, np.float32))
    scale = (np.abs(x).max(-1) * (np.float32(1.0) / qmax)).astype(np.float32)
    inv = np.float32(1.0) / np.where(scale > 0, scale, np.float32(1.0))
    y = x * inv[..., None]
    if name == "int8":
      values = np.clip(np.round(y), -127, 127).astype(np.int8)
      values[:, unused] = rng.integers(-128, 128, values[:, unused].shape)
      raw = values
    else:
      values = np.clip(y, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn)
      values[:, unused] = np.nan
      raw = values.view(np.uint8)
    scale[:, unused] = np.nan
    rows.append(np.concatenate([raw, scale[..., None].view(raw.dtype)], axis=-1))
    deq.append(values.astype(np.float32) * scale[..., None])
  return rows[0], rows[1], dataclasses.replace(case, k_pages=deq[0], v_pages=deq[1])
