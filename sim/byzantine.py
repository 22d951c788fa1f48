"""Byzantine replicas: wrappers that rewrite, withhold or duplicate a replica's outgoing messages.

A Byzantine replica runs the unmodified core; its behaviour sits between the core
and the network. It holds only its own signing key, so it can sign anything as
itself and nothing as anyone else. Behaviours in one simulation share an
`Adversary`, so several Byzantine replicas can collude (split the correct
replicas the same way, vote for the same forked batches).

Every behaviour is deterministic: it reads no clock but the `now_ms` it is given and
draws no random numbers; what looks random (a made-up digest, garbage bytes) is a
hash of its inputs. Memory is bounded whatever the run length.

A behaviour acts only in its window [at_ms, until_ms) of simulated time; outside it
the replica's messages go out as the core wrote them (`idle`). Two exceptions keep a
replica that stopped lying consistent with what it already said: `slow` still releases
what it held back, and the proposal rewriters keep chaining new pre-prepares (and
votes) onto the entries they rewrote, rather than onto entries nobody ever saw.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar

from crypto.keys import Principal, SigningKey
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.codec import MAX_FRAME_BYTES, DecodeError
from pbft.config import ClusterConfig
from pbft.ledger import Outcome, Reason
from pbft.messages import (
    MESSAGE_CLASSES,
    CheckpointState,
    Commit,
    Message,
    MessageType,
    Prepare,
    PrePrepare,
    Reply,
    ViewChange,
)
from pbft.signed import Envelope, seal

# Most entries a behaviour remembers in one table (rewritten proposals, digest maps):
# enough for several watermark windows, never more whatever the run length.
MEMORY_LIMIT = 4096

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class Adversary:
    """What colluding Byzantine replicas share: who sees which fork, and the forks made."""

    # Correct replicas that are shown the forked history ("side B"); the rest see the original.
    fork_side: frozenset[int]
    # Original entry digest -> forked entry digest, so votes and later entries follow the fork.
    forked_entries: dict[bytes, bytes] = field(default_factory=dict)
    forked_pre_prepares: dict[tuple[int, int], bytes] = field(default_factory=dict)

    @classmethod
    def for_cluster(cls, replica_count: int, byzantine: frozenset[int]) -> Adversary:
        correct = [replica for replica in range(replica_count) if replica not in byzantine]
        return cls(frozenset(correct[len(correct) // 2 :]))


def _decode(data: bytes) -> Message | None:
    """Read our own outgoing message; no signature check is needed for what we signed."""
    try:
        envelope = Envelope.decode(data)
        return MESSAGE_CLASSES[MessageType(envelope.type_code)].decode(envelope.body)
    except (DecodeError, ValueError, KeyError):
        return None


def _type_code(data: bytes) -> int | None:
    try:
        return Envelope.decode(data).type_code
    except DecodeError:
        return None


def _remember(table: dict[K, V], key: K, value: V) -> None:
    """Insert into a bounded table, forgetting the oldest entry when it is full."""
    table[key] = value
    while len(table) > MEMORY_LIMIT:
        del table[next(iter(table))]


def _made_up(tag: bytes, *parts: bytes | int) -> bytes:
    """A random-looking 32-byte digest that is a pure function of its inputs."""
    hasher = hashlib.sha256(b"pbft-sim/byzantine/" + tag)
    for part in parts:
        hasher.update(part.to_bytes(8, "big") if isinstance(part, int) else part)
    return hasher.digest()


def _view_of(message: Message | None) -> int | None:
    if isinstance(message, ViewChange):
        return message.new_view
    view = getattr(message, "view", None)
    return view if isinstance(view, int) else None


class Behavior:
    """Correct behaviour; subclasses override `act` (inside the window) and maybe `idle`."""

    name = "correct"

    def __init__(
        self,
        replica_id: int,
        key: SigningKey,
        adversary: Adversary,
        *,
        config: ClusterConfig | None = None,
        replica_ids: Sequence[int] | None = None,
        params: Mapping[str, int | str] | None = None,
        at_ms: int = 0,
        until_ms: int | None = None,
        genesis_ledger_digest: bytes | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.key = key
        self.adversary = adversary
        self.config = config if config is not None else ClusterConfig()
        self.replica_ids = (
            tuple(replica_ids) if replica_ids is not None else tuple(self.config.replica_ids())
        )
        self.params = dict(params or {})
        self.at_ms = at_ms
        self.until_ms = until_ms
        self.genesis_ledger_digest = genesis_ledger_digest
        self.setup()

    def setup(self) -> None:
        """Per-behaviour state and parameters; called once the common fields are set."""

    def active(self, now_ms: int) -> bool:
        return now_ms >= self.at_ms and (self.until_ms is None or now_ms < self.until_ms)

    def outgoing(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        """The messages actually sent to `destination` in place of `data`."""
        if self.active(now_ms):
            return self.act(destination, data, now_ms)
        return self.idle(destination, data, now_ms)

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return [data]

    def idle(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return [data]


class Silent(Behavior):
    """Sends nothing at all, to anyone: a replica that is up but mute."""

    name = "silent"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return []


class Equivocate(Behavior):
    """As primary, proposes a different batch at each sequence number to the correct replicas
    on the fork side; as any replica, votes for the forked batches towards that side."""

    name = "equivocate"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
            return [data]
        message = _decode(data)
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
        )
        raw = seal(forked, self.key)
        original_entry = entry_digest(original.seq, original.prev_hash, original.batch_digest)
        self.adversary.forked_entries[original_entry] = entry_digest(
            forked.seq, forked.prev_hash, forked.batch_digest
        )
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
        if self.active(now_ms) and _type_code(data) == MessageType.PRE_PREPARE:
            digest = hashlib.sha256(data).digest()
            release_at = self.release_at.get(digest)
            if release_at is None:
                release_at = now_ms + self.delay_ms
                _remember(self.release_at, digest, release_at)
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
        message = _decode(data)
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
            original = entry_digest(message.seq, message.prev_hash, message.batch_digest)
            _remember(
                self.entries,
                original,
                entry_digest(result.seq, result.prev_hash, result.batch_digest),
            )
        raw = seal(result, self.key)
        _remember(self.rewritten, digest, raw)
        return raw


def _with_requests(message: PrePrepare, requests: tuple[bytes, ...]) -> PrePrepare:
    return replace(message, batch_digest=batch_digest(requests), requests=requests)


class Censor(_ProposalRewriter):
    """As primary, never proposes the payments of client `client`: they are cut out of
    every batch (a batch of only theirs becomes a null batch). The backups see a valid,
    consistently chained history; the censored client times out, sends its request to
    every replica, the backups relay it and watch, and their timers depose the primary."""

    name = "censor"

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
        return replace(message, prev_hash=_made_up(b"bad-chain", message.prev_hash))


# --- as backup: how it votes -------------------------------------------------------------


class DoubleVote(Behavior):
    """Sends conflicting PREPAREs and COMMITs: the real vote to one half of the correct
    replicas, a vote for a made-up digest (a hash of the real one) to the other half
    (the Adversary's fork side, so colluders split the replicas the same way)."""

    name = "double_vote"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
            return [data]
        message = _decode(data)
        if not isinstance(message, Prepare | Commit):
            return [data]
        fake = _made_up(b"double-vote", message.entry_digest)
        return [seal(type(message)(message.view, message.seq, message.replica, fake), self.key)]


class VoteWithoutProposal(Behavior):
    """Whenever it sends a vote at (view, seq), also sends a PREPARE and a COMMIT for each of
    seq + 1 .. seq + 3, for made-up digests of entries nobody proposed."""

    name = "vote_without_proposal"
    AHEAD = 3

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        message = _decode(data)
        if not isinstance(message, Prepare | Commit):
            return [data]
        out = [data]
        for seq in range(message.seq + 1, message.seq + 1 + self.AHEAD):
            digest = _made_up(b"phantom", message.view, seq)
            for kind in (Prepare, Commit):
                out.append(seal(kind(message.view, seq, message.replica, digest), self.key))
        return out


class WithholdVotes(Behavior):
    """Never sends a PREPARE or a COMMIT; everything else goes out as the core wrote it."""

    name = "withhold_votes"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if _type_code(data) in (MessageType.PREPARE, MessageType.COMMIT):
            return []
        return [data]


# --- towards clients ---------------------------------------------------------------------


class WrongReply(Behavior):
    """Every REPLY it sends a client carries the opposite outcome (confirmed becomes
    rejected for insufficient_funds; any rejection becomes confirmed), signed as itself."""

    name = "wrong_reply"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        message = _decode(data)
        if not isinstance(message, Reply):
            return [data]
        return [seal(flip_reply(message), self.key)]


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
        view = _view_of(_decode(data))
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


class ViewChangeSpam(Behavior):
    """Each time it sends a replica anything (at most once per 50 ms per replica), also
    sends it VIEW-CHANGE messages, signed as itself, for an absurd view (2**61) and for
    the next three views. They are well-formed and valid: they cite the highest checkpoint
    this replica has proven in its own messages (a view change or a state transfer it
    sent), else the genesis, and claim nothing prepared."""

    name = "view_change_spam"
    ABSURD_VIEW = 2**61
    INTERVAL_MS = 50
    AHEAD = 3

    def setup(self) -> None:
        self.view = 0
        self.last_spam_ms: dict[int, int] = {}
        # (seq, chain hash, ledger digest, proof) of the best checkpoint we can prove
        self.checkpoint: tuple[int, bytes, bytes, tuple[bytes, ...]] | None = None
        if self.genesis_ledger_digest is not None:
            digest = self.genesis_ledger_digest
            self.checkpoint = (0, genesis_hash(digest), digest, ())
        self.spam: tuple[tuple[int, int], list[bytes]] | None = None

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        self._learn(_decode(data))
        out = [data]
        if destination[0] != "replica" or self.checkpoint is None:
            return out
        last = self.last_spam_ms.get(destination[1])
        if last is not None and now_ms - last < self.INTERVAL_MS:
            return out
        self.last_spam_ms[destination[1]] = now_ms
        out.extend(self._messages())
        return out

    def _learn(self, message: Message | None) -> None:
        view = _view_of(message)
        if view is not None and view < self.ABSURD_VIEW:
            self.view = max(self.view, view)
        claim: tuple[int, bytes, bytes, tuple[bytes, ...]] | None = None
        if isinstance(message, ViewChange):
            claim = (
                message.checkpoint_seq,
                message.checkpoint_chain_hash,
                message.checkpoint_ledger_digest,
                message.checkpoint_proof,
            )
        elif isinstance(message, CheckpointState):
            claim = (message.seq, message.chain_hash, message.ledger_digest, message.proof)
        if claim is not None and (self.checkpoint is None or claim[0] > self.checkpoint[0]):
            self.checkpoint = claim

    def _messages(self) -> list[bytes]:
        checkpoint = self.checkpoint
        if checkpoint is None:
            return []
        key = (self.view, checkpoint[0])
        if self.spam is not None and self.spam[0] == key:
            return self.spam[1]
        views = [self.ABSURD_VIEW, *range(self.view + 1, self.view + 1 + self.AHEAD)]
        messages = [
            seal(ViewChange(view, self.replica_id, *checkpoint, ()), self.key) for view in views
        ]
        self.spam = (key, messages)
        return messages


BEHAVIORS: dict[str, type[Behavior]] = {
    behavior.name: behavior
    for behavior in (
        Silent,
        Equivocate,
        Slow,
        Censor,
        InvalidBatch,
        BadSequence,
        BadChain,
        DoubleVote,
        VoteWithoutProposal,
        WithholdVotes,
        WrongReply,
        Replay,
        Garbage,
        ViewChangeSpam,
    )
}


def build_behavior(
    behavior: str,
    replica_id: int,
    key: SigningKey,
    adversary: Adversary,
    *,
    config: ClusterConfig,
    params: Mapping[str, int | str] | None = None,
    at_ms: int = 0,
    until_ms: int | None = None,
    genesis_ledger_digest: bytes | None = None,
) -> Behavior:
    """The behaviour of one [[byzantine]] entry of a scenario."""
    factory: Callable[..., Behavior] = BEHAVIORS[behavior]
    return factory(
        replica_id,
        key,
        adversary,
        config=config,
        replica_ids=tuple(config.replica_ids()),
        params=params,
        at_ms=at_ms,
        until_ms=until_ms,
        genesis_ledger_digest=genesis_ledger_digest,
    )
