"""What the replica's parts share, and the narrow ports through which they reach each other.

The replica (pbft/replica.py) is a facade over parts that own their state: ordering
(pbft/ordering.py), request intake (pbft/requests.py), checkpoints and the window
(pbft/checkpoints.py), suspicion and view change (pbft/viewchanges.py), catch-up and
state transfer (pbft/catchup.py), and recovery from storage (pbft/recovery.py).

Each part holds a `Context`: who this replica is, its clock, its view and the view's
status, and the output buffer with the helpers that fill it (sends, durable writes,
notes, drops, evidence). The `Replica` is that context. A part reaches another part
only through the port below, which names everything one part may read or call on
another; a part's other members are its own business. The ports are Protocols so that
this module imports no part and no part imports the facade: the import graph has no
cycle (tests/test_import_rule.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from crypto.keys import SigningKey
from pbft.certificates import Proposal, Verifier
from pbft.codec import pack
from pbft.config import ClusterConfig
from pbft.events import Action, Broadcast, Note, NoteKind, Persist, Send
from pbft.ledger import Ledger
from pbft.log import CommittedEntry, Slot
from pbft.messages import Commit, NewView, Prepare, PrePrepare, Request
from pbft.replies import SignedReplies
from pbft.signed import Opened
from pbft.statetransfer import IncomingTransfer
from pbft.status import ViewStatus
from pbft.viewchange import NewViewPlan, VerifiedViewChange

EVIDENCE_LIMIT = 64

Records = Mapping[tuple[str | int, ...], bytes]


class ReplicaInvariantError(RuntimeError):
    """A local bug: the replica's own state broke a rule it maintains. Never caused by peers."""


@dataclass(frozen=True)
class StableCheckpoint:
    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    snapshot: bytes
    proof: tuple[bytes, ...]


@dataclass(frozen=True)
class Anchor:
    """A checkpoint proven by 2f + 1 signatures (from a NEW-VIEW) that is ahead of our own
    stable checkpoint: the chain hash there is certain, but we do not hold that state."""

    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    proof: tuple[bytes, ...]

    def encode(self) -> bytes:
        return pack([self.seq, self.chain_hash, self.ledger_digest, list(self.proof)])


@dataclass
class PendingRequest:
    opened: Opened
    body_digest: bytes
    arrived_ms: int
    # The replica this request is charged to, when the primary admitted it on that
    # replica's relay beyond its client's quota or the table's; None: charged to its client.
    relayer: int | None = None
    # Requests.never_held_ordered when this request arrived (or its view began): how many
    # requests this replica never held the primary had ordered before (see count_ordered).
    never_held_mark: int = 0


# --- ports: what one part may use of another --------------------------------------------


class OrderingPort(Protocol):
    """Slots, certificates, the chain rule, proposing, execution (pbft/ordering.py)."""

    slots: dict[int, Slot]
    next_seq: int
    new_view_planned_high: int
    ledger: Ledger
    last_executed: int
    chain_hash: bytes
    last_execution_ms: int
    signed_replies: SignedReplies

    def slot(self, seq: int) -> Slot: ...
    def install_state(self, ledger: Ledger, seq: int, chain_hash: bytes) -> None: ...
    def leave_view(self) -> None: ...
    def enter_view(self, last_planned: int) -> None: ...
    def vote(self, slot: Slot, kind: str, message: Prepare | Commit | PrePrepare) -> bytes: ...
    def advance(self, seq: int) -> None: ...
    def commit(self, slot: Slot, entry: CommittedEntry) -> None: ...
    def execute_ready(self) -> None: ...
    def maybe_propose(self) -> None: ...
    def check_proposal_conflict(self, proposal: Proposal) -> None: ...
    def reply(
        self, request: Request, digest: bytes, seq: int, outcome: str, reason: str
    ) -> None: ...


class RequestsPort(Protocol):
    """Client requests known and not executed, quotas, batching order (pbft/requests.py)."""

    pending: dict[tuple[int, int], PendingRequest]
    proposal_queue: dict[tuple[int, int], None]
    last_ordered_ms: int

    def leave_view(self) -> None: ...
    def enter_view(self, proposed: Mapping[tuple[int, int], None]) -> None: ...
    def next_batch(self) -> list[tuple[int, int]]: ...
    def charge_backlog(self, identities: list[tuple[int, int]]) -> None: ...
    def timed(self) -> list[tuple[int, int]]: ...
    def backlog_only(self, identities: list[tuple[int, int]]) -> bool: ...
    def oldest_timed_request(self) -> PendingRequest | None: ...
    def oldest_timed(self) -> tuple[PendingRequest, int] | None: ...
    def count_ordered(self, count: int) -> None: ...
    def unpend(self, identity: tuple[int, int]) -> None: ...
    def forget_decided_requests(self) -> None: ...


class CheckpointsPort(Protocol):
    """Checkpoints, the stable one, the anchor and the watermark window (pbft/checkpoints.py)."""

    stable: StableCheckpoint
    view_anchor: Anchor | None

    def window_low(self) -> int: ...
    def take_checkpoint(self) -> None: ...
    def set_anchor(self, anchor: Anchor) -> None: ...
    def make_stable(self, checkpoint: StableCheckpoint) -> None: ...
    def adopt_checkpoint_proof(
        self, seq: int, chain_hash: bytes, ledger_digest: bytes, proof: tuple[bytes, ...]
    ) -> None: ...
    def stable_checkpoint_vote(self) -> bytes | None: ...


class ViewChangesPort(Protocol):
    """Failure detection, suspicion, VIEW-CHANGE and NEW-VIEW (pbft/viewchanges.py)."""

    new_view_message: bytes | None
    own_view_change: bytes | None
    view_records: dict[tuple[str | int, ...], None]

    def check_view(self, view: int, sender: int) -> None: ...
    def heard_from_primary(self) -> None: ...
    def progress_made(self) -> None: ...
    def overtake_limit(self) -> int: ...
    def ease_backoff(self) -> None: ...
    def store_view_change(self, change: VerifiedViewChange) -> None: ...
    def verify_new_view(self, message: NewView) -> tuple[NewViewPlan, list[Proposal]]: ...


class CatchUpPort(Protocol):
    """Retransmission to laggards, FETCH, certificates and state transfer (pbft/catchup.py)."""

    incoming: IncomingTransfer | None

    def saw_executed(self, seq: int) -> None: ...
    def claim_executed(self, replica: int, last_executed: int) -> None: ...
    def maybe_fetch(self) -> None: ...
    def fetch(self) -> None: ...
    def fetch_from(self, target: int) -> None: ...
    def help_behind_primary(self, primary: int, last_executed: int) -> None: ...


# --- the shared context -------------------------------------------------------------------


class Context:
    """Who this replica is, its clock, its view, and its output. The `Replica` facade is one
    and sets the parts' ports once it has built them."""

    ordering: OrderingPort
    requests: RequestsPort
    checkpoints: CheckpointsPort
    viewchanges: ViewChangesPort
    catchup: CatchUpPort

    def __init__(
        self,
        replica_id: int,
        config: ClusterConfig,
        signing_key: SigningKey,
        verifier: Verifier,
        cluster_id: bytes,
    ) -> None:
        self.id = replica_id
        self.config = config
        self.key = signing_key
        self.verifier = verifier
        # Named in every reply we sign, so clients and receipts cannot mix clusters up.
        self.cluster_id = cluster_id
        self.now_ms = 0
        # The clock batch timestamps are proposed and checked against (see Tick).
        self.wall_ms = 0
        self.view = 0
        self.status = ViewStatus.NORMAL
        # See Replica.__init__'s `lost_votes`: no signing through this view.
        self.silent_through_view: int | None = None
        self.halted: str | None = None
        # Observability.
        self.drops: Counter[str] = Counter()
        self.evidence: list[tuple[str, int, bytes, bytes]] = []
        self.messages_sent = 0
        # What the event being handled produced, in order (see pbft/events.py).
        self.outbox: list[Action] = []

    @property
    def is_primary(self) -> bool:
        return self.config.primary_of(self.view) == self.id

    def broadcast(self, raw: bytes) -> None:
        self.messages_sent += self.config.replica_count - 1
        self.outbox.append(Broadcast(raw))

    def send(self, to: tuple[str, int], raw: bytes) -> None:
        self.messages_sent += 1
        self.outbox.append(Send(to, raw))

    def persist(
        self, key: tuple[str | int, ...], value: bytes | None, *, deferrable: bool = False
    ) -> None:
        self.outbox.append(Persist(key, value, deferrable))

    def note(self, kind: NoteKind, detail: str) -> None:
        self.outbox.append(Note(kind, detail))

    def count_drop(self, reason: str) -> None:
        # Keyed by the plain string, so counters print and compare as they always did.
        self.drops[str(reason)] += 1

    def drop(self, reason: str, detail: str = "") -> None:
        self.count_drop(reason)
        self.outbox.append(Note(NoteKind.DROP, f"{reason} {detail}".strip(), reason))

    def report_evidence(self, kind: str, offender: int, first: bytes, second: bytes) -> None:
        """Two conflicting signed messages from one replica: proof it is Byzantine."""
        if any(held[2:] == (first, second) for held in self.evidence):
            return
        if len(self.evidence) < EVIDENCE_LIMIT:
            self.evidence.append((kind, offender, first, second))
        self.note(NoteKind.EVIDENCE, f"{kind} by replica {offender}")

    def halt(self, reason: str) -> None:
        """Stop for good: running on damaged or forked state would be worse than stopping."""
        self.halted = reason
        self.note(NoteKind.HALT, reason)
