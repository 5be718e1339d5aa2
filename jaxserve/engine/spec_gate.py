"""SpecGate: whether a decode drafts this step (per-request acceptance backoff, batch cutoff)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ALPHA = 0.25  # weight of the newest verified draft in the acceptance EWMA
FIRST_PAUSE = 4  # decode steps without drafts after the EWMA first drops below the threshold
MAX_PAUSE = 16  # consecutive pauses double up to this many decode steps


@dataclass
class _Track:
    """One sequence's acceptance history: EWMA of accepted / drafted per verified draft."""

    ewma: float = 1.0
    pause_left: int = 0  # decode steps still to run without drafts
    next_pause: int = FIRST_PAUSE  # length of the next pause (doubles until a probe is accepted)
    probing: bool = False  # a pause ended: the next verified draft is a probe
    logged: bool = False  # the first pause was logged


class SpecGate:
    """Decides per decode whether to draft, from two rules (each off when its setting says so):

    - acceptance (`disable_by_acceptance` t > 0): when a sequence's EWMA falls below t, it
      decodes FIRST_PAUSE steps without drafts, then drafts again (a probe). A probe with no
      token accepted pauses it again for twice as long (at most MAX_PAUSE); a probe with >= 1
      token accepted resets the pause length to FIRST_PAUSE (and pauses again only while the
      EWMA stays below t).
    - batch size (`disable_by_batch_size` n): no drafts while >= n requests are running.

    State exists only for sequences that have had a draft verified; `forget` drops it."""

    def __init__(self, disable_by_acceptance: float, disable_by_batch_size: int | None):
        self.threshold = float(disable_by_acceptance)
        self.max_batch = disable_by_batch_size
        self._tracks: dict[str, _Track] = {}

    @property
    def num_tracked(self) -> int:
        return len(self._tracks)

    def ewma(self, seq_id: str) -> float:
        """The sequence's acceptance EWMA (1.0 before its first verified draft)."""
        track = self._tracks.get(seq_id)
        return track.ewma if track is not None else 1.0

    def batch_allows(self, num_running: int) -> bool:
        """False when the batch-size rule turns drafting off for this step."""
        return self.max_batch is None or num_running < self.max_batch

    def acceptance_allows(self, seq_id: str) -> bool:
        """Whether `seq_id` drafts in this decode step; a paused sequence's pause counts down
        by one step per call, so call once per decode step that could draft."""
        track = self._tracks.get(seq_id)
        if track is None or track.pause_left <= 0:
            return True
        track.pause_left -= 1
        if track.pause_left == 0:
            track.probing = True
        return False

    def record(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        """A verified decode of `seq_id` with `num_drafts` >= 1 drafts, `num_accepted` kept."""
        if num_drafts <= 0 or self.threshold <= 0.0:
            return
        track = self._tracks.setdefault(seq_id, _Track())
        track.ewma += ALPHA * (num_accepted / num_drafts - track.ewma)
        if track.probing:
            track.probing = False
            if num_accepted > 0:
                track.next_pause = FIRST_PAUSE
        if track.ewma >= self.threshold:
            return
        track.pause_left = track.next_pause
        track.next_pause = min(2 * track.next_pause, MAX_PAUSE)
        if not track.logged:
            track.logged = True
            logger.info("speculative decoding paused for request %s: draft acceptance EWMA "
                        "%.3f < disable_by_acceptance %g", seq_id, track.ewma, self.threshold)

    def forget(self, seq_id: str) -> None:
        """The sequence finished or was aborted."""
        self._tracks.pop(seq_id, None)
