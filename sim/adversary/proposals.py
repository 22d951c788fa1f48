"""As primary: what a Byzantine replica proposes (forks, delays, rewritten batches)."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import replace
from typing import ClassVar

from crypto.keys import Principal
from pbft.chain import batch_digest, entry_digest
from pbft.codec import DecodeError
from pbft.messages import Commit, MessageType, Prepare, PrePrepare
from pbft.signed import Envelope, seal
from sim.adversary.base import Behavior, decode_own, made_up, remember, type_code_of


class Equivocate(Behavior):
    """As primary, proposes a different batch at each sequence number to the correct replicas
    on the fork side; as any replica, votes for the forked batches towards that side."""

    name = "equivocate"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
            return [data]
        message = decode_own(data)
        if isinstance(message, PrePrepare):
            forked = self._fork(message)
            return [forked if forked is not None else data]
        if isinstance(message, Prepare | Commit):
            forked_digest = self.adversary.forked_entries.get(message.entry_digest)
            if forked_digest is not None:
                vote = type(message)(message.view, message.seq, message.replica, forked_digest)
                return [seal(vote, self.key)]
        return [data]

    def _fork(self, original: PrePrepare) -> bytes | None:
        slot = (original.view, original.seq)
        known = self.adversary.forked_pre_prepares.get(slot)
        if known is not None:
            return known
        prev_hash = self.adversary.forked_entries.get(original.prev_hash, original.prev_hash)
        # Drop the last request: a valid batch that differs from the original one.
        requests = original.requests[:-1]
        if not original.requests and prev_hash == original.prev_hash:
            return None
        forked = PrePrepare(
            original.view,
            original.seq,
            original.replica,
            prev_hash,
            batch_digest(requests),
            requests,
            original.timestamp_ms,
        )
        raw = seal(forked, self.key)
        self.adversary.forked_entries[_entry_of(original)] = _entry_of(forked)
        self.adversary.forked_pre_prepares[slot] = raw
        return raw


# --- as primary: what it proposes --------------------------------------------------------


class Slow(Behavior):
    """As primary, holds back each PRE-PREPARE for `delay_ms` (default 0.8 x the cluster's
    view-change timeout): late enough to slow every payment down, early enough that the
    backups' timers (which only run once they see work) never quite expire.

    A behaviour cannot schedule anything: it only runs when the core sends a message. So
    held messages are released on a later `outgoing` call towards the same destination
    once `now_ms` has passed their release time. A primary broadcasts a heartbeat every
    heartbeat interval, under load too, so every destination gets such a call at least
    that often: a message goes out at most one heartbeat interval after its time.
    Retransmissions of a held pre-prepare are held until the first copy's release time
    (and not queued twice), so retransmitting does not get around the delay."""

    name = "slow"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("delay_ms",)

    def setup(self) -> None:
        delay = self.params.get("delay_ms")
        self.delay_ms = (
            int(delay) if delay is not None else self.config.view_change_timeout_ms * 4 // 5
        )
        # destination -> [(release time, message)] in the order they were held
        self.held: dict[Principal, list[tuple[int, bytes]]] = {}
        # digest of a pre-prepare -> when it may go out (to anyone)
        self.release_at: dict[bytes, int] = {}

    def outgoing(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        # Released whatever the window: a message held before until_ms still goes out.
        out = self._release(destination, now_ms)
        if self.active(now_ms) and type_code_of(data) == MessageType.PRE_PREPARE:
            digest = hashlib.sha256(data).digest()
            release_at = self.release_at.get(digest)
            if release_at is None:
                release_at = now_ms + self.delay_ms
                remember(self.release_at, digest, release_at)
            if now_ms < release_at:
                queue = self.held.setdefault(destination, [])
                if all(held != data for _, held in queue):
                    queue.append((release_at, data))
                return out
        out.append(data)
        return out

    def _release(self, destination: Principal, now_ms: int) -> list[bytes]:
        queue = self.held.get(destination)
        if not queue:
            return []
        due = not self.active(now_ms)
        released = [data for at, data in queue if due or at <= now_ms]
        if released:
            self.held[destination] = [(at, data) for at, data in queue if not due and at > now_ms]
        return released


class _ProposalRewriter(Behavior):
    """As primary, rewrites every PRE-PREPARE it sends, identically for every destination,
    and re-signs it as itself with a correct batch digest.

    A rewrite changes the entry digest, and the core chains its next proposal onto the
    digest it knows. So, as Equivocate does for its fork, the rewriter maps each original
    entry digest to the rewritten one and re-chains later pre-prepares (and its own
    prepares and commits) onto the rewritten entries: the backups see one consistent
    history, only not the one the core holds."""

    # Whether the rewritten entries become the chain later proposals follow. False for
    # rewrites the backups refuse anyway (then the original chain is the only one).
    rechain = True

    def setup(self) -> None:
        # original entry digest -> rewritten entry digest
        self.entries: dict[bytes, bytes] = {}
        # digest of an original pre-prepare -> what was sent instead (retransmissions match)
        self.rewritten: dict[bytes, bytes] = {}

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return [self._outgoing(data, rewrite=True)]

    def idle(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if not self.entries:
            return [data]
        return [self._outgoing(data, rewrite=False)]

    def rewrite(self, message: PrePrepare) -> PrePrepare | None:
        """The pre-prepare to send instead (prev_hash already re-chained), or None."""
        raise NotImplementedError

    def _outgoing(self, data: bytes, rewrite: bool) -> bytes:
        message = decode_own(data)
        if isinstance(message, Prepare | Commit):
            mapped = self.entries.get(message.entry_digest)
            if mapped is None:
                return data
            return seal(type(message)(message.view, message.seq, message.replica, mapped), self.key)
        if not isinstance(message, PrePrepare):
            return data
        digest = hashlib.sha256(data).digest()
        known = self.rewritten.get(digest)
        if known is not None:
            return known
        prev_hash = self.entries.get(message.prev_hash, message.prev_hash)
        chained = replace(message, prev_hash=prev_hash) if prev_hash != message.prev_hash else None
        changed = self.rewrite(chained or message) if rewrite else None
        result = changed or chained
        if result is None:
            return data
        if self.rechain:
            remember(self.entries, _entry_of(message), _entry_of(result))
        raw = seal(result, self.key)
        remember(self.rewritten, digest, raw)
        return raw


def _entry_of(message: PrePrepare) -> bytes:
    return entry_digest(message.seq, message.prev_hash, message.batch_digest, message.timestamp_ms)


def _with_requests(message: PrePrepare, requests: tuple[bytes, ...]) -> PrePrepare:
    return replace(message, batch_digest=batch_digest(requests), requests=requests)


class Censor(_ProposalRewriter):
    """As primary, never proposes the payments of client `client`: they are cut out of
    every batch (a batch of only theirs becomes a null batch). The backups see a valid,
    consistently chained history; the censored client times out, sends its request to
    every replica, the backups relay it and watch, and their timers depose the primary."""

    name = "censor"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("client",)

    def setup(self) -> None:
        super().setup()
        self.client = int(self.params.get("client", 0))

    def rewrite(self, message: PrePrepare) -> PrePrepare | None:
        kept = tuple(raw for raw in message.requests if _request_sender(raw) != self.client)
        if len(kept) == len(message.requests):
            return None
        return _with_requests(message, kept)


def _request_sender(raw: bytes) -> int | None:
    try:
        return Envelope.decode(raw).sender
    except DecodeError:
        return None


class InvalidBatch(_ProposalRewriter):
    """As primary, proposes at every sequence number a batch the backups must not accept.

    `kind`:
    - "bad_signature": the first request's client signature is corrupted (one bit);
    - "duplicate": the first request appears twice in the batch (replacing the last one
      if the batch is full);
    - "unsent": the primary cannot sign as a client, so the only request a client never
      sent that it can put in a batch is one the client sent earlier: a request from an
      earlier batch (already executed, or about to be) is included again. The backups
      accept this batch (it is well-formed, and exactly-once execution answers the replayed
      request from its stored decision), so this kind tests integrity (nothing takes effect
      twice) rather than refusal; the batches are re-chained like the censor's.
    The first two are refused by every backup, so nothing is decided until the backups'
    timers depose the primary."""

    name = "invalid_batch"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = ("bad_signature", "unsent", "duplicate")
    # How many earlier request envelopes "unsent" keeps to replay.
    REPLAYABLE = 64

    def setup(self) -> None:
        super().setup()
        self.kind = str(self.params.get("kind", "bad_signature"))
        if self.kind not in self.KINDS:
            raise ValueError(f"invalid_batch kind must be one of {self.KINDS}, got {self.kind!r}")
        self.rechain = self.kind == "unsent"
        # (seq, request envelope) of requests proposed earlier, oldest first
        self.proposed: deque[tuple[int, bytes]] = deque(maxlen=self.REPLAYABLE)

    def rewrite(self, message: PrePrepare) -> PrePrepare | None:
        requests = message.requests
        if self.kind == "unsent":
            earlier = [raw for seq, raw in self.proposed if seq < message.seq]
            self.proposed.extend((message.seq, raw) for raw in requests)
            replayed = next((raw for raw in earlier if raw not in requests), None)
            if replayed is None:
                return None
            if len(requests) >= self.config.batch_size:
                requests = requests[:-1]
            return _with_requests(message, (*requests, replayed))
        if not requests:
            return None
        if self.kind == "bad_signature":
            envelope = Envelope.decode(requests[0])
            signature = envelope.signature[:-1] + bytes([envelope.signature[-1] ^ 1])
            corrupted = replace(envelope, signature=signature).encode()
            return _with_requests(message, (corrupted, *requests[1:]))
        # duplicate
        if len(requests) >= self.config.batch_size and len(requests) > 1:
            requests = requests[:-1]
        return _with_requests(message, (*requests, requests[0]))


class BadSequence(_ProposalRewriter):
    """As primary, numbers its pre-prepares wrongly. `kind`:
    - "skip": every proposal moves up one number, so one number is never proposed and
      nothing after it can prepare (the chain rule waits for the gap);
    - "reuse": every proposal after the first takes the previous one's number, so each
      number is proposed twice (the second one is equivocation, and its chain is wrong);
    - "outside_window": every proposal is moved a whole watermark window up, beyond the
      backups' high watermark.
    The proposals are re-signed (and re-chained onto the renumbered entries)."""

    name = "bad_sequence"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = ("skip", "reuse", "outside_window")

    def setup(self) -> None:
        super().setup()
        self.kind = str(self.params.get("kind", "skip"))
        if self.kind not in self.KINDS:
            raise ValueError(f"bad_sequence kind must be one of {self.KINDS}, got {self.kind!r}")

    def rewrite(self, message: PrePrepare) -> PrePrepare | None:
        if self.kind == "skip":
            seq = message.seq + 1
        elif self.kind == "reuse":
            seq = max(1, message.seq - 1)
        else:
            seq = message.seq + self.config.watermark_window
        if seq == message.seq:
            return None
        return replace(message, seq=seq)


class BadChain(_ProposalRewriter):
    """As primary, names a wrong predecessor (prev_hash) in every pre-prepare it sends."""

    name = "bad_chain"
    rechain = False

    def rewrite(self, message: PrePrepare) -> PrePrepare | None:
        return replace(message, prev_hash=made_up(b"bad-chain", message.prev_hash))


class BadTimestamp(_ProposalRewriter):
    """As primary, lies about time in the PRE-PREPAREs it sends. `kind`:
    - "future": stamps ten times cluster.max_clock_skew_ms ahead of the truth;
    - "past": stamps as far behind it (at least 0: a lie only once the clocks have run longer
      than the bound);
    - "backwards": stamps each odd sequence number half the bound ahead of the truth and
      leaves the even ones true, so every even batch is stamped before the batch below it
      (each stamp within the bound of the backups' clocks: only the order gives it away).
    The batches are re-chained onto the rewritten entries (like the censor's), so the stamp
    is the only lie. The backups refuse each rewritten batch they can tell is wrong
    (`bad_timestamp`); a stamp the bound allows is accepted ("past" early in a run, the odd
    batches of "backwards"). Once one is refused, nothing is decided until the backups'
    timers depose the primary."""

    name = "bad_timestamp"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = ("future", "past", "backwards")

    def setup(self) -> None:
        super().setup()
        self.kind = str(self.params.get("kind", "future"))
        if self.kind not in self.KINDS:
            raise ValueError(f"bad_timestamp kind must be one of {self.KINDS}, got {self.kind!r}")
        self.offset_ms = 10 * self.config.max_clock_skew_ms

    def rewrite(self, message: PrePrepare) -> PrePrepare | None:
        if self.kind == "future":
            stamp = message.timestamp_ms + self.offset_ms
        elif self.kind == "past":
            stamp = max(0, message.timestamp_ms - self.offset_ms)
        elif message.seq % 2 == 1:
            stamp = message.timestamp_ms + self.config.max_clock_skew_ms // 2
        else:
            return None
        if stamp == message.timestamp_ms:
            return None
        return replace(message, timestamp_ms=stamp)
