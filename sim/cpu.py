"""The simulator's CPU cost model: every replica and client is one core.

With `[cluster] cpu = { sign_us, verify_us, per_message_us }` each simulated node is busy for
`per_message_us` per message it handles, `sign_us` per signature it makes, `verify_us`
per signature it checks, and optionally `per_request_us` per request a replica executes
and `fsync_us` per durable write. Messages that arrive
while it is busy wait in its queue (first come, first served), and what it sends leaves
only when the work that produced it is done, so latency grows with load and throughput
stops growing at the busiest node's capacity.

Counting is exact, not estimated: each node's core signs with a `MeteredKey` and checks
signatures through a `MeteredCache`, which count the calls the real core makes. The
simulator still shares one verification cache between nodes (a signature is checked by
real Ed25519 once per run), but a node pays for every signature it has not checked itself
before, as a real replica with its own cache would.

Time stays integer microseconds; the costs are floats in the file and rounded per batch of
work, so the same scenario and seed give the same schedule.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from crypto.keys import SigningKey
from crypto.signing import VerificationCache, VerifyingKey

# Signatures a node remembers having checked (its own cache, as the real replica's is
# bounded); cleared when full, which costs re-checks, never a wrong answer.
SEEN_SIGNATURES_LIMIT = 1 << 16


class MeteredKey(SigningKey):
    """A signing key that counts its signatures."""

    __slots__ = ("signs",)

    def __init__(self, key: SigningKey) -> None:
        super().__init__(key.private_key)
        self.signs = 0

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        self.signs += 1
        return super().sign(domain, payload)


class MeteredCache(VerificationCache):
    """One node's view of the shared verification cache: counts the checks that node would
    have paid for (a signature new to it, or any failure, which is never cached)."""

    def __init__(self, shared: VerificationCache) -> None:
        super().__init__(max_entries=1)
        self._shared = shared
        # A dict as an ordered set: the simulator builds no sets (tests/test_import_rule.py).
        self._seen: dict[bytes, None] = {}
        self.verifies = 0

    def verify(self, key: VerifyingKey, domain: bytes, payload: bytes, signature: bytes) -> bool:
        ok = self._shared.verify(key, domain, payload, signature)
        if not ok:
            self.verifies += 1
            return False
        seen = bytes(signature)
        if seen not in self._seen:
            self.verifies += 1
            if len(self._seen) >= SEEN_SIGNATURES_LIMIT:
                self._seen.clear()
            self._seen[seen] = None
        return True

    def statistics(self) -> Any:
        return self._shared.statistics()


class Core:
    """One node's CPU: when it is next free, what waits for it, and its meters."""

    __slots__ = (
        "busy_us",
        "charged_us",
        "free_at_us",
        "key",
        "cache",
        "machine",
        "fsync_us",
        "messages",
        "persists",
        "per_request_us",
        "requests",
        "queue",
        "serving",
        "sign_us",
        "verify_us",
    )

    def __init__(
        self,
        key: MeteredKey,
        cache: MeteredCache,
        sign_us: float,
        verify_us: float,
        machine: list[int] | None = None,
        fsync_us: float = 0.0,
        per_request_us: float = 0.0,
    ) -> None:
        self.per_request_us = per_request_us
        self.requests = 0
        self.fsync_us = fsync_us
        self.persists = 0
        self.key = key
        # `cores = N` in the model: the free times of the N cores every node shares (a heap,
        # one list for all nodes); None: this node has a core of its own.
        self.machine = machine
        self.cache = cache
        self.sign_us = sign_us
        self.verify_us = verify_us
        # Crypto work already turned into busy time (in us of work, float).
        self.charged_us = 0.0
        self.free_at_us = 0
        # Messages arrived and not yet handled; `serving`: one is being handled (an event
        # for its end is queued), so arrivals only wait.
        self.queue: deque[Any] = deque()
        self.serving = False
        self.messages = 0
        # All the time this core has been busy (for CPU per payment, as /proc counts it).
        self.busy_us = 0

    def work_us(self) -> float:
        return (
            self.key.signs * self.sign_us
            + self.cache.verifies * self.verify_us
            + self.persists * self.fsync_us
            + self.requests * self.per_request_us
        )

    def charge(self, now_us: int) -> int:
        """Turn the crypto done since the last charge into busy time; when the core is free
        again (at least now)."""
        work = self.work_us()
        extra = int(round(work - self.charged_us))
        if extra > 0:
            self.charged_us += extra
            self.occupy(now_us, extra)
        return max(self.free_at_us, now_us)

    def occupy(self, now_us: int, busy_us: int) -> None:
        """Run `busy_us` of work as soon as this node (and, on a shared machine, a core) is
        free: one thread per node, so a node's work never overlaps itself."""
        self.busy_us += busy_us
        start_us = max(self.free_at_us, now_us)
        if self.machine is not None:
            start_us = max(start_us, heapq.heappop(self.machine))
            heapq.heappush(self.machine, start_us + busy_us)
        self.free_at_us = start_us + busy_us
