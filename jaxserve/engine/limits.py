"""RequestLimits: configurable bounds on one request's inputs, checked when it is admitted."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import InvalidRequestError
from .sampling_params import MAX_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (a small request must not buy unbounded work).

    `max_n` plays the role of vLLM's VLLM_MAX_N_SEQUENCES, with a default sized for a server
    (vLLM's 16384 would let one 60-byte request occupy every slot for a long time).
    """

    max_n: int = 64  # outputs per request (n, best_of)
    max_stop_strings: int = 64  # every stop string is searched after every token
    max_stop_string_chars: int = 256  # streamed text is held back by the longest stop string
    max_stop_token_ids: int = 128
    max_logprobs: int = MAX_LOGPROBS  # logprobs / prompt_logprobs (vLLM's max_logprobs)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name}: must be an int >= 1, got {value!r}")

    def check(self, params: SamplingParams) -> None:
        """Raise InvalidRequestError naming the first field past its bound."""
        if params.n > self.max_n:
            raise InvalidRequestError("n", f"must be <= {self.max_n} (the server's max_n), "
                                      f"got {params.n}")
        stop = params.stop_strings
        if len(stop) > self.max_stop_strings:
            raise InvalidRequestError("stop", f"at most {self.max_stop_strings} stop strings, "
                                      f"got {len(stop)}")
        longest = max((len(s) for s in stop), default=0)
        if longest > self.max_stop_string_chars:
            raise InvalidRequestError("stop", f"a stop string may have at most "
                                      f"{self.max_stop_string_chars} characters, got {longest}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise InvalidRequestError(name, f"must be <= {self.max_logprobs} (the server's "
                                          f"max_logprobs), got {value}")
        ids = params.all_stop_token_ids
        if len(ids) > self.max_stop_token_ids:
            raise InvalidRequestError("stop_token_ids", f"at most {self.max_stop_token_ids} "
                                      f"ids, got {len(ids)}")
