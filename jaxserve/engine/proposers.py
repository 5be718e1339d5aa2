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
        """Up to k draft tokens to follow `token_ids` (fewer, or none, when no match).

        One pass finds every earlier occurrence of the last token; only those are extended
        backwards to their match length with the suffix (at most n_max), rather than a window
        slid over the whole sequence once per n (this runs on the host between device steps,
        where the step has just evicted the host's caches: each numpy call costs)."""
        k = min(k, self.k)
        n_tokens = len(token_ids)
        if k <= 0 or n_tokens < self.n_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)  # [N]
        n_top = min(self.n_max, n_tokens - 1)
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # [H]: earlier ends of a 1-gram match
        if not ends.size:
            return []
        length = np.ones(ends.size, np.int64)  # [H]: matched suffix length ending there
        for i in range(1, n_top):
            live = np.flatnonzero((length == i) & (ends >= i))
            if not live.size:
                break
            length[live[tokens[ends[live] - i] == tokens[-1 - i]]] += 1
        best = min(int(length.max()), n_top)
        if best < self.n_min:
            return []
        hits = ends[length >= best]  # ascending
        # the most recent match with k tokens after it, else the earliest (most follow)
        full = hits[hits + 1 + k <= n_tokens]
        after = int(full[-1] if full.size else hits[0]) + 1
        return tokens[after: after + k].tolist()


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
