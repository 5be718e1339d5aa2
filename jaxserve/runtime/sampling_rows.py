"""Scheduled chunks -> sampler rows, in one of a few fixed sampler variants (no recompiles)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from jaxserve.sample.metadata import (
    PenaltyInputs,
    SamplingMetadata,
    SamplingRow,
    SparseBias,
    build_sampling_metadata,
)

# Width of the sparse logit-bias array in the "processed" variant: logit_bias entries plus
# banned ids (min_tokens) of one request must fit.
BIAS_WIDTH = 512


@dataclass(frozen=True)
class SamplerVariant:
    """Static structure of one sampler compile: penalties/bias on or off, logprobs or not."""

    processed: bool  # penalty and bias arrays present
    num_logprobs: int  # 0 or the configured max

    @staticmethod
    def all(max_logprobs: int) -> list[SamplerVariant]:
        return [SamplerVariant(p, k) for p in (False, True) for k in (0, max_logprobs)]


def rows_for(chunks, max_logprobs: int) -> tuple[list[SamplingRow], SamplerVariant]:
    """One SamplingRow per chunk (chunks that do not sample get a harmless greedy row)."""
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
    processed = any(r.uses_penalties or r.uses_bias for r in rows)
    wants_logprobs = any(c.sample and c.sampling_params.logprobs is not None for c in chunks)
    return rows, SamplerVariant(processed, max_logprobs if wants_logprobs else 0)


def build_metadata(
    rows: list[SamplingRow], padded_rows: int, step_seed: int, variant: SamplerVariant,
    penalty_len: int,
) -> SamplingMetadata:
    """SamplingMetadata of exactly the variant's structure (neutral parts filled in)."""
    if not variant.processed:
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
