"""Turns the runner's raw logprob rows into vLLM-shaped {token_id: Logprob} dicts."""

from __future__ import annotations

from typing import Any

from .outputs import Logprob
from ..runtime.runner_output import LogprobsRow


class LogprobsBuilder:
    """Builds per-position logprob dicts, decoding each token id once (memoised)."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._decoded: dict[int, str | None] = {}

    def decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._decoded.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            self._decoded[token_id] = text
        return text

    def build(self, row: LogprobsRow, num_top: int) -> dict[int, Logprob]:
        """Entry 0 (the chosen / actual token) first, then at most `num_top` top-k entries."""
        out: dict[int, Logprob] = {}
        entries = zip(row.token_ids[:num_top + 1], row.logprobs[:num_top + 1],
                      row.ranks[:num_top + 1])
        for token_id, logprob, rank in entries:
            token_id = int(token_id)
            if token_id not in out:
                out[token_id] = Logprob(float(logprob), int(rank), self.decode_token(token_id))
        return out
