"""Scheduled chunks -> sampler rows and metadata, in one of two fixed structures (no recompiles)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from jaxserve.sample.metadata import (
    PenaltyInputs,
    SamplingMetadata,
    SamplingRow,
    SparseBias,
    build_sampling_metadata,
)

# Width of the sparse logit-bias array of processed metadata: logit_bias entries plus banned
# ids (min_tokens) of one request must fit.
BIAS_WIDTH = 512


def rows_for(chunks) -> tuple[list[SamplingRow], bool]:
    """One SamplingRow per chunk (chunks that do not sample get a harmless greedy row), and
    whether any row needs logits processing (penalties, logit bias or banned ids)."""
    rows = []
    for c in chunks:
        if not c.sample:
            rows.append(SamplingRow())
            continue
        sp = c.sampling_params
        bias = sp.logit_bias or None
        if bias is not None and len(bias) + len(c.banned_token_ids) > BIAS_WIDTH:
            raise ValueError(f"logit_bias: at most {BIAS_WIDTH} entries are supported")
        rows.append(
            SamplingRow(
                temperature=sp.temperature,
                top_k=sp.top_k,
                top_p=sp.top_p,
                min_p=sp.min_p,
                presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty,
                repetition_penalty=sp.repetition_penalty,
                seed=c.seed,
                output_index=len(c.output_token_ids),
                logit_bias=bias,
                banned_token_ids=tuple(c.banned_token_ids),
                prompt_token_ids=c.prompt_token_ids,
                output_token_ids=c.output_token_ids,
                num_logprobs=sp.logprobs,
            )
        )
    return rows, any(r.uses_penalties or r.uses_bias for r in rows)


def build_metadata(
    rows: list[SamplingRow], padded_rows: int, step_seed: int, processed: bool, penalty_len: int,
) -> SamplingMetadata:
    """SamplingMetadata of exactly one of the two structures (neutral parts filled in):
    processed carries penalty arrays [B, penalty_len] and bias arrays [B, BIAS_WIDTH]."""
    if not processed:
        return build_sampling_metadata(rows, padded_rows, step_seed)
    md = build_sampling_metadata(
        rows, padded_rows, step_seed, penalty_len=penalty_len, bias_len=BIAS_WIDTH
    )
    if md.penalties is None:
        md = replace(md, penalties=PenaltyInputs(
            token_ids=np.full((padded_rows, penalty_len), -1, np.int32),
            prompt_lens=np.zeros(padded_rows, np.int32),
        ))
    if md.bias is None:
        md = replace(md, bias=SparseBias(
            token_ids=np.full((padded_rows, BIAS_WIDTH), -1, np.int32),
            values=np.zeros((padded_rows, BIAS_WIDTH), np.float32),
        ))
    return md
