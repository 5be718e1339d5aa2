"""Whatever admission accepts builds sampler rows: one request's parameters at the edge of what
is allowed can never make the runner's host-side row building raise (which would fail every
request in the step). Rows are built with the runner's own code; nothing is compiled."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine import EngineConfig, InvalidRequestError, RequestLimits, SamplingParams
from jaxserve.engine.input_processor import validate_request
from jaxserve.engine.scheduler_output import ScheduledChunk
from jaxserve.engine.sampling_params import FLOAT32_MAX, MAX_LOGIT_BIAS
from jaxserve.runtime.sampling_rows import BIAS_WIDTH, build_metadata, rows_for

VOCAB = 50_000
CONFIG = EngineConfig(num_kv_blocks=65, max_model_len=64, vocab_size=VOCAB, block_size=16,
                      eos_token_ids=(0, 1, 2), max_biased_token_ids=BIAS_WIDTH)
LIMITS = RequestLimits()


def _chunk(params: SamplingParams, seed: int | None) -> ScheduledChunk:
    banned = set(params.all_stop_token_ids) | set(CONFIG.eos_token_ids)
    return ScheduledChunk(request_id="r", token_ids=[3, 4], start_pos=0, block_table=[1],
                          sample=True, sampling_params=params, prompt_token_ids=[3, 4],
                          output_token_ids=[], seed=seed, banned_token_ids=tuple(sorted(banned)))


EXTREMES = [
    dict(top_k=2**31 - 1),
    dict(temperature=FLOAT32_MAX, top_p=1e-30, min_p=1.0),
    dict(repetition_penalty=FLOAT32_MAX, presence_penalty=-2.0, frequency_penalty=2.0),
    dict(repetition_penalty=1e-30),
    dict(seed=2**64 - 1),
    dict(seed=-(2**63)),
    dict(seed=10**30),
    dict(logit_bias={VOCAB - 1 - i: -FLOAT32_MAX for i in range(MAX_LOGIT_BIAS)},
         stop_token_ids=list(range(3, 3 + LIMITS.max_stop_token_ids)), min_tokens=5),
    dict(logprobs=20, prompt_logprobs=20),
]


@pytest.mark.parametrize("kwargs", EXTREMES)
def test_every_admitted_request_builds_a_sampler_row(kwargs):
    params = SamplingParams(max_tokens=8, **kwargs)
    validate_request([3, 4], params, CONFIG, has_tokenizer=True)  # admitted
    ok = SamplingParams(max_tokens=8)
    chunks = [_chunk(ok, None), _chunk(params, params.seed), _chunk(ok, 7)]
    rows, processed = rows_for(chunks)
    md = build_metadata(rows, 4, step_seed=123, processed=processed, penalty_len=64)
    assert md.num_rows == 4
    assert np.asarray(md.temperature).shape == (4,)


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=2**31), "top_k"),
    (dict(temperature=1e39), "temperature"),
    (dict(stop_token_ids=list(range(3, 4 + LIMITS.max_stop_token_ids))), "stop_token_ids"),
])
def test_past_the_edge_is_refused_before_the_runner(kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        validate_request([3, 4], SamplingParams(max_tokens=8, **kwargs), CONFIG, True)
    assert info.value.field == field
