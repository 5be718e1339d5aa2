"""What one model-runner step hands back to the engine: plain Python, no jax."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogprobsRow:
    """Logprobs at one position: entry 0 is the chosen (or actual) token, then the top-k by rank."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # rank 1 = the most likely token


@dataclass
class ModelRunnerOutput:
    """Results of one step, keyed by request id."""

    sampled: dict[str, int] = field(default_factory=dict)  # chunks with sample=True
    logprobs: dict[str, LogprobsRow] = field(default_factory=dict)  # sampling_params.logprobs set
    # request id -> one row per prompt position covered by the chunk (position p gives the
    # logprob of prompt token p + 1); only for requests with sampling_params.prompt_logprobs set
    prompt_logprobs: dict[str, list[LogprobsRow]] = field(default_factory=dict)
    # speculative decoding: request id -> the new tokens of a chunk with drafts (accepted
    # drafts, then the recovered or bonus token), and their logprob rows when asked
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[LogprobsRow]] = field(default_factory=dict)
