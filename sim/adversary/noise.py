"""Lies to clients, replays, garbage and forged senders."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import replace

from crypto.keys import Principal
from pbft.codec import MAX_FRAME_BYTES
from pbft.ledger import Outcome, Reason
from pbft.messages import Reply
from pbft.replies import result_of, sign_replies
from pbft.signed import seal
from sim.adversary.base import Behavior, decode_own, view_of

# --- towards clients ---------------------------------------------------------------------


class WrongReply(Behavior):
    """Every REPLY it sends a client carries the opposite outcome (confirmed becomes
    rejected for insufficient_funds; any rejection becomes confirmed), signed as itself.
    It keeps the cluster id its core put in: a reply naming another cluster would only be
    dropped by the client, so this is the stronger lie."""

    name = "wrong_reply"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        message = decode_own(data)
        if not isinstance(message, Reply):
            return [data]
        lie = flip_reply(message)
        # A batch of one under its own signed root: a lie whose proof and signature hold.
        (raw,) = sign_replies(
            self.key, lie.replica, lie.view, lie.batch_seq, lie.cluster_id, [result_of(lie)]
        )
        return [raw]


def flip_reply(reply: Reply) -> Reply:
    if reply.outcome == Outcome.CONFIRMED:
        return replace(
            reply, outcome=Outcome.REJECTED.value, reason=Reason.INSUFFICIENT_FUNDS.value
        )
    return replace(reply, outcome=Outcome.CONFIRMED.value, reason=Reason.NONE.value)


# --- noise -------------------------------------------------------------------------------


class Replay(Behavior):
    """Along with each message, sends the same destination one it sent there before:
    preferably from an earlier view (a stale pre-prepare, vote, heartbeat or view change),
    else an older one of this view. Keeps the last 48 messages it sent plus 16 from the
    views before the current one: 64 in all."""

    name = "replay"
    RECENT = 48
    EARLIER = 16

    def setup(self) -> None:
        self.view = 0
        self.sent = 0
        # (view, destination, message), oldest first
        self.recent: deque[tuple[int, Principal, bytes]] = deque(maxlen=self.RECENT)
        self.earlier: deque[tuple[int, Principal, bytes]] = deque(maxlen=self.EARLIER)

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        view = view_of(decode_own(data))
        if view is not None and view > self.view:
            self.view = view
            keep = [item for item in self.recent if item[0] >= view]
            self.earlier.extend(item for item in self.recent if item[0] < view)
            self.recent.clear()
            self.recent.extend(keep)
        old = self._pick(destination, data)
        self.sent += 1
        self.recent.append((self.view if view is None else view, destination, data))
        return [data] if old is None else [data, old]

    def _pick(self, destination: Principal, data: bytes) -> bytes | None:
        for store in (self.earlier, self.recent):
            candidates = [raw for _, to, raw in store if to == destination and raw != data]
            if candidates:
                return candidates[self.sent % len(candidates)]
        return None


class Garbage(Behavior):
    """Along with each message, sends a malformed one, in turn: random bytes, the message
    truncated, the message with its signature corrupted, more random bytes; every 32nd is
    64 KiB of random bytes. The bytes come from SHAKE-256 over (replica, counter)."""

    name = "garbage"
    LARGE_EVERY = 32
    LARGE_BYTES = 64 * 1024
    SMALL_MAX_BYTES = 512

    def setup(self) -> None:
        self.counter = 0

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        self.counter += 1
        return [data, self.garbage(data)]

    def random_bytes(self, length: int) -> bytes:
        seed = b"pbft-sim/garbage" + self.replica_id.to_bytes(2, "big")
        return hashlib.shake_256(seed + self.counter.to_bytes(8, "big")).digest(length)

    def garbage(self, data: bytes) -> bytes:
        counter = self.counter
        if counter % self.LARGE_EVERY == 0:
            return self.random_bytes(min(self.LARGE_BYTES, MAX_FRAME_BYTES))
        variant = counter % 4
        if variant == 1 and len(data) > 1:
            return data[: len(data) // 2]
        if variant == 2 and len(data) > 1:
            # The signature is the last field: flip a bit of its last byte.
            return data[:-1] + bytes([data[-1] ^ 1])
        length = 1 + self.random_bytes(2)[0] * 2 % self.SMALL_MAX_BYTES
        return self.random_bytes(length)


class Forge(Behavior):
    """Along with each message it signs, sends a copy that claims another replica sent it
    (the sender field changed, in turn to each replica but itself and the destination),
    signed with its own key, since it holds no other. Receivers must drop every copy,
    at the latest at the signature check (bad_signature)."""

    name = "forge"

    def setup(self) -> None:
        self.counter = 0

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        message = decode_own(data)
        if message is None or message.SIGNER != "replica" or message.sender != self.replica_id:
            return [data]
        victims = [
            replica
            for replica in self.replica_ids
            if replica != self.replica_id and destination != ("replica", replica)
        ]
        if not victims:
            return [data]
        victim = victims[self.counter % len(victims)]
        self.counter += 1
        forged = replace(message, **{message.SENDER_FIELD: victim})
        return [data, seal(forged, self.key)]
