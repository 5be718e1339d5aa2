"""SpeculativeConfig: vLLM's `speculative_config` dict / `--speculative-config` JSON, validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SUPPORTED_METHODS = ("ngram", "draft_model")
_KNOWN_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
               "model", "disable_by_acceptance", "disable_by_batch_size"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculation settings.

    ngram (prompt lookup): propose the k tokens that followed the latest earlier occurrence of
    the sequence's last n tokens, n from prompt_lookup_max down to prompt_lookup_min.
    draft_model: a smaller model `model` (a checkpoint directory or hub id) with the target's
    vocabulary drafts k tokens autoregressively; its own paged KV cache shares the target's
    block tables.

    Gating (engine/spec_gate.py): a sequence whose draft-acceptance EWMA falls below
    `disable_by_acceptance` stops drafting for a few decode steps (0 turns the rule off); no
    request drafts while `disable_by_batch_size` or more requests are running (None: never)."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    model: str | None = None  # draft_model only
    disable_by_acceptance: float = 0.1  # in [0, 1]; 0 = off
    disable_by_batch_size: int | None = None  # >= 1; None = off

    def __post_init__(self) -> None:
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_METHODS)}")
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            raise ValueError("speculative_config.model: required for method 'draft_model' "
                             "(the draft checkpoint's directory)")
        if self.method != "draft_model" and self.model is not None:
            raise ValueError(f"speculative_config.model: only for method 'draft_model', not "
                             f"{self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name}: must be an int >= 1, got {value!r}")
        if self.num_speculative_tokens > 16:
            raise ValueError("speculative_config.num_speculative_tokens: at most 16, got "
                             f"{self.num_speculative_tokens}")
        t = self.disable_by_acceptance
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
            raise ValueError("speculative_config.disable_by_acceptance: must be a number in "
                             f"[0, 1] (0 turns the rule off), got {t!r}")
        n = self.disable_by_batch_size
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError("speculative_config.disable_by_batch_size: must be an int >= 1 or "
                             f"None, got {n!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config.prompt_lookup_min: {self.prompt_lookup_min} exceeds "
                f"prompt_lookup_max {self.prompt_lookup_max}")


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """None, a SpeculativeConfig, a dict with vLLM's keys, or that dict as a JSON string."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config: expected a dict, got {type(value).__name__}")
    method = value.get("method")
    if method is not None and method not in SUPPORTED_METHODS:  # before the keys: a draft
        # model's config has keys of its own, and the method is what the user must hear about
        raise ValueError(f"speculative_config.method: {method!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_METHODS)})")
    unknown = sorted(set(value) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: "
                         f"{sorted(_KNOWN_KEYS)}")
    if "method" not in value:
        raise ValueError("speculative_config.method: required (supported: "
                         f"{', '.join(SUPPORTED_METHODS)})")
    if value.get("num_speculative_tokens") is None:
        raise ValueError("speculative_config.num_speculative_tokens: required")
    cfg = {k: v for k, v in value.items() if v is not None}
    if method == "draft_model":
        return SpeculativeConfig(**cfg)
    # vLLM: one of the two lookup bounds given -> the other equals it; neither -> 5 and 5
    if "prompt_lookup_max" in cfg and "prompt_lookup_min" not in cfg:
        cfg["prompt_lookup_min"] = cfg["prompt_lookup_max"]
    if "prompt_lookup_min" in cfg and "prompt_lookup_max" not in cfg:
        cfg["prompt_lookup_max"] = cfg["prompt_lookup_min"]
    return SpeculativeConfig(**cfg)
