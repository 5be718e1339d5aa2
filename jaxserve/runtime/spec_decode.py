"""Speculative decoding in the runner: which positions get logits, one sampler row per scored
position, and the host-side walk that turns per-row verdicts into each request's new tokens."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from jaxserve.runtime.runner_output import LogprobsRow, ModelRunnerOutput
from jaxserve.sample.metadata import SamplingRow


def logit_rows(num_tokens: int, num_seqs: int, num_speculative_tokens: int) -> int:
    """Logit rows of a step bucket: up to k + 1 per request (a decode with k drafts is scored
    at every position), never more than the bucket's tokens; one per request without
    speculation."""
    if num_speculative_tokens <= 0:
        return num_seqs
    return min(num_tokens, num_seqs * (num_speculative_tokens + 1))


@dataclass
class SpecLayout:
    """Rows of one step's logits: chunk i owns rows row_start[i] .. + 1 + len(its drafts)."""

    logits_indices: np.ndarray  # int32 [R]: token-axis position of each row (padding: 0)
    draft_ids: np.ndarray  # int32 [R]: the draft that followed the row's position, else -1
    row_start: list[int]
    num_rows: int  # real rows


def build_layout(chunks, query_start_loc: np.ndarray, padded_rows: int) -> SpecLayout:
    """Rows for the last 1 + d positions of each chunk with d drafts (its last position else)."""
    indices = np.zeros(padded_rows, np.int32)
    drafts = np.full(padded_rows, -1, np.int32)
    row_start, r = [], 0
    for i, c in enumerate(chunks):
        d = len(c.spec_token_ids)
        end = int(query_start_loc[i + 1])
        row_start.append(r)
        indices[r: r + d + 1] = np.arange(end - d - 1, end, dtype=np.int32)
        drafts[r: r + d] = c.spec_token_ids
        r += d + 1
    if r > padded_rows:
        raise ValueError(f"{r} logit rows exceed the bucket's {padded_rows}")
    return SpecLayout(indices, drafts, row_start, r)


def expand_rows(chunks, rows: list[SamplingRow]) -> list[SamplingRow]:
    """One SamplingRow per scored position: position j of a chunk with drafts sees the drafts
    before it as generated tokens (penalties) and output index + j (seeded draws)."""
    out = []
    for c, row in zip(chunks, rows):
        out.append(row)
        for j in range(1, len(c.spec_token_ids) + 1):
            # only penalties read the generated tokens (copying them costs on every step)
            generated = (list(c.output_token_ids) + list(c.spec_token_ids[:j])
                         if row.uses_penalties else row.output_token_ids)
            out.append(replace(
                row,
                output_index=row.output_index + j,
                output_token_ids=generated,
                banned_token_ids=(),  # the scheduler drafts only once min_tokens is met
            ))
    return out


def collect(host, chunks, layout: SpecLayout, out: ModelRunnerOutput) -> None:
    """Per sampled chunk: accepted drafts in order until the first rejection, then the row's
    token (the recovered token on a rejection, the bonus token after all drafts)."""
    for i, c in enumerate(chunks):
        if not c.sample:
            continue
        r0 = layout.row_start[i]
        rows = []
        for j, draft in enumerate(c.spec_token_ids):
            if not host.accepted[r0 + j]:
                break
            rows.append((r0 + j, int(draft)))
        else:
            j = len(c.spec_token_ids)
        rows.append((r0 + j, int(host.token_ids[r0 + j])))
        tokens = [t for _, t in rows]
        out.sampled[c.request_id] = tokens[0]
        if c.spec_token_ids:
            out.spec_tokens[c.request_id] = tokens
        k = c.sampling_params.logprobs
        if k is None:
            continue
        lp_rows = [
            LogprobsRow(host.logprob_token_ids[r, : k + 1].tolist(),
                        host.logprobs[r, : k + 1].tolist(), host.ranks[r, : k + 1].tolist())
            for r, _ in rows
        ]
        out.logprobs[c.request_id] = lp_rows[0]
        if c.spec_token_ids:
            out.spec_logprobs[c.request_id] = lp_rows
