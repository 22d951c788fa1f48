"""What a replica keeps so that clients cannot make it work for free (issue 8, points 3-4).

- `SignedReplies`: the signed REPLY for each decided (client, request id, body digest), kept
  and sent again on a retransmission, never signed anew. A replayed request costs a lookup,
  not an Ed25519 signature. Bounded: the oldest entries go first; an evicted reply is signed
  again once, and kept again.
- `ClientBudget`: a token bucket per client for work a request costs us without being new
  (answering a replay, relaying a pending request to the primary). An honest client
  retransmits once per timeout; a client replaying one request thousands of times a second
  gets its burst, then is dropped and counted.

Time comes from the replica's driver clock (`now_ms`), never from this module.
"""

from __future__ import annotations

from dataclasses import dataclass

# About 200 bytes per reply: 65,536 replies are about 13 MiB.
SIGNED_REPLIES_LIMIT = 65_536


class SignedReplies:
    def __init__(self, limit: int = SIGNED_REPLIES_LIMIT) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._replies: dict[tuple[int, int, bytes], bytes] = {}
        self.hits = 0

    def get(self, client_id: int, request_id: int, body_digest: bytes) -> bytes | None:
        raw = self._replies.get((client_id, request_id, body_digest))
        if raw is not None:
            self.hits += 1
        return raw

    def put(self, client_id: int, request_id: int, body_digest: bytes, raw: bytes) -> None:
        key = (client_id, request_id, body_digest)
        if key in self._replies:
            return
        while len(self._replies) >= self.limit:
            del self._replies[next(iter(self._replies))]
        self._replies[key] = raw

    def __len__(self) -> int:
        return len(self._replies)


@dataclass
class _Bucket:
    tokens: float
    updated_ms: int


class ClientBudget:
    """Token buckets keyed by client id: `rate_per_s` tokens a second, at most `burst`."""

    def __init__(self, rate_per_s: int, burst: int) -> None:
        if rate_per_s < 1 or burst < 1:
            raise ValueError("rate_per_s and burst must be at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        # One bucket per client that ever needed one; clients are the cluster's, so bounded.
        self._buckets: dict[int, _Bucket] = {}

    def allow(self, client_id: int, now_ms: int) -> bool:
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now_ms)
            self._buckets[client_id] = bucket
        elapsed_ms = max(0, now_ms - bucket.updated_ms)
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed_ms * self.rate_per_s / 1000)
        bucket.updated_ms = now_ms
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True
