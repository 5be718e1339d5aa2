"""Turn the engine's cumulative RequestOutputs into per-completion deltas for streaming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CompletionDelta:
    """What is new in one completion since the previous output of its request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None  # one dict per new position (token id -> Logprob)
    finish_reason: str | None
    stop_reason: int | str | None
    first: bool  # nothing had been sent for this completion before


class DeltaTracker:
    """Remembers how much of each completion has been sent; `update` returns only the new part."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int, int]] = {}  # index -> (text, tokens, logprobs)
        self._done: set[int] = set()

    def update(self, output: Any) -> list[CompletionDelta]:
        deltas = []
        for completion in output.outputs:
            if completion.index in self._done:
                continue
            first = completion.index not in self._sent
            text_len, tok_len, lp_len = self._sent.get(completion.index, (0, 0, 0))
            logprobs = completion.logprobs
            new_lp = None if logprobs is None else list(logprobs[lp_len:])
            delta = CompletionDelta(
                index=completion.index,
                text=completion.text[text_len:],
                token_ids=list(completion.token_ids[tok_len:]),
                logprobs=new_lp,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
                first=first,
            )
            self._sent[completion.index] = (
                len(completion.text), len(completion.token_ids),
                lp_len if logprobs is None else len(logprobs))
            if completion.finish_reason is not None:
                self._done.add(completion.index)
            if first or delta.text or delta.token_ids or delta.finish_reason is not None:
                deltas.append(delta)
        return deltas


def num_generated_tokens(output: Any) -> int:
    """Tokens generated over all completions of a request so far."""
    return sum(len(c.token_ids) for c in output.outputs)
