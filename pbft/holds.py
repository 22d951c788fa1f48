"""Holds, refundable payments and opened accounts: the ledger's records besides balances and
the dedup table (issue 11), and the slot-allocated family of digest leaves that commits
to them.

Part of the sans-I/O protocol core: no I/O, clock or randomness, and nothing here iterates
a set. Time is the batch time the ledger is given (pbft/ledger.py), never a clock.

Leaves. Every record sits in a slot: slot i is leaf i of the family that follows the client
leaves in the digest's tree. A new record takes the smallest free slot (a min-heap), a
removed record's slot becomes an empty ["free"] leaf, so a change rehashes O(log n) nodes
and the tree only ever grows at its end (to the most records ever held at once).

What bounds memory (all limits come from LedgerLimits, from the cluster config). Every
record counts against one client: a hold against the client that authorized it, a payment
against the client whose id it carries (the transfer's sender, or for a capture the hold's
authorizer; both are the payer's owner), an opened account against its owner. So no client
can push out another's records, and what is kept is bounded by the number of clients times
the per-client caps, whatever the request rate (pbft/checkpoint_size.py counts it):
- holds, open or closed: at most max_holds_per_client per client. An authorize beyond that
  many open holds is rejected with too_many_holds; otherwise, at the cap, the client's
  oldest closed hold (earliest closed, then lowest request id) is forgotten early to make
  room, and a capture or void naming it is then answered hold_not_found;
- closed holds (captured, voided, expired) are also forgotten closed_hold_retention_ms of
  batch time after they closed (until then a second capture answers
  hold_already_captured, not hold_not_found);
- refundable payments (every confirmed transfer and capture): at most
  max_refundable_per_client per client, the oldest (earliest paid, then lowest request id)
  forgotten first to make room, and each forgotten refund_window_ms of batch time after it
  was paid; a refund of a forgotten payment is answered payment_not_found. A refund window
  or cap of 0 keeps none;
- opened accounts: at most max_accounts_per_client per client, for good (accounts are
  never closed; too_many_accounts beyond);
- the time-ordered heaps drop entries of records forgotten early lazily and are rebuilt
  once they hold more than twice the live entries, so they stay within a constant factor
  of the records.
Eviction and forgetting depend only on the records and the batch time, so every replica
forgets the same records in the same batch.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass
from typing import Any

import msgpack

# Batch times (ms) are clamped to this, so a deadline (time + a bounded duration) always
# fits a msgpack unsigned integer.
MAX_TIME_MS = 2**62
MAX_DURATION_MS = 2**40
MAX_PER_CLIENT = 1_000_000
# No valid ledger has more record slots than this many of the smallest record row
# ([slot, "opened", name, owner, available, held]: 1 + 1 + 7 + 2 + 3 bytes) fit in a
# snapshot (pbft/ledger.py's MAX_SNAPSHOT_SIZE_BYTES, 256 MiB; a test checks they agree):
# a cluster's config must fit every client at every cap in one (pbft/checkpoint_size.py).
MIN_RECORD_ROW_BYTES = 14
MAX_SLOTS = 256 * 1024 * 1024 // MIN_RECORD_ROW_BYTES
MAX_AMOUNT = 2**63 - 1
MAX_ID = 2**64 - 1
MAX_CLIENT_ID = 2**32 - 1
MAX_ACCOUNT_NAME_LENGTH = 64
FREE_LEAF = msgpack.packb(["free"], use_bin_type=True)
LIMITS_ROW_LENGTH = 6
# A time-ordered heap is rebuilt from the live records once its stale entries (of records
# forgotten early) outnumber them by this slack.
_HEAP_SLACK = 64


class HoldState(enum.StrEnum):
    OPEN = "open"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


_STATES = {state.value: state for state in HoldState}


class RecordError(ValueError):
    """A record table that no valid ledger could hold (untrusted snapshot or leaves)."""


@dataclass(frozen=True)
class LedgerLimits:
    """The bounds of issue 11's records (see the module docstring)."""

    max_hold_duration_ms: int = 3_600_000
    max_holds_per_client: int = 256
    max_accounts_per_client: int = 16
    closed_hold_retention_ms: int = 3_600_000
    refund_window_ms: int = 3_600_000
    max_refundable_per_client: int = 256

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_hold_duration_ms", 1, MAX_DURATION_MS),
            ("max_holds_per_client", 0, MAX_PER_CLIENT),
            ("max_accounts_per_client", 0, MAX_PER_CLIENT),
            ("closed_hold_retention_ms", 0, MAX_DURATION_MS),
            ("refund_window_ms", 0, MAX_DURATION_MS),
            ("max_refundable_per_client", 0, MAX_PER_CLIENT),
        ):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")

    def row(self) -> list[int]:
        """As snapshots and the digest's header leaf carry it."""
        return [
            self.max_hold_duration_ms,
            self.max_holds_per_client,
            self.max_accounts_per_client,
            self.closed_hold_retention_ms,
            self.refund_window_ms,
            self.max_refundable_per_client,
        ]

    @classmethod
    def from_row(cls, row: object) -> LedgerLimits:
        if not isinstance(row, list) or len(row) != LIMITS_ROW_LENGTH:
            raise RecordError(f"limits must be a {LIMITS_ROW_LENGTH}-item array, got {row!r}")
        try:
            return cls(*row)
        except ValueError as error:
            raise RecordError(str(error)) from None


@dataclass(slots=True)
class Hold:
    """An authorization: `amount` of `payer`'s money held for `payee` until `expires_at`."""

    client_id: int
    request_id: int
    payer: str
    payee: str
    amount: int
    expires_at: int
    state: HoldState
    closed_at: int  # batch time it was captured, voided or expired; 0 while open
    slot: int

    @property
    def hold_id(self) -> tuple[int, int]:
        return (self.client_id, self.request_id)

    def fields(self) -> list[Any]:
        return [
            "hold",
            self.client_id,
            self.request_id,
            self.payer,
            self.payee,
            self.amount,
            self.expires_at,
            self.state.value,
            self.closed_at,
        ]


@dataclass(slots=True)
class Paid:
    """A confirmed transfer or capture, refundable until `refundable_until`."""

    client_id: int
    request_id: int
    payer: str
    payee: str
    amount: int
    refunded: int
    refundable_until: int
    slot: int

    def fields(self) -> list[Any]:
        return [
            "payment",
            self.client_id,
            self.request_id,
            self.payer,
            self.payee,
            self.amount,
            self.refunded,
            self.refundable_until,
        ]


@dataclass(slots=True)
class OpenedAccount:
    """An account a client opened (open_account): it starts empty and is never closed."""

    name: str
    owner: int
    available: int
    held: int
    slot: int

    def fields(self) -> list[Any]:
        return ["opened", self.name, self.owner, self.available, self.held]


Record = Hold | Paid | OpenedAccount
# Leaf tag -> number of items in the leaf, tag included.
RECORD_TAGS = {"free": 1, "hold": 9, "payment": 8, "opened": 5}


class Records:
    """Every hold, refundable payment and opened account, each at a slot."""

    def __init__(self, limits: LedgerLimits) -> None:
        self.limits = limits
        self.holds: dict[tuple[int, int], Hold] = {}
        self.payments: dict[tuple[int, int], Paid] = {}
        self.opened: dict[str, OpenedAccount] = {}
        self.slots: list[Record | None] = []
        self._free: list[int] = []
        # (expires_at, client, request) per hold authorized: an entry whose hold has closed
        # since is skipped when it comes due (cheaper than removing it from the heap).
        self._expiry: list[tuple[int, int, int]] = []
        # (forget at, client, request) of closed holds and of refundable payments, in time
        # order; an entry whose record was forgotten early (evicted) is skipped.
        self._closed: list[tuple[int, int, int]] = []
        self._refundable: list[tuple[int, int, int]] = []
        # Per client, (forget at, request) of its closed holds and of its refundable
        # payments: min-heaps holding only live records, whose top is the one to evict.
        self.closed_by: dict[int, list[tuple[int, int]]] = {}
        self.paid_by: dict[int, list[tuple[int, int]]] = {}
        self.open_holds: dict[int, int] = {}
        self.open_total = 0
        self.opened_by: dict[int, int] = {}
        # Slots changed since the last digest (a dict: the same order in every process).
        self.dirty: dict[int, None] = {}

    # -- slots -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slots)

    def _allocate(self, record: Record) -> int:
        if self._free:
            slot = heapq.heappop(self._free)
            self.slots[slot] = record
        else:
            slot = len(self.slots)
            self.slots.append(record)
        self.dirty[slot] = None
        return slot

    def _release_slot(self, slot: int) -> None:
        self.slots[slot] = None
        heapq.heappush(self._free, slot)
        self.dirty[slot] = None

    def touch(self, record: Record) -> None:
        self.dirty[record.slot] = None

    def leaf(self, slot: int) -> bytes:
        record = self.slots[slot]
        if record is None:
            return FREE_LEAF
        return msgpack.packb(record.fields(), use_bin_type=True)

    # -- holds -------------------------------------------------------------------------

    def holds_of(self, client_id: int) -> int:
        """How many holds, open or closed, count against `client_id`'s cap."""
        return self.open_holds.get(client_id, 0) + len(self.closed_by.get(client_id, ()))

    def add_hold(
        self, hold_id: tuple[int, int], payer: str, payee: str, amount: int, expires_at: int
    ) -> Hold:
        """Open a hold. The caller has checked the client's open holds are below the cap;
        at the cap its oldest closed hold is forgotten to make room."""
        client_id, request_id = hold_id
        if self.open_holds.get(client_id, 0) >= self.limits.max_holds_per_client:
            raise ValueError(f"client {client_id} is at its cap of open holds")
        if self.holds_of(client_id) >= self.limits.max_holds_per_client:
            _, oldest = _pop_own(self.closed_by, client_id)
            self._release_slot(self.holds.pop((client_id, oldest)).slot)
        hold = Hold(client_id, request_id, payer, payee, amount, expires_at, HoldState.OPEN, 0, 0)
        hold.slot = self._allocate(hold)
        self.holds[hold_id] = hold
        self.open_holds[client_id] = self.open_holds.get(client_id, 0) + 1
        self.open_total += 1
        heapq.heappush(self._expiry, (expires_at, client_id, request_id))
        if len(self._expiry) > 2 * self.open_total + _HEAP_SLACK:
            self._expiry = [
                (kept.expires_at, *kept.hold_id)
                for kept in self.holds.values()
                if kept.state is HoldState.OPEN
            ]
            heapq.heapify(self._expiry)
        return hold

    def close_hold(self, hold: Hold, state: HoldState, now_ms: int) -> None:
        hold.state = state
        hold.closed_at = now_ms
        self.touch(hold)
        left = self.open_holds[hold.client_id] - 1
        if left:
            self.open_holds[hold.client_id] = left
        else:
            del self.open_holds[hold.client_id]
        self.open_total -= 1
        forget_at = now_ms + self.limits.closed_hold_retention_ms
        heapq.heappush(self.closed_by.setdefault(hold.client_id, []), (forget_at, hold.request_id))
        heapq.heappush(self._closed, (forget_at, hold.client_id, hold.request_id))
        if len(self._closed) > 2 * (len(self.holds) - self.open_total) + _HEAP_SLACK:
            self._closed = _time_heap(self.closed_by)

    def due_expiries(self, now_ms: int) -> list[Hold]:
        """The open holds whose time is up at `now_ms`, in (expires_at, hold id) order."""
        due = []
        expiry = self._expiry
        while expiry and expiry[0][0] <= now_ms:
            _, client_id, request_id = heapq.heappop(expiry)
            hold = self.holds.get((client_id, request_id))
            if hold is not None and hold.state is HoldState.OPEN:
                due.append(hold)
        return due

    # -- payments ----------------------------------------------------------------------

    def add_payment(
        self, payment_id: tuple[int, int], payer: str, payee: str, amount: int, now_ms: int
    ) -> None:
        """Keep a confirmed payment refundable; at the client's cap its oldest refundable
        payment is forgotten to make room."""
        window, cap = self.limits.refund_window_ms, self.limits.max_refundable_per_client
        if window == 0 or cap == 0:
            return
        client_id, request_id = payment_id
        if len(self.paid_by.get(client_id, ())) >= cap:
            _, oldest = _pop_own(self.paid_by, client_id)
            self._release_slot(self.payments.pop((client_id, oldest)).slot)
        paid = Paid(client_id, request_id, payer, payee, amount, 0, now_ms + window, 0)
        paid.slot = self._allocate(paid)
        self.payments[payment_id] = paid
        heapq.heappush(self.paid_by.setdefault(client_id, []), (paid.refundable_until, request_id))
        heapq.heappush(self._refundable, (paid.refundable_until, client_id, request_id))
        if len(self._refundable) > 2 * len(self.payments) + _HEAP_SLACK:
            self._refundable = _time_heap(self.paid_by)

    # -- accounts ----------------------------------------------------------------------

    def open_account(self, name: str, owner: int) -> OpenedAccount:
        account = OpenedAccount(name, owner, 0, 0, 0)
        account.slot = self._allocate(account)
        self.opened[name] = account
        self.opened_by[owner] = self.opened_by.get(owner, 0) + 1
        return account

    # -- forgetting --------------------------------------------------------------------

    def forget(self, now_ms: int) -> None:
        """Drop closed holds past their retention and payments past their refund window."""
        closed = self._closed
        while closed and closed[0][0] <= now_ms:
            forget_at, client_id, request_id = heapq.heappop(closed)
            hold = self.holds.get((client_id, request_id))
            if hold is None:
                continue  # evicted for a newer hold of its client
            _drop_own(self.closed_by, client_id, (forget_at, request_id))
            del self.holds[(client_id, request_id)]
            self._release_slot(hold.slot)
        refundable = self._refundable
        while refundable and refundable[0][0] <= now_ms:
            forget_at, client_id, request_id = heapq.heappop(refundable)
            paid = self.payments.pop((client_id, request_id), None)
            if paid is None:
                continue  # evicted for a newer payment of its client
            _drop_own(self.paid_by, client_id, (forget_at, request_id))
            self._release_slot(paid.slot)

    # -- snapshots ---------------------------------------------------------------------

    def rows(self) -> list[list[Any]]:
        """[slot, *leaf fields] of every used slot, in slot order."""
        return [[slot, *record.fields()] for slot, record in enumerate(self.slots) if record]

    @classmethod
    def from_rows(
        cls,
        limits: LedgerLimits,
        slot_count: object,
        rows: object,
        now_ms: int,
        client_count: int,
    ) -> Records:
        """The inverse of rows() for untrusted input: RecordError unless every record is
        one a ledger at batch time `now_ms` with these limits and `client_count` clients
        could hold. (Whether the accounts named exist and the held balances match is the
        ledger's check.)"""
        # Checked before anything is allocated from it: a few bytes of snapshot must not
        # make us build billions of free slots.
        high = slot_bound(limits, client_count)
        if type(slot_count) is not int or not 0 <= slot_count <= high:
            raise RecordError(f"slot count must be an int in [0, {high}], got {slot_count!r}")
        if not isinstance(rows, list) or len(rows) > slot_count:
            raise RecordError("records must be an array of at most slot count rows")
        records = cls(limits)
        records.slots = [None] * slot_count
        previous = -1
        for row in rows:
            if not isinstance(row, list) or len(row) < 2:
                raise RecordError(f"record row must be [slot, tag, ...], got {row!r}")
            slot, fields = row[0], row[1:]
            if type(slot) is not int or not previous < slot < slot_count:
                raise RecordError(f"record slot {slot!r} unsorted, duplicated or out of range")
            previous = slot
            records._load(slot, fields, now_ms)
        records.finish_loading()
        return records

    def load_leaf(self, slot: int, fields: list[Any], now_ms: int, client_count: int) -> None:
        """Put a record leaf's fields (tag first) at `slot` (state transfer: leaves arrive
        in slot order after every client leaf, each checked as from_rows checks a row)."""
        if slot != len(self.slots):
            raise RecordError(f"record leaf for slot {slot} out of order")
        high = slot_bound(self.limits, client_count)
        if slot >= high:
            raise RecordError(f"more than {high} record slots for {client_count} clients")
        self.slots.append(None)
        if fields != ["free"]:
            self._load(slot, fields, now_ms)

    def finish_loading(self) -> None:
        """After load_leaf of every slot: the free list and the per-client caps."""
        self._free = [slot for slot, record in enumerate(self.slots) if record is None]
        self.open_total = sum(self.open_holds.values())
        limits = self.limits
        for client_id in sorted(dict.fromkeys([*self.open_holds, *self.closed_by])):
            count = self.holds_of(client_id)
            if count > limits.max_holds_per_client:
                raise RecordError(f"client {client_id} has {count} holds")
        for client_id, own in self.paid_by.items():
            if len(own) > limits.max_refundable_per_client:
                raise RecordError(f"client {client_id} has {len(own)} refundable payments")
        for client_id, count in self.opened_by.items():
            if count > self.limits.max_accounts_per_client:
                raise RecordError(f"client {client_id} opened {count} accounts")
        self.dirty.clear()

    def _load(self, slot: int, fields: list[Any], now_ms: int) -> None:
        tag = fields[0] if fields else None
        if not isinstance(tag, str) or RECORD_TAGS.get(tag) != len(fields) or tag == "free":
            raise RecordError(f"slot {slot}: not a record {fields!r}")
        limits = self.limits
        record: Record
        if tag == "hold":
            client_id, request_id, payer, payee, amount, expires_at, state, closed_at = fields[1:]
            hold_id = (_int(client_id, MAX_CLIENT_ID), _int(request_id, MAX_ID))
            hold_state = _STATES.get(state) if isinstance(state, str) else None
            if hold_state is None:
                raise RecordError(f"slot {slot}: hold state {state!r}")
            hold = Hold(
                *hold_id,
                _name(payer),
                _name(payee),
                _int(amount, MAX_AMOUNT, low=1),
                _int(expires_at, MAX_TIME_MS + MAX_DURATION_MS, low=1),
                hold_state,
                _int(closed_at, MAX_TIME_MS),
                slot,
            )
            if hold.payer == hold.payee or hold_id in self.holds:
                raise RecordError(f"slot {slot}: hold {hold_id} duplicated or to its payer")
            if hold_state is HoldState.OPEN:
                # Open: not yet due (expiry runs first in every batch) and not too long.
                if hold.closed_at or not now_ms < hold.expires_at:
                    raise RecordError(f"slot {slot}: open hold {hold_id} is due or closed")
                if hold.expires_at > now_ms + limits.max_hold_duration_ms:
                    raise RecordError(f"slot {slot}: hold {hold_id} longer than allowed")
                self.open_holds[hold_id[0]] = self.open_holds.get(hold_id[0], 0) + 1
                heapq.heappush(self._expiry, (hold.expires_at, *hold_id))
            else:
                # Forgotten at the first batch at or past forget_at; one closed in the
                # current batch is still here even when its retention is 0.
                forget_at = hold.closed_at + limits.closed_hold_retention_ms
                kept = forget_at > now_ms or hold.closed_at == now_ms
                if hold.closed_at > now_ms or not kept:
                    raise RecordError(f"slot {slot}: closed hold {hold_id} out of its time")
                heapq.heappush(self._closed, (forget_at, *hold_id))
                heapq.heappush(self.closed_by.setdefault(hold_id[0], []), (forget_at, hold_id[1]))
            self.holds[hold_id] = hold
            record = hold
        elif tag == "payment":
            client_id, request_id, payer, payee, amount, refunded, until = fields[1:]
            payment_id = (_int(client_id, MAX_CLIENT_ID), _int(request_id, MAX_ID))
            paid = Paid(
                *payment_id,
                _name(payer),
                _name(payee),
                _int(amount, MAX_AMOUNT, low=1),
                _int(refunded, MAX_AMOUNT),
                _int(until, MAX_TIME_MS + MAX_DURATION_MS),
                slot,
            )
            if paid.payer == paid.payee or payment_id in self.payments:
                raise RecordError(f"slot {slot}: payment {payment_id} duplicated or to its payer")
            if paid.refunded > paid.amount:
                raise RecordError(f"slot {slot}: payment {payment_id} refunded beyond its amount")
            if not now_ms < paid.refundable_until <= now_ms + limits.refund_window_ms:
                raise RecordError(f"slot {slot}: payment {payment_id} out of its window")
            self.payments[payment_id] = paid
            heapq.heappush(self._refundable, (paid.refundable_until, *payment_id))
            heapq.heappush(
                self.paid_by.setdefault(payment_id[0], []), (paid.refundable_until, payment_id[1])
            )
            record = paid
        else:
            name, owner, available, held = fields[1:]
            account = OpenedAccount(
                _name(name),
                _int(owner, MAX_ID),
                _int(available, MAX_AMOUNT),
                _int(held, MAX_AMOUNT),
                slot,
            )
            if account.name in self.opened:
                raise RecordError(f"slot {slot}: account {account.name!r} opened twice")
            self.opened[account.name] = account
            self.opened_by[account.owner] = self.opened_by.get(account.owner, 0) + 1
            record = account
        self.slots[slot] = record


def slot_bound(limits: LedgerLimits, client_count: int) -> int:
    """The most record slots a valid ledger with `client_count` clients can have. Every
    record counts against a client of the dedup table (which never forgets a client), and
    the slots grow only to the most records held at once, so at most every client at every
    cap, and never more than MAX_SLOTS."""
    per_client = (
        limits.max_holds_per_client
        + (limits.max_refundable_per_client if limits.refund_window_ms else 0)
        + limits.max_accounts_per_client
    )
    return min(MAX_SLOTS, client_count * per_client)


def _pop_own(by_client: dict[int, list[tuple[int, int]]], client_id: int) -> tuple[int, int]:
    """Pop a client's oldest (forget at, request) entry."""
    own = by_client[client_id]
    entry = heapq.heappop(own)
    if not own:
        del by_client[client_id]
    return entry


def _drop_own(
    by_client: dict[int, list[tuple[int, int]]], client_id: int, entry: tuple[int, int]
) -> None:
    """Remove a record forgotten by time from its client's heap: the time heap forgets in
    (time, client, request) order and evictions take each client's oldest, so the record
    is that heap's top; anything else is searched for rather than trusted."""
    own = by_client[client_id]
    if own[0] == entry:
        heapq.heappop(own)
    else:
        own.remove(entry)
        heapq.heapify(own)
    if not own:
        del by_client[client_id]


def _time_heap(by_client: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    """The (time, client, request) heap of every live entry of the per-client heaps."""
    heap = [(at, client_id, request) for client_id, own in by_client.items() for at, request in own]
    heapq.heapify(heap)
    return heap


def _int(value: object, high: int, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= high:
        raise RecordError(f"expected an int in [{low}, {high}], got {value!r}")
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ACCOUNT_NAME_LENGTH:
        raise RecordError(f"expected an account name, got {value!r}")
    return value
