"""Draft-token proposers of speculative decoding (host side): n-gram prompt lookup, and the
slot reservation of a draft model (whose tokens the runner drafts on device)."""

from __future__ import annotations

import numpy as np

from .spec_config import SpeculativeConfig


class NgramProposer:
    """Prompt lookup: match the last n tokens (n = max .. min) against the sequence's own earlier
    tokens; the tokens that followed the most recent match (with k tokens after it, else the
    earliest match) are the draft. A deterministic
    proposer: its q is one-hot on the drafted token."""

    def __init__(self, cfg: SpeculativeConfig):
        self.k = cfg.num_speculative_tokens
        self.n_max = cfg.prompt_lookup_max
        self.n_min = cfg.prompt_lookup_min

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `token_ids` (fewer, or none, when no match)."""
        k = min(k, self.k)
        n_tokens = len(token_ids)
        if k <= 0 or n_tokens < self.n_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)  # [N]
        for n in range(min(self.n_max, n_tokens - 1), self.n_min - 1, -1):
            pattern = tokens[n_tokens - n:]  # [n]
            # windows starting at 0 .. n_tokens - n - 1: every earlier occurrence (not the suffix)
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: n_tokens - 1], n)
            hits = np.flatnonzero(np.all(windows == pattern, axis=1))  # [num_hits]
            if hits.size:
                # the most recent match with k tokens after it, else the earliest (most follow)
                full = hits[hits + n + k <= n_tokens]
                start = int(full[-1] if full.size else hits[0]) + n
                return tokens[start: start + k].tolist()
        return []


# A draft model's tokens are unknown until the runner runs the draft: the scheduler reserves
# their slots with this id, and the runner replaces it before the target's step.
DRAFT_PLACEHOLDER = -1


class DraftModelProposer:
    """Reserves k lookahead slots per decode; the runner's draft model fills them in."""

    def __init__(self, cfg: SpeculativeConfig):
        self.k = cfg.num_speculative_tokens

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return [DRAFT_PLACEHOLDER] * max(0, min(k, self.k))


def make_proposer(cfg: SpeculativeConfig):
    """The host-side proposer of `cfg.method`."""
    if cfg.method == "draft_model":
        return DraftModelProposer(cfg)
    return NgramProposer(cfg)
