"""Token buckets by key, for the transport's admission rates (keyed by IP address) and the
inbound scheduler's client pacing (keyed by principal).

A bucket holds up to `burst` tokens and gains `rate` a second. Full buckets carry no
information, so they are dropped: the buckets are kept in the order they were last
touched, each operation drops the full ones from the old end and, beyond MAX_KEYS, the
least recently seen (its key starts again from a full burst, which a flood from that many
keys gets anyway). Amortised O(1) an operation whatever the number of keys, and memory
bounded. (Scanning the whole table on each operation once it was large cost a flood from
32,000 addresses a minute of event-loop CPU: review finding F3, and the same scan in the
scheduler's pacing.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TokenBuckets"]

K = TypeVar("K", bound=Hashable)


class TokenBuckets(Generic[K]):
    """`take` spends a whole token if there is one; `reserve` always spends (tokens may go
    negative: the caller waits the returned delay, and a second caller for the same key
    cannot pass on the same tokens)."""

    MAX_KEYS = 65_536

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        # key -> (tokens, at), least recently touched first.
        self._buckets: OrderedDict[K, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: K, now: float) -> float:
        """The key's tokens now; its entry is taken out (the caller puts it back last)."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def _put(self, key: K, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        buckets = self._buckets
        while buckets:
            tokens, at = next(iter(buckets.values()))
            if tokens + (now - at) * self.rate < self.burst and len(buckets) <= self.MAX_KEYS:
                return
            buckets.popitem(last=False)

    def take(self, key: K, now: float) -> bool:
        """Spend one token of `key`'s if it has one: whether it had."""
        tokens = self._tokens(key, now)
        allowed = tokens >= 1.0
        self._put(key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def reserve(self, key: K, units: float, now: float) -> float:
        """Spend `units` of `key`'s tokens: how long the caller must wait until they
        would have been there (0: at once)."""
        tokens = self._tokens(key, now) - units
        self._put(key, tokens, now)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def __len__(self) -> int:
        return len(self._buckets)
