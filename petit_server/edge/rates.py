"""Token buckets keyed by who asks: registrations per source address, requests per visitor.

Each key's bucket is full at first and refills steadily at its rate, up to its burst. A
peer chooses its keys (its addresses), so memory is bounded: past ``max_keys`` the oldest
bucket is dropped, which is the least likely to matter (a dropped bucket starts full again).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBuckets:
    """One token bucket per key."""

    max_keys: int = 65_536
    _buckets: dict[Hashable, tuple[float, float]] = field(default_factory=dict)  # tokens, when

    def seconds_to_wait(self, key: Hashable, now: float, *, rate: float, burst: float) -> float:
        """0 and one token taken, or how long ``key`` must wait for its next (per second
        ``rate`` tokens come back, at most ``burst`` are kept)."""
        tokens, then = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
        if len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = (tokens - 1 if not wait else tokens, now)
        return wait
