"""What a serving loop measures, in one object per model replica: the scheduler's admission rounds
and decode steps, and each streamed request's time to its first text (with its parts). The
load benchmark sets a request's time to first token against what its batch cost in the same run
(prefill + 2 decode steps), so both halves live side by side. Torch-free."""

from __future__ import annotations

from collections import deque
from typing import Any

KEEP = 10_000  # the latest entries of each list; older ones drop off (the counts go on)


class Rounds:
    """The latest rounds of one kind as (requests, seconds), and how many were made in all."""

    def __init__(self, keep: int = KEEP):
        self.latest: deque[tuple[int, float]] = deque(maxlen=keep)
        self.count = 0

    def add(self, requests: int, seconds: float) -> None:
        self.latest.append((requests, seconds))
        self.count += 1


class ServingStats:
    """One replica's counters. The scheduler times ``prefill`` (admission: prepare + prefill + first
    token, by requests admitted together) and ``decode`` (one token for every running request) rounds;
    the deployment counts requests and times each stream's first text.

    ``first_token_parts``: arrival at the replica -> queued, queued -> taken for prefill, taken -> first
    token made (prepare + prefill), made -> with the event loop (hand-over), with the loop -> its first
    text sent (a token that ends inside a character, or a special one, has no text yet). The first four
    add up to the time to first token; all five to ``first_token_s``."""

    def __init__(self, keep: int = KEEP):
        self.requests = 0
        self.cancelled = 0  # requests whose caller went away before they ended
        self.prefill = Rounds(keep)
        self.decode = Rounds(keep)
        self.first_token_s: deque[float] = deque(maxlen=keep)
        self.first_token_parts: deque[tuple[float, ...]] = deque(maxlen=keep)

    def first_text(self, parts: tuple[float, ...]) -> None:
        """A stream's first text went out; ``parts`` as above."""
        self.first_token_s.append(sum(parts))
        self.first_token_parts.append(parts)

    def snapshot(self) -> dict[str, Any]:
        """Plain lists and numbers (a remote caller's copy)."""
        return {
            "requests": self.requests,
            "cancelled": self.cancelled,
            "first_token_s": list(self.first_token_s),
            "first_token_parts": list(self.first_token_parts),
            "prefill_rounds": list(self.prefill.latest),
            "prefills": self.prefill.count,
            "decode_rounds": list(self.decode.latest),
            "steps": self.decode.count,
        }
