"""Incremental, UTF-8 safe detokenization with stop-string matching and stop-prefix hold-back."""

from __future__ import annotations

from typing import Any

from .sampling_params import SamplingParams

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens (spacing)
_TRIM_AT = 256  # drop consumed ids from the window past this many


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    Each step decodes only a small window of ids: the text is extended once the window's decode
    grows and does not end in U+FFFD (an incomplete multi-byte character), so a character split
    over several byte-level tokens is emitted whole. Stop strings are searched in the newly
    grown tail; `visible_text` holds back a suffix that could still become a stop string.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.output_text = ""
        self.num_output_tokens = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _next_delta(self, force: bool = False) -> str:
        """New complete text since the last call (`force`: flush even a trailing U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not force):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > _TRIM_AT:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def add_token(self, token_id: int, skip_text: bool = False) -> str | None:
        """Append one generated token; returns the stop string if one now matches.

        `skip_text`: the token counts but is not rendered (a stop token id / EOS that is not to
        appear in the text).
        """
        if self.stopped:
            return None
        self.num_output_tokens += 1
        if skip_text:
            return None
        self._ids.append(token_id)
        delta = self._next_delta()
        if not delta:
            return None
        return self._append(delta)

    def _append(self, delta: str) -> str | None:
        """Extend the text by `delta`; returns the stop string if one now matches."""
        self.output_text += delta
        if self.stop and self.num_output_tokens >= self.min_tokens:
            return self._check_stop(len(delta))
        return None

    def _check_stop(self, num_new_chars: int) -> str | None:
        text = self.output_text
        best_idx, best = -1, None
        for s in self.stop:
            start = max(0, len(text) - num_new_chars - len(s) + 1)
            idx = text.find(s, start)
            if idx != -1 and (best is None or idx < best_idx):
                best_idx, best = idx, s
        if best is None:
            return None
        end = best_idx + (len(best) if self.include_stop else 0)
        self.output_text = text[:end]
        self.stopped = True
        return best

    def flush(self) -> str | None:
        """At the end of the sequence: emit any text still pending (e.g. a dangling byte).

        Returns the stop string if the flushed text completes one: text held back for an
        incomplete character is searched like any other text.
        """
        if self.stopped or self._read_offset >= len(self._ids):
            return None
        delta = self._next_delta(force=True)
        return self._append(delta) if delta else None

    def visible_text(self, finished: bool) -> str:
        """The text safe to show now: all of it when finished, else minus a possible stop prefix."""
        text = self.output_text
        if finished or not self.stop or self.include_stop or self.stopped:
            return text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold] if hold else text
