"""Byzantine replicas and clients: wrappers that rewrite, withhold or duplicate what an
unmodified core sends.

A Byzantine replica runs the unmodified core; its behaviour sits between the core
and the network. It holds only its own signing key, so it can sign anything as
itself and nothing as anyone else. Behaviours in one simulation share an
`Adversary`, so several Byzantine replicas can collude (split the correct
replicas the same way, vote for the same forked batches). `twin` is the exception
that rewrites nothing: the simulator runs a second copy of the replica with the same
key and splits the network between the copies (`Twins`).

A Byzantine client (`ClientBehavior`) wraps the actions of an unmodified client core
the same way: it holds only its own key, so what it adds are requests it signed.

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

from crypto.keys import KeyRing, Principal, SigningKey
from pbft.certificates import Verifier
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.client import ClientAction, Decided
from pbft.codec import MAX_FRAME_BYTES, DecodeError
from pbft.config import ClusterConfig
from pbft.events import Send
from pbft.ledger import Account, Outcome, Reason
from pbft.messages import (
    MESSAGE_CLASSES,
    Checkpoint,
    CheckpointState,
    Commit,
    Heartbeat,
    Message,
    MessageType,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Reply,
    Request,
    StateChunk,
    ViewChange,
)
from pbft.signed import Envelope, Rejected, seal
from pbft.viewchange import plan_new_view, verify_view_change

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
    """Correct behaviour; subclasses override `act` (inside the window) and maybe `idle`.

    A subclass names itself (`name`), the parameters a scenario entry may give it besides
    replica, behavior, at_ms and until_ms (`PARAMETERS`), and, if it takes `kind`, its
    kinds, the first one the default (`KINDS`). The scenario loader (sim/scenario.py) and
    the fuzzer read them from the registry below: this is their one source."""

    name = "correct"
    PARAMETERS: ClassVar[tuple[str, ...]] = ()

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
        keyring: KeyRing | None = None,
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
        # The cluster's public keys (everyone has them): to check what it builds as others would.
        self.keyring = keyring
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
    rejected for insufficient_funds; any rejection becomes confirmed), signed as itself.
    It keeps the cluster id its core put in: a reply naming another cluster would only be
    dropped by the client, so this is the stronger lie."""

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
        elif isinstance(message, CheckpointState | StateChunk):
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


# --- view change, checkpoints and identity ------------------------------------------------


class _RewriteOnce(Behavior):
    """Rewrites every message of one type identically, whoever it goes to, remembering each
    rewrite by the original's digest so retransmissions carry the same lie."""

    TYPE: ClassVar[MessageType]

    def setup(self) -> None:
        # digest of an original message -> what was sent instead (bounded)
        self.rewritten: dict[bytes, bytes] = {}
        # how many distinct messages were rewritten (a rewrite may be a no-op)
        self.lies = 0

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if _type_code(data) != self.TYPE:
            return [data]
        digest = hashlib.sha256(data).digest()
        known = self.rewritten.get(digest)
        if known is None:
            message = _decode(data)
            lie = self.lie(message) if message is not None else None
            known = seal(lie, self.key) if lie is not None else data
            if lie is not None:
                self.lies += 1
            _remember(self.rewritten, digest, known)
        return [known]

    def lie(self, message: Message) -> Message | None:
        """What to send instead, signed as itself by the caller; None: the original."""
        raise NotImplementedError


def _pre_prepare_of(certificate: PreparedCertificate) -> PrePrepare | None:
    message = _decode(certificate.pre_prepare)
    return message if isinstance(message, PrePrepare) else None


class LieInViewChange(_RewriteOnce):
    """Lies in its own VIEW-CHANGE messages (signed as itself, so they verify). `kind`:
    - "omit_prepared": claims it prepared nothing (drops its prepared certificates);
    - "stale_checkpoint": cites the genesis instead of its stable checkpoint (keeping only the
      certificates that fit the genesis window, or the view change would be refused at once);
    - "forge_certificate": adds a prepared certificate it cannot have: a null batch at the
      next free sequence number, its pre-prepare claiming the previous view's primary and its
      2f prepares claiming that view's backups, every one signed with its own key. Valid
      only where it was itself the signer it claims to be, so receivers must refuse the whole
      view change (bad_signature or bad_certificate)."""

    name = "lie_in_view_change"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    TYPE = MessageType.VIEW_CHANGE
    KINDS: ClassVar[tuple[str, ...]] = ("omit_prepared", "stale_checkpoint", "forge_certificate")

    def setup(self) -> None:
        super().setup()
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(
                f"lie_in_view_change kind must be one of {self.KINDS}, got {self.kind!r}"
            )

    def lie(self, message: Message) -> Message | None:
        if not isinstance(message, ViewChange) or message.replica != self.replica_id:
            return None
        if self.kind == "omit_prepared":
            return replace(message, prepared=()) if message.prepared else None
        if self.kind == "stale_checkpoint":
            digest = self.genesis_ledger_digest
            if message.checkpoint_seq == 0 or digest is None:
                return None
            window = self.config.watermark_window
            kept = tuple(
                certificate
                for certificate in message.prepared
                if (pre_prepare := _pre_prepare_of(certificate)) is not None
                and 0 < pre_prepare.seq <= window
            )
            return replace(
                message,
                checkpoint_seq=0,
                checkpoint_chain_hash=genesis_hash(digest),
                checkpoint_ledger_digest=digest,
                checkpoint_proof=(),
                prepared=kept,
            )
        return replace(message, prepared=self._with_forged_certificate(message))

    def _with_forged_certificate(self, message: ViewChange) -> tuple[PreparedCertificate, ...]:
        certificates = list(message.prepared)
        seqs = [
            pre_prepare.seq
            for certificate in certificates
            if (pre_prepare := _pre_prepare_of(certificate)) is not None
        ]
        high = message.checkpoint_seq + self.config.watermark_window
        seq = max(seqs, default=message.checkpoint_seq) + 1
        if seq > high:
            # The window is full: the forged certificate replaces the last real one.
            seq = high
            certificates = [
                certificate
                for certificate, real_seq in zip(certificates, seqs, strict=True)
                if real_seq != seq
            ]
        view = max(0, message.new_view - 1)
        primary = self.config.primary_of(view)
        prev_hash = _made_up(b"forged-certificate", message.new_view, seq)
        pre_prepare = PrePrepare(view, seq, primary, prev_hash, batch_digest(()), ())
        digest = entry_digest(seq, prev_hash, pre_prepare.batch_digest)
        backups = [replica for replica in self.replica_ids if replica != primary]
        prepares = tuple(
            seal(Prepare(view, seq, backup, digest), self.key)
            for backup in backups[: self.config.prepare_quorum]
        )
        forged = PreparedCertificate(seal(pre_prepare, self.key), prepares)
        return (*certificates, forged)


class BadNewView(Behavior):
    """As the new primary, sends a NEW-VIEW that is not the one the view changes call for,
    re-signed as itself. `kind`:
    - "omit_prepared": the first re-proposal of a prepared batch becomes a null batch;
    - "invent": the first null re-proposal gets a real batch (requests it saw earlier), or,
      with no null entry, one more entry with such a batch is appended;
    - "few_view_changes": it cites only 2f view changes instead of 2f + 1;
    - "split": the backups on the Adversary's fork side get another NEW-VIEW, equally
      valid: its own view change replaced by a second one that claims nothing prepared, and
      the re-proposals recomputed from that set (identical to the first when its own view
      change added nothing the others lacked). Needs the cluster's public keys;
    - "refork": the NEW-VIEW itself is honest, but with every HEARTBEAT afterwards the
      primary offers each backup a different batch (the last request dropped) at every
      sequence number that NEW-VIEW assigned, chained like the original, and its COMMITs
      there vote for the fork. A correct replica holds the NEW-VIEW's assignment (also
      after a restart) and refuses them all.
    Later entries and votes are sent as the core wrote them (chained on its own NEW-VIEW)."""

    name = "bad_new_view"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = (
        "omit_prepared",
        "invent",
        "few_view_changes",
        "split",
        "refork",
    )
    # refork: at most this many forked PRE-PREPAREs ride along with one heartbeat.
    REFORKS_PER_HEARTBEAT = 8
    # Request envelopes it remembers (from requests it relayed and pre-prepares it sent).
    REQUESTS = 64

    def setup(self) -> None:
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(f"bad_new_view kind must be one of {self.KINDS}, got {self.kind!r}")
        self.requests: deque[bytes] = deque(maxlen=self.REQUESTS)
        # (digest of the original NEW-VIEW, side) -> what was sent instead
        self.rewritten: dict[tuple[bytes, int], bytes] = {}
        self.lies = 0
        # split: how many second NEW-VIEWs re-proposed something else than the first
        self.split_plans_differ = 0
        # refork: the forked re-proposals of the latest NEW-VIEW this replica sent.
        self.reforks: list[tuple[int, bytes]] = []
        self.refork_view = -1
        self.refork_turn = 0
        self.verifier: Verifier | None = None
        if self.keyring is not None and self.genesis_ledger_digest is not None:
            self.verifier = Verifier(self.config, self.keyring, self.genesis_ledger_digest)

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        code = _type_code(data)
        if code == MessageType.REQUEST:
            self._learn((data,))
            return [data]
        if code == MessageType.PRE_PREPARE:
            message = _decode(data)
            if isinstance(message, PrePrepare):
                self._learn(message.requests)
            return [data]
        if self.kind == "refork":
            return self._refork(destination, code, data)
        if code != MessageType.NEW_VIEW:
            return [data]
        side = 0
        if self.kind == "split":
            if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
                return [data]
            side = 1
        key = (hashlib.sha256(data).digest(), side)
        known = self.rewritten.get(key)
        if known is None:
            message = _decode(data)
            lie = self.lie(message) if isinstance(message, NewView) else None
            known = seal(lie, self.key) if lie is not None else data
            if lie is not None:
                self.lies += 1
            _remember(self.rewritten, key, known)
        return [known]

    def _refork(self, destination: Principal, code: int | None, data: bytes) -> list[bytes]:
        if code == MessageType.NEW_VIEW:
            message = _decode(data)
            if (
                isinstance(message, NewView)
                and message.replica == self.replica_id
                and message.view > self.refork_view
            ):
                self.refork_view = message.view
                self.reforks = []
                self.refork_digests: dict[int, bytes] = {}
                for raw in message.pre_prepares:
                    original = _decode(raw)
                    if not isinstance(original, PrePrepare) or not original.requests:
                        continue
                    requests = original.requests[:-1]
                    forked = replace(
                        original, batch_digest=batch_digest(requests), requests=requests
                    )
                    self.reforks.append((forked.seq, seal(forked, self.key)))
                    self.refork_digests[forked.seq] = entry_digest(
                        forked.seq, forked.prev_hash, forked.batch_digest
                    )
            return [data]
        if code == MessageType.COMMIT and destination[0] == "replica":
            vote = _decode(data)
            if isinstance(vote, Commit) and vote.view == self.refork_view:
                forked_digest = self.refork_digests.get(vote.seq)
                if forked_digest is not None:
                    return [seal(replace(vote, entry_digest=forked_digest), self.key)]
        if code == MessageType.HEARTBEAT and destination[0] == "replica":
            message = _decode(data)
            if isinstance(message, Heartbeat) and message.view == self.refork_view:
                # The forks past what is executed, a few per heartbeat, taking turns.
                open_forks = [raw for seq, raw in self.reforks if seq > message.last_executed]
                if not open_forks:
                    return [data]
                start = self.refork_turn % len(open_forks)
                self.refork_turn += 1
                chosen = (open_forks[start:] + open_forks[:start])[: self.REFORKS_PER_HEARTBEAT]
                return [data, *chosen]
        return [data]

    def _learn(self, requests: Sequence[bytes]) -> None:
        for raw in requests:
            if raw not in self.requests:
                self.requests.append(raw)

    def lie(self, message: NewView) -> NewView | None:
        if message.replica != self.replica_id:
            return None
        if self.kind == "few_view_changes":
            kept = message.view_changes[: self.config.quorum - 1]
            return replace(message, view_changes=kept)
        if self.kind == "split":
            return self._second_new_view(message)
        low_hash, proposals = self._planned(message)
        if low_hash is None:
            return None
        entries = [(proposal.seq, proposal.requests) for proposal in proposals]
        if self.kind == "omit_prepared":
            index = next((i for i, (_, requests) in enumerate(entries) if requests), None)
            if index is None:
                return None
            entries[index] = (entries[index][0], ())
        else:  # invent
            invented = self._invented_batch()
            index = next((i for i, (_, requests) in enumerate(entries) if not requests), None)
            if index is not None and invented:
                entries[index] = (entries[index][0], invented)
            else:
                low_seq = self._low_seq(message)
                last = entries[-1][0] if entries else low_seq
                entries.append((last + 1, invented))
        return replace(message, pre_prepares=self._chain(message.view, low_hash, entries))

    def _invented_batch(self) -> tuple[bytes, ...]:
        chosen: dict[tuple[int, int], bytes] = {}
        for raw in self.requests:
            request = _decode(raw)
            if isinstance(request, Request):
                chosen.setdefault((request.client_id, request.request_id), raw)
            if len(chosen) >= self.config.batch_size:
                break
        return tuple(chosen.values())

    def _view_changes(self, message: NewView) -> list[ViewChange]:
        changes = [_decode(raw) for raw in message.view_changes]
        return [change for change in changes if isinstance(change, ViewChange)]

    def _low_seq(self, message: NewView) -> int:
        return max((change.checkpoint_seq for change in self._view_changes(message)), default=0)

    def _planned(self, message: NewView) -> tuple[bytes | None, list[PrePrepare]]:
        """The chain hash the re-proposals start from, and the re-proposals."""
        changes = sorted(self._view_changes(message), key=lambda change: change.replica)
        if not changes:
            return None, []
        anchor = max(changes, key=lambda change: change.checkpoint_seq)
        proposals = [_decode(raw) for raw in message.pre_prepares]
        return anchor.checkpoint_chain_hash, [
            proposal for proposal in proposals if isinstance(proposal, PrePrepare)
        ]

    def _chain(
        self, view: int, prev_hash: bytes, entries: list[tuple[int, tuple[bytes, ...]]]
    ) -> tuple[bytes, ...]:
        out = []
        for seq, requests in entries:
            digest = batch_digest(requests)
            proposal = PrePrepare(view, seq, self.replica_id, prev_hash, digest, requests)
            out.append(seal(proposal, self.key))
            prev_hash = entry_digest(seq, prev_hash, digest)
        return tuple(out)

    def _claim_less(self, change: ViewChange) -> ViewChange:
        """Its own view change without its prepared certificates, or, if it had none, citing
        the genesis: either way a different, valid view change for the same view."""
        digest = self.genesis_ledger_digest
        if change.prepared or change.checkpoint_seq == 0 or digest is None:
            return replace(change, prepared=())
        return replace(
            change,
            checkpoint_seq=0,
            checkpoint_chain_hash=genesis_hash(digest),
            checkpoint_ledger_digest=digest,
            checkpoint_proof=(),
        )

    def _second_new_view(self, message: NewView) -> NewView | None:
        verifier = self.verifier
        if verifier is None:
            return None
        raws = []
        for raw in message.view_changes:
            change = _decode(raw)
            if isinstance(change, ViewChange) and change.replica == self.replica_id:
                # A second view change of its own for the same view: valid, claims less.
                raw = seal(self._claim_less(change), self.key)
            raws.append(raw)
        try:
            changes = [verify_view_change(raw, verifier) for raw in raws]
        except Rejected:
            return None
        plan = plan_new_view(message.view, changes)
        entries = [(entry.seq, entry.requests) for entry in plan.entries]
        pre_prepares = self._chain(message.view, plan.checkpoint.chain_hash, entries)
        if pre_prepares != message.pre_prepares:
            self.split_plans_differ += 1
        return replace(message, view_changes=tuple(raws), pre_prepares=pre_prepares)


class BadCheckpoint(_RewriteOnce):
    """Every CHECKPOINT it sends names a wrong ledger digest (its chain hash is right): a vote
    for a state no correct replica has, which must never count towards a stable checkpoint."""

    name = "bad_checkpoint"
    TYPE = MessageType.CHECKPOINT

    def lie(self, message: Message) -> Message | None:
        if not isinstance(message, Checkpoint):
            return None
        wrong = _made_up(b"bad-checkpoint", message.ledger_digest)
        return replace(message, ledger_digest=wrong)


class Forge(Behavior):
    """Along with each message it signs, sends a copy that claims another replica sent it
    (the sender field changed, in turn to each replica but itself and the destination),
    signed with its own key, since it holds no other. Receivers must drop every copy,
    at the latest at the signature check (bad_signature)."""

    name = "forge"

    def setup(self) -> None:
        self.counter = 0

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        message = _decode(data)
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


class Twin(Behavior):
    """Twins: a second copy of the replica runs with the same key, and each copy sees only
    part of the network (see `Twins`). The copies run the unmodified core and send what it
    writes; the simulator does the splitting, so this wrapper changes nothing."""

    name = "twin"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("groups",)


@dataclass(frozen=True)
class Twins:
    """Who talks with which copy of a twinned replica.

    `groups[r] = (A, B)`: copy 0 of replica r talks only with the replicas in A, copy 1
    only with those in B. A message from another replica s to r reaches the copy whose
    group holds s (none if neither does). Two twinned replicas pair up by copy: copy 0
    with copy 0, copy 1 with copy 1 (colluders, each pair one side of the split).
    Clients reach both copies and hear from both."""

    groups: Mapping[int, tuple[frozenset[int], frozenset[int]]]

    COPIES: ClassVar[tuple[int, int]] = (0, 1)

    def receivers(self, source: Principal, copy: int, destination: Principal) -> tuple[int, ...]:
        """The copies of `destination` that a message from `source`'s copy `copy` reaches."""
        if destination[0] != "replica":
            return (0,)
        target = self.groups.get(destination[1])
        if source[0] != "replica":
            return self.COPIES if target is not None else (0,)
        origin = self.groups.get(source[1])
        if origin is not None and target is not None:
            return (copy,)
        if origin is not None:
            return (0,) if destination[1] in origin[copy] else ()
        if target is not None:
            return tuple(side for side in self.COPIES if source[1] in target[side])
        return (0,)


# --- Byzantine clients ---------------------------------------------------------------------


class ClientBehavior:
    """A Byzantine client: rewrites the actions of an unmodified client core (its sends, and
    its decisions, which it may react to). It holds only its own key: anything new it sends
    is a Request sealed by itself. Deterministic and bounded like the replica behaviours."""

    name = "correct"
    PARAMETERS: ClassVar[tuple[str, ...]] = ()  # as Behavior's
    # Request ids the client core never uses (the workload numbers from 1 up).
    OWN_ID_BASE = 1 << 40

    def __init__(
        self,
        client_id: int,
        key: SigningKey,
        *,
        config: ClusterConfig,
        accounts: Mapping[str, Account],
        params: Mapping[str, int | str] | None = None,
        at_ms: int = 0,
        until_ms: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.key = key
        self.config = config
        self.accounts = dict(accounts)
        self.params = dict(params or {})
        self.at_ms = at_ms
        self.until_ms = until_ms
        # request id -> the request the core first sent under it (the submitted body)
        self.originals: dict[int, Request] = {}
        # (request id, digest) of every extra request it sent, for tests and reports
        self.extra: dict[tuple[int, bytes], None] = {}
        self.setup()

    def setup(self) -> None:
        """Per-behaviour state and parameters."""

    def active(self, now_ms: int) -> bool:
        return now_ms >= self.at_ms and (self.until_ms is None or now_ms < self.until_ms)

    def actions(self, actions: Sequence[ClientAction], now_ms: int) -> list[ClientAction]:
        out: list[ClientAction] = []
        for action in actions:
            out.append(action)
            if isinstance(action, Decided):
                if self.active(now_ms):
                    out.extend(self.on_decided(action))
                continue
            request = _decode(action.data)
            if not isinstance(request, Request) or request.request_id in self.originals:
                continue
            _remember(self.originals, request.request_id, request)
            if self.active(now_ms):
                out.extend(self.on_new_request(action, request))
        return out

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        """Called when the core first sends a request."""
        return []

    def on_decided(self, decided: Decided) -> list[ClientAction]:
        """Called when the core has a decision (a receipt) for one of its requests."""
        return []

    def sealed(self, request: Request) -> bytes:
        raw = seal(request, self.key)
        _remember(self.extra, (request.request_id, hashlib.sha256(request.encode()).digest()), None)
        return raw

    def to_replicas(self, raw: bytes, replicas: Sequence[int] | None = None) -> list[ClientAction]:
        targets = self.config.replica_ids() if replicas is None else replicas
        return [Send(("replica", replica), raw) for replica in targets]


class ReuseRequestId(ClientBehavior):
    """Sends other payments under the id of one it submitted, a different one to each half
    of the replicas (same payer, another payee or amount), signed as itself. `kind`:
    - "after_decision": once the original is decided. Every correct replica must refuse
      both as id_reused (never execute them); the original's receipt stands;
    - "concurrent": at the moment the original goes out (to the primary), the others go to
      the backups, which relay them: the bodies race. The others ask for more than all the
      money there is, so whichever body is ordered first, nothing but the original can be
      confirmed; if another body wins, the original is refused as id_reused."""

    name = "reuse_request_id"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = ("after_decision", "concurrent")

    def setup(self) -> None:
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(
                f"reuse_request_id kind must be one of {self.KINDS}, got {self.kind!r}"
            )
        self.total = sum(account.balance for account in self.accounts.values())

    def _others(self, original: Request, concurrent: bool) -> list[Request]:
        names = sorted(self.accounts)
        others = []
        for index in range(2):
            payees = [name for name in names if name not in (original.payer, original.payee)]
            payee = payees[index % len(payees)] if payees else original.payee
            amount = self.total + 1 + index if concurrent else original.amount + 1 + index
            others.append(replace(original, payee=payee, amount=amount))
        return others

    def _halves(self, replicas: Sequence[int]) -> tuple[list[int], list[int]]:
        middle = (len(replicas) + 1) // 2
        return list(replicas[:middle]), list(replicas[middle:])

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        if self.kind != "concurrent":
            return []
        backups = [replica for replica in self.config.replica_ids() if send.to[1] != replica]
        first, second = self._halves(backups)
        out: list[ClientAction] = []
        for other, half in zip(self._others(request, True), (first, second), strict=True):
            out.extend(self.to_replicas(self.sealed(other), half))
        return out

    def on_decided(self, decided: Decided) -> list[ClientAction]:
        original = self.originals.get(decided.request_id)
        if self.kind != "after_decision" or original is None:
            return []
        first, second = self._halves(list(self.config.replica_ids()))
        out: list[ClientAction] = []
        for other, half in zip(self._others(original, False), (first, second), strict=True):
            out.extend(self.to_replicas(self.sealed(other), half))
        return out


class ClientReplay(ClientBehavior):
    """With each new request, sends every replica one of its own earlier requests again,
    byte for byte, in turn from the last 32 it sent. Replicas must answer from what they
    decided (or order it and find it decided): nothing takes effect twice."""

    name = "replay"
    REMEMBERED = 32

    def setup(self) -> None:
        self.sent: deque[bytes] = deque(maxlen=self.REMEMBERED)
        self.replayed = 0

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        out: list[ClientAction] = []
        if self.sent:
            old = self.sent[self.replayed % len(self.sent)]
            self.replayed += 1
            out = self.to_replicas(old)
        self.sent.append(send.data)
        return out


class Steal(ClientBehavior):
    """With each new request, also sends every replica a payment out of an account it does
    not own (in turn, each other client's accounts) into one of its own (or any other),
    under a request id of its own that the workload never uses, signed as itself. Each must
    be refused as unauthorized by every correct replica."""

    name = "steal"

    def setup(self) -> None:
        names = sorted(self.accounts)
        self.victims = [name for name in names if self.accounts[name].owner != self.client_id]
        self.own = [name for name in names if self.accounts[name].owner == self.client_id]
        self.stolen = 0

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        if not self.victims:
            return []
        payer = self.victims[self.stolen % len(self.victims)]
        payees = [name for name in self.own or sorted(self.accounts) if name != payer]
        if not payees:
            return []
        payee = payees[self.stolen % len(payees)]
        amount = 1 + self.stolen % 10
        theft = Request(self.client_id, self.OWN_ID_BASE + self.stolen, payer, payee, amount)
        self.stolen += 1
        return self.to_replicas(self.sealed(theft))


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
        LieInViewChange,
        BadNewView,
        BadCheckpoint,
        Forge,
        Twin,
    )
}

CLIENT_BEHAVIORS: dict[str, type[ClientBehavior]] = {
    behavior.name: behavior for behavior in (ReuseRequestId, ClientReplay, Steal)
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
    keyring: KeyRing | None = None,
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
        keyring=keyring,
    )


def build_client_behavior(
    behavior: str,
    client_id: int,
    key: SigningKey,
    *,
    config: ClusterConfig,
    accounts: Mapping[str, Account],
    params: Mapping[str, int | str] | None = None,
    at_ms: int = 0,
    until_ms: int | None = None,
) -> ClientBehavior:
    """The behaviour of one [[byzantine]] entry of a scenario that names a client."""
    factory: Callable[..., ClientBehavior] = CLIENT_BEHAVIORS[behavior]
    return factory(
        client_id,
        key,
        config=config,
        accounts=accounts,
        params=params,
        at_ms=at_ms,
        until_ms=until_ms,
    )
