"""SamplingParams: vLLM's per-request sampling knobs, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError, require_utf8
from .structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300  # OpenAI's limit; the runner's sparse bias row holds these + banned ids
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # floats reach the sampler as float32: larger is infinity


@dataclass
class SamplingParams:
    """Sampling parameters of one request (vLLM's names and defaults).

    `top_k` 0 or -1 disables top-k. `max_tokens=None` means "up to max_model_len".
    `stop` is normalised to a list of strings, `stop_token_ids` to a list of ints and the
    keys of `logit_bias` to ints.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Output constraint (JSON schema, regex, choice, grammar, JSON object); a dict is converted.
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._normalize()
        self.verify()

    # ---------------------------------------------------------------- normalisation
    def _normalize(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is not None:
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError(
                    "logit_bias", f"must map token ids to floats, got {self.logit_bias!r}"
                ) from exc

    # ---------------------------------------------------------------- validation
    def verify(self) -> None:
        """Raise InvalidRequestError (a ValueError) naming the first invalid field."""
        _check_int("n", self.n, lo=1)
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, lo=-1, hi=INT32_MAX)  # an int32 on device
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0)  # the upper bound is the engine's max_logprobs
        self._verify_stop()
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise InvalidRequestError("structured_outputs",
                                          "must be StructuredOutputsParams or a dict")
            self.structured_outputs.verify()
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise InvalidRequestError(
                    "logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}"
                )
            for tok, bias in self.logit_bias.items():
                if tok < 0 or not math.isfinite(bias) or abs(bias) > FLOAT32_MAX:
                    raise InvalidRequestError(
                        "logit_bias", f"invalid entry {tok}: {bias} (ids >= 0, finite biases)"
                    )

    def _verify_stop(self) -> None:
        if self.stop is not None:
            for s in self.stop:
                if not isinstance(s, str) or not s:
                    raise InvalidRequestError("stop", f"must be non-empty strings, got {s!r}")
                require_utf8("stop", s)
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise InvalidRequestError(
                        "stop_token_ids", f"must be non-negative ints, got {t!r}"
                    )

    # ---------------------------------------------------------------- helpers
    @property
    def greedy(self) -> bool:
        """True when sampling is exact argmax (temperature ~ 0)."""
        return self.temperature < _GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop) if self.stop else []

    @property
    def all_stop_token_ids(self) -> tuple[int, ...]:
        return tuple(self.stop_token_ids) if self.stop_token_ids else ()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(value):
        raise InvalidRequestError(name, f"must be an int, got {value!r}")
    _check_range(name, value, lo, hi)


def _check_float(
    name: str, value: object, lo: float | None = None, hi: float | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise InvalidRequestError(name, f"must be a finite number, got {value!r}")
    _check_range(name, value, lo, hi)


def _check_range(name: str, value, lo, hi) -> None:
    if lo is not None and value < lo:
        raise InvalidRequestError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidRequestError(name, f"must be <= {hi}, got {value}")
