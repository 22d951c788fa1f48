"""Every message of the protocol: frozen, validated, with a canonical msgpack codec.

A message travels inside a signed `Envelope` (see pbft/signed.py). Messages that
carry proofs (certificates, view changes) embed the other messages as the raw
envelope bytes they arrived in, so every signature can be checked over the exact
bytes its signer produced, never over a re-encoding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from pbft.codec import MAX_FRAME_BYTES, Bytes, ListOf, Nested, Spec, Struct, Text, UInt
from pbft.config import MAX_BATCH_SIZE, MAX_REPLICAS
from pbft.history import MAX_PAGE, AccountEntry, HoldView, RequestRecord
from pbft.ledger import Outcome, Reason
from pbft.operations import MAX_OP_LENGTH, OP_CODES, Operation
from pbft.status import ViewStatus

# Views and sequence numbers stay far below 2**64 so `+ 1` never leaves the wire range.
MAX_VIEW = 2**62
MAX_SEQ = 2**62
MAX_WINDOW = 8192
# Batch timestamps: milliseconds of the proposing primary's clock (Unix time in the runtime).
MAX_TIMESTAMP_MS = 2**62
# State transfer: a chunk is an aligned block of at most 2**MAX_CHUNK_LEVEL ledger leaves.
MAX_CHUNK_LEVEL = 16
MAX_LEAF_COUNT = 2**40
MAX_PATH = 64
# A reply's inclusion proof: the height of a tree of MAX_BATCH_SIZE leaves, plus slack.
MAX_REPLY_PATH = (MAX_BATCH_SIZE - 1).bit_length() + 2

HASH = Bytes(32, 32)
SIGNATURE = Bytes(64, 64)
ENVELOPE = Bytes(1, MAX_FRAME_BYTES)
VIEW = UInt(MAX_VIEW)
SEQ = UInt(MAX_SEQ)
REPLICA = UInt(MAX_REPLICAS - 1)
CLIENT = UInt(2**32 - 1)
ACCOUNT = Text(64)


class MessageType(enum.IntEnum):
    REQUEST = 1
    PRE_PREPARE = 2
    PREPARE = 3
    COMMIT = 4
    REPLY = 5
    HEARTBEAT = 6
    SUSPECT = 7
    CHECKPOINT = 8
    VIEW_CHANGE = 9
    NEW_VIEW = 10
    FETCH = 11
    CHECKPOINT_STATE = 12
    COMMIT_CERTIFICATE = 13
    BALANCE_QUERY = 14
    BALANCE_REPLY = 15
    STATE_CHUNK = 16
    STATE_REQUEST = 17
    LOOKUP = 18
    LOOKUP_ANSWER = 19
    STATUS_QUERY = 20
    STATUS_ANSWER = 21


class Message(Struct):
    """A message that is signed by one principal: a client or a replica."""

    TYPE: ClassVar[MessageType]
    # "client" or "replica": whose key signs it. The sender id is the field SENDER_FIELD.
    SIGNER: ClassVar[str] = "replica"
    SENDER_FIELD: ClassVar[str] = "replica"

    @property
    def sender(self) -> int:
        return getattr(self, self.SENDER_FIELD)


@dataclass(frozen=True)
class Request(Message):
    """A client's signed operation on the ledger. pbft/operations.py says which fields each
    op uses; the others must be empty, else the ledger rejects it as invalid_request. The
    reference and expiry default to empty, which is what a transfer has."""

    client_id: int
    request_id: int
    op: str
    payer: str
    payee: str
    amount: int
    ref_client: int = 0
    ref_request: int = 0
    expires_in_ms: int = 0

    TYPE = MessageType.REQUEST
    SIGNER = "client"
    SENDER_FIELD = "client_id"
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "client_id": CLIENT,
        "request_id": UInt(),
        # An unknown op is malformed: dropped and counted at decode, never ordered.
        "op": Text(MAX_OP_LENGTH, OP_CODES),
        # Empty where the op names no account (capture, void, refund).
        "payer": ACCOUNT,
        "payee": ACCOUNT,
        # Any integer on the wire: a zero or absurd amount is a payment the ledger rejects
        # with a reason (invalid_amount), not a message we drop silently.
        "amount": UInt(),
        # The hold (capture, void) or payment (refund) referred to: (client id, request id).
        "ref_client": CLIENT,
        "ref_request": UInt(),
        # authorize only; the ledger bounds it (invalid_expiry).
        "expires_in_ms": UInt(),
    }

    def operation(self) -> Operation:
        return Operation(
            self.op,
            self.payer,
            self.payee,
            self.amount,
            self.ref_client,
            self.ref_request,
            self.expires_in_ms,
        )


@dataclass(frozen=True)
class PrePrepare(Message):
    """The primary's proposal: batch `requests` at `seq` in `view`, chained to `prev_hash`,
    at `timestamp_ms` (the batch time the ledger decides expiry against; pbft/ordering.py
    says when a backup accepts it)."""

    view: int
    seq: int
    replica: int
    prev_hash: bytes
    batch_digest: bytes
    requests: tuple[bytes, ...]
    timestamp_ms: int

    TYPE = MessageType.PRE_PREPARE
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "view": VIEW,
        "seq": SEQ,
        "replica": REPLICA,
        "prev_hash": HASH,
        "batch_digest": HASH,
        "requests": ListOf(ENVELOPE, MAX_BATCH_SIZE),
        "timestamp_ms": UInt(MAX_TIMESTAMP_MS),
    }


@dataclass(frozen=True)
class Prepare(Message):
    view: int
    seq: int
    replica: int
    entry_digest: bytes

    TYPE = MessageType.PREPARE
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "view": VIEW,
        "seq": SEQ,
        "replica": REPLICA,
        "entry_digest": HASH,
    }


@dataclass(frozen=True)
class Commit(Message):
    view: int
    seq: int
    replica: int
    entry_digest: bytes

    TYPE = MessageType.COMMIT
    SCHEMA: ClassVar[dict[str, Spec]] = Prepare.SCHEMA


@dataclass(frozen=True)
class Reply(Message):
    """One request's result, proven by a signature a replica made once for its whole batch.

    The result (client, request id, body digest, outcome, reason and the decision's `seq`,
    with `cluster_id`) is a leaf of the Merkle tree over the batch's results; `index`,
    `batch_size` and `path` prove it under `root`. The envelope's signature is not over this
    body: it is the replica's signature over (cluster id, replica, view, batch seq, batch
    size, root), shared by every reply of the batch (pbft/replies.py checks both)."""

    view: int
    seq: int
    replica: int
    client_id: int
    request_id: int
    request_digest: bytes
    outcome: str
    reason: str
    cluster_id: bytes
    batch_seq: int
    batch_size: int
    index: int
    path: tuple[bytes, ...]
    root: bytes

    TYPE = MessageType.REPLY
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "view": VIEW,
        "seq": SEQ,
        "replica": REPLICA,
        "client_id": CLIENT,
        "request_id": UInt(),
        "request_digest": HASH,
        "outcome": Text(16, [outcome.value for outcome in Outcome]),
        "reason": Text(32, [reason.value for reason in Reason]),
        "cluster_id": HASH,
        "batch_seq": SEQ,
        "batch_size": UInt(MAX_BATCH_SIZE),
        "index": UInt(MAX_BATCH_SIZE - 1),
        # Bounded at decode, before any hashing: a tree of MAX_BATCH_SIZE leaves is
        # (MAX_BATCH_SIZE - 1).bit_length() levels tall.
        "path": ListOf(HASH, MAX_REPLY_PATH),
        "root": HASH,
    }


@dataclass(frozen=True)
class Heartbeat(Message):
    """The primary is alive (Raft's empty AppendEntries); also tells how far it got."""

    view: int
    replica: int
    last_proposed: int
    last_executed: int

    TYPE = MessageType.HEARTBEAT
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "view": VIEW,
        "replica": REPLICA,
        "last_proposed": SEQ,
        "last_executed": SEQ,
    }


@dataclass(frozen=True)
class Suspect(Message):
    """A replica's timer expired in `view`. f + 1 suspicions start a view change."""

    view: int
    replica: int

    TYPE = MessageType.SUSPECT
    SCHEMA: ClassVar[dict[str, Spec]] = {"view": VIEW, "replica": REPLICA}


@dataclass(frozen=True)
class Checkpoint(Message):
    seq: int
    replica: int
    chain_hash: bytes
    ledger_digest: bytes

    TYPE = MessageType.CHECKPOINT
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "seq": SEQ,
        "replica": REPLICA,
        "chain_hash": HASH,
        "ledger_digest": HASH,
    }


@dataclass(frozen=True)
class PreparedCertificate(Struct):
    """A pre-prepare and 2f matching prepares from distinct backups, as received."""

    pre_prepare: bytes
    prepares: tuple[bytes, ...]

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "pre_prepare": ENVELOPE,
        "prepares": ListOf(ENVELOPE, MAX_REPLICAS),
    }


@dataclass(frozen=True)
class ViewChange(Message):
    """A replica's move to `new_view`: its stable checkpoint with proof, and what it prepared."""

    new_view: int
    replica: int
    checkpoint_seq: int
    checkpoint_chain_hash: bytes
    checkpoint_ledger_digest: bytes
    checkpoint_proof: tuple[bytes, ...]
    prepared: tuple[PreparedCertificate, ...]

    TYPE = MessageType.VIEW_CHANGE
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "new_view": VIEW,
        "replica": REPLICA,
        "checkpoint_seq": SEQ,
        "checkpoint_chain_hash": HASH,
        "checkpoint_ledger_digest": HASH,
        "checkpoint_proof": ListOf(ENVELOPE, MAX_REPLICAS),
        "prepared": ListOf(Nested(PreparedCertificate), MAX_WINDOW),
    }


@dataclass(frozen=True)
class NewView(Message):
    """The new primary's proof (2f + 1 view changes) and its re-proposals for the window."""

    view: int
    replica: int
    view_changes: tuple[bytes, ...]
    pre_prepares: tuple[bytes, ...]

    TYPE = MessageType.NEW_VIEW
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "view": VIEW,
        "replica": REPLICA,
        "view_changes": ListOf(ENVELOPE, MAX_REPLICAS),
        "pre_prepares": ListOf(ENVELOPE, MAX_WINDOW),
    }


@dataclass(frozen=True)
class Fetch(Message):
    """Catch-up: send me what was committed from `from_seq` on, your stable checkpoint if it
    is newer than my `stable_seq`, and your NEW-VIEW if your view is later than my `view`."""

    replica: int
    from_seq: int
    stable_seq: int
    view: int

    TYPE = MessageType.FETCH
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "from_seq": SEQ,
        "stable_seq": SEQ,
        "view": VIEW,
    }


@dataclass(frozen=True)
class CheckpointState(Message):
    """Catch-up by state transfer in one message: a stable checkpoint's whole ledger and
    its 2f + 1 proof. Still accepted; correct replicas now send StateChunks, as a ledger
    soon outgrows one frame."""

    replica: int
    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    ledger_snapshot: bytes
    proof: tuple[bytes, ...]

    TYPE = MessageType.CHECKPOINT_STATE
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "seq": SEQ,
        "chain_hash": HASH,
        "ledger_digest": HASH,
        "ledger_snapshot": Bytes(1, MAX_FRAME_BYTES),
        "proof": ListOf(ENVELOPE, MAX_REPLICAS),
    }


@dataclass(frozen=True)
class StateChunk(Message):
    """Catch-up by state transfer, a chunk at a time: the aligned block of 2**level ledger
    leaves from `start` (fewer at the end) of a stable checkpoint of `leaf_count` leaves,
    with the audit path of the block's root to the checkpoint's ledger digest, and the
    checkpoint's 2f + 1 proof so that the chunk stands on its own."""

    replica: int
    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    proof: tuple[bytes, ...]
    leaf_count: int
    start: int
    level: int
    leaves: tuple[bytes, ...]
    path: tuple[bytes, ...]

    TYPE = MessageType.STATE_CHUNK
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "seq": SEQ,
        "chain_hash": HASH,
        "ledger_digest": HASH,
        "proof": ListOf(ENVELOPE, MAX_REPLICAS),
        "leaf_count": UInt(MAX_LEAF_COUNT),
        "start": UInt(MAX_LEAF_COUNT),
        "level": UInt(MAX_CHUNK_LEVEL),
        "leaves": ListOf(Bytes(1, MAX_FRAME_BYTES), 2**MAX_CHUNK_LEVEL),
        "path": ListOf(HASH, MAX_PATH),
    }


@dataclass(frozen=True)
class StateRequest(Message):
    """Send me the chunk of your stable checkpoint `seq` that begins at leaf `start` (or
    the first chunk of your stable checkpoint if it is newer)."""

    replica: int
    seq: int
    start: int

    TYPE = MessageType.STATE_REQUEST
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "seq": SEQ,
        "start": UInt(MAX_LEAF_COUNT),
    }


@dataclass(frozen=True)
class CommitCertificate(Message):
    """Catch-up by replay: a committed batch with 2f + 1 matching commits, as received."""

    replica: int
    pre_prepare: bytes
    commits: tuple[bytes, ...]

    TYPE = MessageType.COMMIT_CERTIFICATE
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "pre_prepare": ENVELOPE,
        "commits": ListOf(ENVELOPE, MAX_REPLICAS),
    }


@dataclass(frozen=True)
class BalanceQuery(Message):
    """A client asks every replica for an account's balance (a read: not ordered)."""

    client_id: int
    query_id: int
    account: str

    TYPE = MessageType.BALANCE_QUERY
    SIGNER = "client"
    SENDER_FIELD = "client_id"
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "client_id": CLIENT,
        "query_id": UInt(),
        "account": ACCOUNT,
    }


@dataclass(frozen=True)
class BalanceReply(Message):
    """One replica's signed answer: the balances after executing up to `seq`, in the
    cluster `cluster_id`: `balance` is what is available, `held` what open holds keep
    (issue 11). `exists` is 0 when there is no such account (then both are 0)."""

    replica: int
    client_id: int
    query_id: int
    account: str
    exists: int
    balance: int
    seq: int
    cluster_id: bytes
    held: int

    TYPE = MessageType.BALANCE_REPLY
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "client_id": CLIENT,
        "query_id": UInt(),
        "account": ACCOUNT,
        "exists": UInt(1),
        "balance": UInt(),
        "seq": SEQ,
        "cluster_id": HASH,
        "held": UInt(),
    }


# What a lookup asks (LookupQuery.kind) and how a replica answers (LookupAnswer.state).
LOOKUP_KINDS = ("status", "history", "hold")
FOUND, NOT_FOUND, NOT_HELD, BEHIND = "found", "not_found", "not_held", "behind"
LOOKUP_STATES = (FOUND, NOT_FOUND, NOT_HELD, BEHIND)


@dataclass(frozen=True)
class LookupQuery(Message):
    """A client asks every replica about history (a read: not ordered), pbft/lookups.py:
    - "status": the request (target_client, target_request): its outcome, seq and what a
      receipt needs, also once it fell out of the dedup window;
    - "history": `account`'s entries after the cursor (after_seq, after_position), at
      most `limit`, none past `through_seq` (0: as far as the replica has executed);
    - "hold": the hold authorized by request (target_client, target_request).
    Fields a kind does not use are empty (0 or ""); otherwise the query is dropped."""

    client_id: int
    query_id: int
    kind: str
    target_client: int
    target_request: int
    account: str
    after_seq: int
    after_position: int
    limit: int
    through_seq: int

    TYPE = MessageType.LOOKUP
    SIGNER = "client"
    SENDER_FIELD = "client_id"
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "client_id": CLIENT,
        "query_id": UInt(),
        "kind": Text(8, LOOKUP_KINDS),
        "target_client": CLIENT,
        "target_request": UInt(),
        "account": ACCOUNT,
        "after_seq": SEQ,
        "after_position": UInt(2**20),
        "limit": UInt(MAX_PAGE),
        "through_seq": SEQ,
    }


@dataclass(frozen=True)
class LookupAnswer(Message):
    """One replica's signed answer to the query whose body digest is `query_digest`, in
    cluster `cluster_id`, from the history it holds: seqs `held_from`..`as_of_seq`.
    `state`: found (then `record` for a status, with `reply`: the request's REPLY signed
    as a batch of one, for a receipt; `entries` for a history page; `hold` for a hold),
    not_found (as of `as_of_seq`), not_held (the answer may lie before `held_from`) or
    behind (the query's through_seq is past `as_of_seq`)."""

    replica: int
    client_id: int
    query_id: int
    query_digest: bytes
    cluster_id: bytes
    state: str
    as_of_seq: int
    held_from: int
    record: tuple[RequestRecord, ...]
    reply: bytes
    entries: tuple[AccountEntry, ...]
    hold: tuple[HoldView, ...]

    TYPE = MessageType.LOOKUP_ANSWER
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "client_id": CLIENT,
        "query_id": UInt(),
        "query_digest": HASH,
        "cluster_id": HASH,
        "state": Text(16, LOOKUP_STATES),
        "as_of_seq": SEQ,
        "held_from": SEQ,
        "record": ListOf(Nested(RequestRecord), 1),
        # A REPLY envelope: a few hundred bytes (its proof is one batch of one: no path).
        "reply": Bytes(0, 4096),
        "entries": ListOf(Nested(AccountEntry), MAX_PAGE),
        "hold": ListOf(Nested(HoldView), 1),
    }


# --- a replica's own status (pbft/lookups.py, replica status) ------------------------------
# At most this many drop counters in one answer (the most frequent): the reasons are an
# open set (malformed_<codec reason>, batch_request_<reason>), the answer stays small.
MAX_STATUS_DROPS = 128
MAX_DROP_REASON_LENGTH = 64


@dataclass(frozen=True)
class StatusQuery(Message):
    """A client asks every replica where it stands (a read: not ordered, not agreed)."""

    client_id: int
    query_id: int

    TYPE = MessageType.STATUS_QUERY
    SIGNER = "client"
    SENDER_FIELD = "client_id"
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "client_id": CLIENT,
        "query_id": UInt(),
    }


@dataclass(frozen=True)
class DropCount(Struct):
    """How many inputs a replica dropped for one reason (pbft/drops.py)."""

    reason: str
    count: int

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "reason": Text(MAX_DROP_REASON_LENGTH),
        "count": UInt(),
    }


@dataclass(frozen=True)
class ReplicaStatusAnswer(Message):
    """One replica's signed word on its own state, for client `client_id`'s query
    `query_id`, in cluster `cluster_id`: its view and the view's status, the last seq it
    executed, its stable checkpoint, its watermark window (low, high] and its drop counters
    (the most frequent MAX_STATUS_DROPS, by reason). No f + 1 agreement stands behind it:
    a dashboard shows each replica's word as that replica's."""

    replica: int
    client_id: int
    query_id: int
    cluster_id: bytes
    view: int
    view_status: str
    last_executed: int
    stable_checkpoint: int
    low_watermark: int
    high_watermark: int
    drops: tuple[DropCount, ...]

    TYPE = MessageType.STATUS_ANSWER
    SCHEMA: ClassVar[dict[str, Spec]] = {
        "replica": REPLICA,
        "client_id": CLIENT,
        "query_id": UInt(),
        "cluster_id": HASH,
        "view": VIEW,
        "view_status": Text(16, tuple(status.value for status in ViewStatus)),
        "last_executed": SEQ,
        "stable_checkpoint": SEQ,
        "low_watermark": SEQ,
        "high_watermark": SEQ,
        "drops": ListOf(Nested(DropCount), MAX_STATUS_DROPS),
    }


MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Request,
        PrePrepare,
        Prepare,
        Commit,
        Reply,
        Heartbeat,
        Suspect,
        Checkpoint,
        ViewChange,
        NewView,
        Fetch,
        CheckpointState,
        CommitCertificate,
        BalanceQuery,
        BalanceReply,
        StateChunk,
        StateRequest,
        LookupQuery,
        LookupAnswer,
        StatusQuery,
        ReplicaStatusAnswer,
    )
}
