"""EngineConfig: the scheduler's and KV cache's limits, read in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import RequestLimits
from .spec_config import SpeculativeConfig


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Limits of the engine layer. `num_kv_blocks` includes the reserved null block 0."""

    num_kv_blocks: int
    max_model_len: int
    vocab_size: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_prompt_logprobs: bool = True  # off: no prompt-logprob programs were compiled
    eos_token_ids: tuple[int, ...] = ()
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Default sampling parameters (generation_config.json; vLLM's --generation-config): a
    # request's own value wins. Keys are SamplingParams field names.
    generation_defaults: dict[str, float | int] = field(default_factory=dict)
    # Width of the runner's per-request sparse logit-bias row: logit_bias entries plus the ids
    # banned until min_tokens (stop ids + EOS) must fit, or the request is refused at admission.
    max_biased_token_ids: int = 512
    # Speculative decoding (vLLM's speculative_config); None = off.
    speculative: SpeculativeConfig | None = None
    # Async scheduling (vLLM's --async-scheduling): schedule and launch step N + 1 before
    # step N's results are read, its decodes taking step N's tokens on device.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for name in ("block_size", "max_model_len", "vocab_size", "max_num_seqs",
                     "max_num_batched_tokens", "max_biased_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks: must be >= 2 (block 0 is reserved), got "
                             f"{self.num_kv_blocks!r}")
        if self.async_scheduling and self.speculative is not None:
            raise ValueError("async_scheduling: not supported with speculative decoding (its "
                             "drafts are proposed from the tokens of the step before)")
        if self.max_blocks_per_seq > self.num_kv_blocks - 1:
            raise ValueError(
                f"max_model_len: {self.max_model_len} tokens need {self.max_blocks_per_seq} "
                f"blocks of {self.block_size}, but the KV cache has only "
                f"{self.num_kv_blocks - 1} usable blocks"
            )

    @property
    def max_blocks_per_seq(self) -> int:
        """Longest block table a sequence can have."""
        return -(-self.max_model_len // self.block_size)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_kv_blocks - 1
