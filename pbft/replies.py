"""What a replica keeps so that clients cannot make it work for free (issue 8, points 3-4).

- `SignedReplies`: the signed REPLY for each decided (client, request id, body digest), kept
  and sent again on a retransmission, never signed anew. A replayed request costs a lookup,
  not an Ed25519 signature. Bounded: the oldest entries go first; an evicted reply is signed
  again once, and kept again.
The replica pays for replays and relays from a token bucket per client (pbft/budget.py):
an honest client retransmits once per timeout; a client replaying one request thousands of
times a second gets its burst, then is dropped and counted.

Time comes from the replica's driver clock (`now_ms`), never from this module.
"""

from __future__ import annotations

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
