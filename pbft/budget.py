"""Token buckets keyed by peer: the one mechanism that bounds what a peer can make a replica
do for it (catch-up bytes per replica, replays per client).

A peer may spend while its bucket is above zero, and a spend may take the bucket into debt:
one message larger than the burst still goes out, and over time a peer gets at most `rate`
per second, plus one burst and one message. Time is the driver's clock (`now_ms`); tokens
are fractional, so a slow rate refills however often the bucket is looked at. Memory is one
entry per peer that ever spent: replicas and clients of the cluster, so bounded.
"""

from __future__ import annotations


class TokenBuckets:
    def __init__(self, rate_per_s: int, burst: int) -> None:
        if rate_per_s < 1 or burst < 1:
            raise ValueError("rate_per_s and burst must be at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        # peer -> (tokens, when last refilled)
        self._buckets: dict[int, tuple[float, int]] = {}

    def tokens(self, peer: int, now_ms: int) -> float:
        tokens, last_ms = self._buckets.get(peer, (float(self.burst), now_ms))
        refill = max(0, now_ms - last_ms) * self.rate_per_s / 1000
        tokens = min(float(self.burst), tokens + refill)
        self._buckets[peer] = (tokens, max(now_ms, last_ms))
        return tokens

    def may_spend(self, peer: int, now_ms: int) -> bool:
        return self.tokens(peer, now_ms) > 0

    def spend(self, peer: int, amount: int, now_ms: int) -> None:
        tokens = self.tokens(peer, now_ms)
        self._buckets[peer] = (tokens - amount, now_ms)

    def allow(self, peer: int, now_ms: int) -> bool:
        """Spend one token if the bucket holds a whole one (a count of events, not bytes)."""
        if self.tokens(peer, now_ms) < 1:
            return False
        self.spend(peer, 1, now_ms)
        return True
