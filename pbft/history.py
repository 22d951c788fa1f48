"""History: every executed operation kept, attributed, and the store the core reads it through.

What is kept (issue 11, "attribution of every write"): for each request a batch executed, a
`RequestRecord` (sequence number, index in the batch, view, the primary that proposed it,
batch digest, batch timestamp, client and request id, the operation and its fields,
outcome, reason and postings); for each hold released at expiry, a `ReleaseRecord`.
Records are built from the core's `Executed` outputs (pbft/events.py) (`RequestRecord.of`,
`entry_fields`);
nothing here reads a clock.

`HistoryStore` is the interface, in the manner of etcd raft's `Storage`: the replica core
only reads through it (pbft/lookups.py answers clients' lookups), and the driver writes to
it from each step's `Executed` outputs (`record`), after the step. So the core stays
sans-I/O and the store may be a database (runtime/history_store.py, SQLite) or memory
(`MemoryHistoryStore` below, for the simulator and tests); both pass one test suite
(tests/test_history_store.py).

What a store promises (and so what a lookup's answer may claim):
- It holds every seq in `held_from() .. held_through()` (both 0 while empty). Recording
  seq s <= held_through() first drops s and everything after it: recovery re-executes
  from the last checkpoint and writes those rows again, idempotently. Recording a seq past
  held_through() + 1 (after a state transfer: the seqs between were never executed here)
  starts the held range afresh at s, so the replica answers "not held" for older seqs
  instead of a false "not found".
- Retention: only the last `retention_seqs` seqs are kept, older ones are pruned as new
  ones arrive, so history grows neither memory nor disk without bound.
- Derived views (a hold's fate, an account's entries) are computed from the rows at read
  time and never stored apart, so dropping rows can never leave them stale.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pbft.codec import Bytes, ListOf, Nested, SignedInt, Spec, Struct, Text, UInt
from pbft.events import Executed, ExecutedRequest
from pbft.operations import Release

# A request's postings: no operation touches more than a few accounts (capture: the
# payer's held and available, the payee's available).
MAX_POSTINGS = 8
# Account history is read a page at a time, at most this many entries (a page of 256
# entries is about 40 KB on the wire, far within a frame).
MAX_PAGE = 256
# The default retention, in seqs (at most batch_size records each).
DEFAULT_RETENTION_SEQS = 100_000
# A posting moves at most the ledger's MAX_AMOUNT (2**63 - 1): a delta fits msgpack's int64.
MAX_DELTA = 2**63 - 1
# Reply reasons the ledger stores no decision for (pbft/ordering.py UNSTORED_REASON_CODES):
# such a record is kept for attribution, but it is not the request's decision.
UNDECIDED_REASONS = ("id_reused", "request_expired")
CONFIRMED = "confirmed"
# The kind of an account entry for a hold released at expiry (the others are op codes).
EXPIRY = "expire"
# A hold's fate (HoldView.fate).
OPEN, CAPTURED, VOIDED, EXPIRED = "open", "captured", "voided", "expired"
HOLD_FATES = (OPEN, CAPTURED, VOIDED, EXPIRED)

_ACCOUNT = Text(64)
_DIGEST = Bytes(32, 32)
_SEQ = UInt(2**62)
_CLIENT = UInt(2**32 - 1)


@dataclass(frozen=True)
class PostingRecord(Struct):
    """What one operation did to one account."""

    account: str
    available_delta: int
    held_delta: int

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "account": _ACCOUNT,
        "available_delta": SignedInt(MAX_DELTA),
        "held_delta": SignedInt(MAX_DELTA),
    }


@dataclass(frozen=True)
class RequestRecord(Struct):
    """One executed request, attributed. `decides` is 1 when this is the request's decision
    (its first execution, with a reason the ledger stores a decision for), 0 for a
    re-proposal of a decided request or a refusal the ledger keeps nothing of (id_reused,
    request_expired): those are kept for attribution only."""

    seq: int
    index: int
    view: int
    primary: int
    timestamp_ms: int
    batch_digest: bytes
    client_id: int
    request_id: int
    request_digest: bytes
    op: str
    payer: str
    payee: str
    amount: int
    ref_client: int
    ref_request: int
    expires_in_ms: int
    outcome: str
    reason: str
    decides: int
    postings: tuple[PostingRecord, ...]

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "seq": _SEQ,
        "index": UInt(2**16),
        "view": _SEQ,
        "primary": UInt(2**16),
        "timestamp_ms": UInt(),
        "batch_digest": _DIGEST,
        "client_id": _CLIENT,
        "request_id": UInt(),
        "request_digest": _DIGEST,
        "op": Text(16),
        # Empty where the op names none (capture, void, refund; open_account's payee).
        "payer": _ACCOUNT,
        "payee": _ACCOUNT,
        "amount": UInt(),
        "ref_client": _CLIENT,
        "ref_request": UInt(),
        "expires_in_ms": UInt(),
        "outcome": Text(16),
        "reason": Text(32),
        "decides": UInt(1),
        "postings": ListOf(Nested(PostingRecord), MAX_POSTINGS),
    }

    def agreed(self) -> tuple[Any, ...]:
        """What every correct replica records alike for this request: all but the view and
        primary, which depend on the view a replica committed the batch in (a batch
        re-proposed after a view change is one decision, committed in either view)."""
        return (
            self.seq,
            self.index,
            self.timestamp_ms,
            self.batch_digest,
            self.client_id,
            self.request_id,
            self.request_digest,
            self.op,
            self.payer,
            self.payee,
            self.amount,
            self.ref_client,
            self.ref_request,
            self.expires_in_ms,
            self.outcome,
            self.reason,
            self.decides,
            self.postings,
        )

    @classmethod
    def of(cls, executed: Executed, index: int, request: ExecutedRequest) -> RequestRecord:
        return cls.from_wire(wire_record(executed, index, request))


def wire_record(executed: Executed, index: int, request: ExecutedRequest) -> list[Any]:
    """A RequestRecord's wire form (its fields in order), straight from the core's own
    output: what the SQLite store packs, unchecked, for every request it records (a
    checked Struct per request cost more than the rest of recording a batch); reads
    decode it with RequestRecord.decode, checked and canonical."""
    return [
        executed.seq,
        index,
        executed.view,
        executed.primary,
        executed.timestamp_ms,
        executed.batch_digest,
        request.client_id,
        request.request_id,
        request.request_digest,
        request.op,
        request.payer,
        request.payee,
        request.amount,
        request.ref_client,
        request.ref_request,
        request.expires_in_ms,
        request.outcome,
        request.reason,
        int(decides(request)),
        [
            [posting.account, posting.available_delta, posting.held_delta]
            for posting in request.postings
        ],
    ]


@dataclass(frozen=True)
class ReleaseRecord:
    """A hold released at expiry, at the start of batch `seq` (the ledger's `begin_batch`)."""

    seq: int
    hold_client: int
    hold_request: int
    payer: str
    amount: int


@dataclass(frozen=True)
class AccountEntry(Struct):
    """One change to an account, in ledger order: `(seq, position)` is the cursor. Within
    a batch, hold releases at expiry come first (kind "expire", the hold's id as client
    and request id), then the requests' postings in batch order."""

    seq: int
    position: int
    timestamp_ms: int
    kind: str
    client_id: int
    request_id: int
    available_delta: int
    held_delta: int

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "seq": _SEQ,
        "position": UInt(2**20),
        "timestamp_ms": UInt(),
        "kind": Text(16),
        "client_id": _CLIENT,
        "request_id": UInt(),
        "available_delta": SignedInt(MAX_DELTA),
        "held_delta": SignedInt(MAX_DELTA),
    }


@dataclass(frozen=True)
class HoldView(Struct):
    """One hold's fate, derived from its authorize and what followed it. `expires_at_ms`
    is the authorizing batch's timestamp plus expires_in_ms; `closed_seq` is where it was
    captured, voided or released (0 while open); `captured` the amount captured."""

    hold_client: int
    hold_request: int
    payer: str
    payee: str
    amount: int
    expires_at_ms: int
    authorized_seq: int
    fate: str
    closed_seq: int
    captured: int

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "hold_client": _CLIENT,
        "hold_request": UInt(),
        "payer": _ACCOUNT,
        "payee": _ACCOUNT,
        "amount": UInt(),
        "expires_at_ms": UInt(),
        "authorized_seq": _SEQ,
        "fate": Text(16, HOLD_FATES),
        "closed_seq": _SEQ,
        "captured": UInt(),
    }


# An AccountEntry's fields, as a plain tuple (built for every posting; the Struct only
# when read).
EntryFields = tuple[int, int, int, str, int, int, int, int]


def entry_fields(
    seq: int,
    timestamp_ms: int,
    requests: Iterable[RequestRecord | ExecutedRequest],
    releases: Iterable[ReleaseRecord | Release],
) -> list[tuple[str, EntryFields]]:
    """(account, AccountEntry fields) for every posting of a batch, in ledger order:
    releases at expiry first, then each request's postings."""
    entries: list[tuple[str, EntryFields]] = []
    for release in releases:
        amount = release.amount
        entries.append(
            (
                release.payer,
                (
                    seq,
                    len(entries),
                    timestamp_ms,
                    EXPIRY,
                    release.hold_client,
                    release.hold_request,
                    amount,
                    -amount,
                ),
            )
        )
    for request in requests:
        for posting in request.postings:
            entries.append(
                (
                    posting.account,
                    (
                        seq,
                        len(entries),
                        timestamp_ms,
                        request.op,
                        request.client_id,
                        request.request_id,
                        posting.available_delta,
                        posting.held_delta,
                    ),
                )
            )
    return entries


def decides(request: ExecutedRequest) -> bool:
    """Whether this execution is the request's decision (see RequestRecord.decides)."""
    return request.fresh and request.reason not in UNDECIDED_REASONS


def hold_view(
    authorize: RequestRecord,
    closing: Iterable[RequestRecord],
    release: ReleaseRecord | None,
) -> HoldView:
    """A hold's fate from its (confirmed, deciding) authorize record, the deciding
    confirmed records that name it as ref (capture, void) and its release at expiry."""
    fate, closed_seq, captured = OPEN, 0, 0
    for record in sorted(closing, key=lambda r: (r.seq, r.index)):
        if record.op == "capture":
            fate, closed_seq, captured = CAPTURED, record.seq, record.amount
            break
        if record.op == "void":
            fate, closed_seq = VOIDED, record.seq
            break
    if fate == OPEN and release is not None:
        fate, closed_seq = EXPIRED, release.seq
    return HoldView(
        authorize.client_id,
        authorize.request_id,
        authorize.payer,
        authorize.payee,
        authorize.amount,
        authorize.timestamp_ms + authorize.expires_in_ms,
        authorize.seq,
        fate,
        closed_seq,
        captured,
    )


def closes_hold(record: RequestRecord | ExecutedRequest) -> bool:
    """A confirmed capture or void, as decided: it closes the hold it names."""
    deciding = record.decides if isinstance(record, RequestRecord) else decides(record)
    return bool(deciding) and record.outcome == CONFIRMED and record.op in ("capture", "void")


class HistoryReader(Protocol):
    """What the replica core reads (pbft/lookups.py). Every method answers from the held
    range only; a caller checks `held_from`/`held_through` to tell "not found" from
    "not held"."""

    def held_from(self) -> int: ...

    def held_through(self) -> int: ...

    def request(self, client_id: int, request_id: int) -> RequestRecord | None:
        """The request's deciding record, if held."""
        ...

    def account(
        self, account: str, after: tuple[int, int], through_seq: int, limit: int
    ) -> list[AccountEntry]:
        """The account's entries after the cursor `after` = (seq, position), with seq <=
        through_seq, oldest first, at most `limit`."""
        ...

    def hold(self, client_id: int, request_id: int) -> HoldView | None:
        """The hold authorized by request (client_id, request_id), if its authorize is held
        and confirmed."""
        ...


class HistoryStore(HistoryReader, Protocol):
    """A reader the driver also writes to, from the core's Executed outputs."""

    retention_seqs: int

    def record(self, executed: Executed) -> None: ...


def prune_chunk(retention_seqs: int) -> int:
    """Pruning drops seqs this many at a time (amortised), so a store holds up to
    retention_seqs + prune_chunk - 1 seqs."""
    return max(1, min(64, retention_seqs // 8))


def next_held_range(
    held_from: int, held_through: int, seq: int, retention_seqs: int
) -> tuple[int, int, bool]:
    """The held range after recording `seq`, and whether rows from `seq` on must be dropped
    first (a re-execution after recovery). Rows below the new held_from are pruned. Shared
    by both stores so that they agree exactly."""
    if seq < 1:
        raise ValueError(f"cannot record seq {seq}")
    if held_through and held_from <= seq <= held_through:
        rewrite = True
    elif held_through and seq == held_through + 1:
        rewrite = False
    else:
        # The first record, a gap (state transfer), or below what is held: start afresh.
        return seq, seq, held_through > 0
    low = seq - retention_seqs + 1
    if low - held_from < prune_chunk(retention_seqs):
        low = held_from
    return low, seq, rewrite


def check_retention(retention_seqs: int) -> int:
    if type(retention_seqs) is not int or retention_seqs < 1:
        raise ValueError(
            f"history retention must be a positive number of seqs, got {retention_seqs!r}"
        )
    return retention_seqs


class _Entries:
    """One account's entries, oldest first: appended at the end, pruned from the front
    (amortised O(1) each), rewritten from the end. Kept as plain tuples; the AccountEntry
    structs are built only for a page read."""

    def __init__(self) -> None:
        self.cursors: list[tuple[int, int]] = []
        self.fields: list[EntryFields] = []
        self.head = 0

    def __len__(self) -> int:
        return len(self.fields) - self.head

    def append(self, fields: EntryFields) -> None:
        self.cursors.append((fields[0], fields[1]))
        self.fields.append(fields)

    def drop_before(self, seq: int) -> None:
        while self.head < len(self.fields) and self.fields[self.head][0] < seq:
            self.head += 1
        if self.head > len(self.fields) // 2:
            del self.cursors[: self.head], self.fields[: self.head]
            self.head = 0

    def drop_from(self, seq: int) -> None:
        while len(self) and self.fields[-1][0] >= seq:
            self.cursors.pop()
            self.fields.pop()

    def page(self, after: tuple[int, int], through_seq: int, limit: int) -> list[AccountEntry]:
        start = bisect_right(self.cursors, after, lo=self.head)
        page = []
        for fields in self.fields[start : start + limit]:
            if fields[0] > through_seq:
                break
            page.append(AccountEntry(*fields))
        return page


class MemoryHistoryStore:
    """History in memory, bounded by `retention_seqs` (the simulator's and tests' store).

    It keeps the Executed records themselves and indexes into them; the records a lookup
    returns are built when read, so recording a batch costs a few dict and list appends
    (the simulator records every batch of every replica)."""

    def __init__(self, retention_seqs: int = DEFAULT_RETENTION_SEQS) -> None:
        self.retention_seqs = check_retention(retention_seqs)
        self._from = 0
        self._through = 0
        # seq -> batch, in ascending seq order (appended at the end, pruned at the front).
        self._batches: dict[int, Executed] = {}
        # (client, request id) -> (seq, index) of its deciding execution
        self._requests: dict[tuple[int, int], tuple[int, int]] = {}
        # hold id -> (seq, index) of the captures and voids that closed it
        self._refs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        # hold id -> the seq of its release at expiry
        self._releases: dict[tuple[int, int], int] = {}
        self._accounts: dict[str, _Entries] = {}

    def held_from(self) -> int:
        return self._from

    def held_through(self) -> int:
        return self._through

    def record(self, executed: Executed) -> None:
        seq = executed.seq
        low, high, rewrite = next_held_range(self._from, self._through, seq, self.retention_seqs)
        if rewrite:
            while self._batches and next(reversed(self._batches)) >= seq:
                dropped = self._batches.pop(next(reversed(self._batches)))
                for account in self._unindex(dropped):
                    self._trim(account, lambda entries: entries.drop_from(seq))
        self._from, self._through = low, high
        while self._batches and next(iter(self._batches)) < low:
            for account in self._unindex(self._batches.pop(next(iter(self._batches)))):
                self._trim(account, lambda entries: entries.drop_before(low))
        self._add(executed)

    def _trim(self, account: str, how: Callable[[_Entries], None]) -> None:
        entries = self._accounts.get(account)
        if entries is not None:
            how(entries)
            if not entries:
                del self._accounts[account]

    def _add(self, executed: Executed) -> None:
        seq = executed.seq
        self._batches[seq] = executed
        for index, request in enumerate(executed.requests):
            if decides(request):
                self._requests.setdefault((request.client_id, request.request_id), (seq, index))
                if closes_hold(request):
                    hold = (request.ref_client, request.ref_request)
                    self._refs.setdefault(hold, []).append((seq, index))
        for release in executed.released:
            self._releases.setdefault((release.hold_client, release.hold_request), seq)
        for account, fields in entry_fields(
            seq, executed.timestamp_ms, executed.requests, executed.released
        ):
            entries = self._accounts.get(account)
            if entries is None:
                entries = self._accounts[account] = _Entries()
            entries.append(fields)

    def _unindex(self, executed: Executed) -> list[str]:
        """Forget a batch's index entries; the accounts it touched (whose entries the
        caller drops by seq)."""
        seq = executed.seq
        for index, request in enumerate(executed.requests):
            key = (request.client_id, request.request_id)
            if self._requests.get(key) == (seq, index):
                del self._requests[key]
            hold = (request.ref_client, request.ref_request)
            refs = self._refs.get(hold)
            if refs is not None and (seq, index) in refs:
                refs.remove((seq, index))
                if not refs:
                    del self._refs[hold]
        for release in executed.released:
            key = (release.hold_client, release.hold_request)
            if self._releases.get(key) == seq:
                del self._releases[key]
        accounts = dict.fromkeys(release.payer for release in executed.released)
        for request in executed.requests:
            accounts.update(dict.fromkeys(posting.account for posting in request.postings))
        return list(accounts)

    def _record_at(self, where: tuple[int, int]) -> RequestRecord:
        executed = self._batches[where[0]]
        return RequestRecord.of(executed, where[1], executed.requests[where[1]])

    def request(self, client_id: int, request_id: int) -> RequestRecord | None:
        where = self._requests.get((client_id, request_id))
        return None if where is None else self._record_at(where)

    def account(
        self, account: str, after: tuple[int, int], through_seq: int, limit: int
    ) -> list[AccountEntry]:
        entries = self._accounts.get(account)
        return [] if entries is None else entries.page(after, through_seq, limit)

    def hold(self, client_id: int, request_id: int) -> HoldView | None:
        authorize = self.request(client_id, request_id)
        if authorize is None or authorize.op != "authorize" or authorize.outcome != CONFIRMED:
            return None
        released_at = self._releases.get((client_id, request_id))
        release = None
        if released_at is not None:
            for candidate in self._batches[released_at].released:
                if (candidate.hold_client, candidate.hold_request) == (client_id, request_id):
                    release = ReleaseRecord(
                        released_at, client_id, request_id, candidate.payer, candidate.amount
                    )
                    break
        return hold_view(
            authorize,
            [self._record_at(where) for where in self._refs.get((client_id, request_id), ())],
            release,
        )
