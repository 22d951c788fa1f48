"""The payment service: payments, idempotency, resume after a crash, and the hold watch.

Every mutating call goes the same way (`PaymentService._mutate`):
1. the service's own checks (ownership, known payment) raise a Problem; nothing is kept;
2. the Idempotency-Key is looked up: answered before -> the stored bytes, exactly; same key
   with another route or body -> 422; first request still running in this process -> 409;
   recorded but unanswered (a timeout, a killed gateway) -> resubmitted with its request id;
3. otherwise the gateway picks the cluster request id and writes it, the key, the body's
   hash and the pending payment row to SQLite BEFORE sending anything (gateway/store.py);
4. the request goes to the cluster; its decision updates the payment, adds an event and
   answers the key in ONE transaction. No decision in time: 504 with the payment's id,
   the key stays unanswered and the payment pending; a retry with the same key (or the
   resume task, `run`) resubmits the SAME request id, and the cluster's exactly-once
   answers it with the original decision. If the cluster has forgotten the id (outcome
   unknown, request_expired) the status lookup (PaymentClient.status) resolves it.

A payment's status moves only as TRANSITIONS says; a rejected operation on a payment
leaves its status (except a capture or void refused because the hold expired: expired).
Each change of status writes one event payment.<new status>; every confirmed refund, partial
or not, writes payment.refunded (its data shows refunded_amount and the status).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from gateway import errors
from gateway.errors import Problem, dumps
from gateway.keys import Caller, bearer_token
from gateway.payments_json import (
    PENDING,
    check_metadata,
    parse_payment_id,
    payment_id,
    payment_json,
    reason_text,
    receipt_json,
)
from gateway.store import (
    DONE,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    AccountRow,
    Database,
    Decision,
    EventRow,
    GatewayStore,
    IdempotencyRecord,
    OperationRow,
    PaymentRow,
    now_ms,
)
from pbft.client import BalanceRead, ClientError, check_account_name
from pbft.ledger import MAX_AMOUNT
from pbft.operations import Op, Operation, Reason
from pbft.receipt import (
    MAX_RECEIPT_BYTES,
    UNKNOWN_OUTCOME_REASON,
    ReceiptError,
    UnreadableReceipt,
    short_id,
    verify_receipt,
)
from runtime.client import PaymentClient, PaymentTimeout
from runtime.cluster import Cluster

if TYPE_CHECKING:
    from runtime.node import ReplicaNode

# Statuses (the payment object's "status").
CONFIRMED = "confirmed"
REJECTED = "rejected"
HELD = "held"
CAPTURED = "captured"
VOIDED = "voided"
EXPIRED = "expired"
REFUNDED = "refunded"
STATUSES = (PENDING, CONFIRMED, REJECTED, HELD, CAPTURED, VOIDED, EXPIRED, REFUNDED)

# The payment status machine: (status, what was decided) -> new status. "expire" is the
# cluster releasing a hold at its expiry (seen through the hold lookup, or as a capture or
# void rejected with hold_expired). A confirmed refund keeps confirmed/captured until the
# refunds reach the amount paid ("refund_all" -> refunded). Anything not listed leaves
# the status as it is.
TRANSITIONS: dict[tuple[str, str], str] = {
    (PENDING, "transfer:confirmed"): CONFIRMED,
    (PENDING, "transfer:rejected"): REJECTED,
    (PENDING, "authorize:confirmed"): HELD,
    (PENDING, "authorize:rejected"): REJECTED,
    (HELD, "capture:confirmed"): CAPTURED,
    (HELD, "void:confirmed"): VOIDED,
    (HELD, "expire"): EXPIRED,
    (CONFIRMED, "refund_all:confirmed"): REFUNDED,
    (CAPTURED, "refund_all:confirmed"): REFUNDED,
}
# The operations that create a payment (its id is theirs).
FIRST_OPS = (Op.TRANSFER, Op.AUTHORIZE)
# The event each status change writes (and every confirmed refund: payment.refunded).
EVENT_TYPES = {status: f"payment.{status}" for status in STATUSES if status != PENDING}

DEFAULT_TIMEOUT_S = 10.0
# _execute's outer deadline, in client timeouts: a slot wait, the decision, a status lookup.
EXECUTE_BACKSTOP = 3
# A failing background pass waits twice as long each time, up to this (or its interval).
BACKGROUND_BACKOFF_MAX_S = 60.0
# The resume task: at most this many unanswered records per pass, this many at once.
RESUME_BATCH = 32
RESUME_CONCURRENCY = 8
RESUME_INTERVAL_S = 5.0
# The hold watch: at most this many due holds per pass, one pass per interval.
EXPIRY_BATCH = 64
EXPIRY_INTERVAL_S = 1.0
# A hold the cluster keeps open past its expiry is asked about again after 1 s, 2 s, ...
# up to a minute (per hold; at most this many holds remembered).
EXPIRY_BACKOFF_MIN_MS = 1_000
EXPIRY_BACKOFF_MAX_MS = 60_000
MAX_EXPIRY_BACKOFFS = 10_000
# The Idempotency-Key (of the hold's creator) of the void that makes an idle cluster
# release an expired hold (see PaymentService._nudge).
EXPIRY_VOID_KEY = "gateway-expiry-void:"
PRUNE_INTERVAL_S = 600.0
MAX_LIST_LIMIT = 100
# Operations (captures, voids, refunds, rejected or not, and the first one) per payment.
MAX_OPERATIONS = 100
# Base64 of the largest receipt, and a little slack for padding and whitespace.
MAX_RECEIPT_B64 = (MAX_RECEIPT_BYTES * 4) // 3 + 8

# The path parameter naming a payment (problems about it name this field).
PAYMENT_ID = "payment_id"
ROUTE_PAYMENTS = "POST /v1/payments"
ROUTE_CAPTURE = "POST /v1/payments/{id}/capture"
ROUTE_VOID = "POST /v1/payments/{id}/void"
ROUTE_REFUND = "POST /v1/payments/{id}/refunds"
ROUTE_ACCOUNTS = "POST /v1/accounts"


@dataclass(frozen=True)
class Stored:
    """A mutating call's answer: the status and the exact body bytes the HTTP layer
    sends (application/json below 400, application/problem+json from 400), the same
    bytes on every replay."""

    status_code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# A decision as the service applies it: (outcome, reason, seq, receipt bytes).
Outcome = tuple[str, str, int, bytes | None]
# The metrics hook: (op, outcome, reason, seconds from send to decision).
DecisionHook = Callable[[str, str, str, float], None]


def body_digest(route: str, body: dict[str, Any]) -> bytes:
    """What "the same request" means for an Idempotency-Key: the route (with the payment
    id) and the body, as canonical JSON."""
    return hashlib.sha256(_canonical([route, body])).digest()


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


class PaymentService:
    """The API's operations, each taking the Caller first (see common.md's contract)."""

    def __init__(self, gateway: Gateway, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s)) or not (
            0 < timeout_s <= 3600
        ):
            raise ValueError(f"cluster timeout must be in (0, 3600] seconds, got {timeout_s}")
        self.gateway = gateway
        self.timeout_s = float(timeout_s)
        # (client, Idempotency-Key) being worked on in this process: a second request with
        # the same key meanwhile is 409, and the resume task leaves it alone.
        self._active: set[tuple[int, str]] = set()
        self.counts: Counter[str] = Counter()
        self.on_decision: DecisionHook | None = None
        self._expiry_cursor = 0
        # Held payment id -> (when to ask again, ms; the last wait, ms): see _nudge.
        self._backoff: dict[str, tuple[int, int]] = {}

    @property
    def store(self) -> GatewayStore:
        return self.gateway.store

    # -- mutating operations --

    async def create_payment(self, caller: Caller, key: str, body: dict[str, Any]) -> Stored:
        payer = _account_field(body.get("from"), "from")
        payee = _account_field(body.get("to"), "to")
        amount = _amount_field(body.get("amount"), "amount")
        capture = body.get("capture", True)
        if type(capture) is not bool:
            raise errors.invalid_field("capture must be true or false", "capture")
        expires = body.get("expires_in_ms")
        if capture and expires is not None:
            raise errors.invalid_field(
                "expires_in_ms is for holds (capture: false) only", "expires_in_ms"
            )
        hold_ms = 0
        if not capture:
            hold_ms = (
                self.gateway.cluster.config.max_hold_duration_ms if expires is None else expires
            )
            longest = self.gateway.cluster.config.max_hold_duration_ms
            if type(hold_ms) is not int or not 0 < hold_ms <= longest:
                raise errors.invalid_field(
                    f"expires_in_ms must be an integer in 1..{longest} (the cluster's longest "
                    "hold)",
                    "expires_in_ms",
                )
        try:
            metadata = check_metadata(body.get("metadata"))
        except ValueError as error:
            raise errors.invalid_field(str(error), "metadata") from None
        canonical = {
            "from": payer,
            "to": payee,
            "amount": amount,
            "capture": capture,
            "expires_in_ms": None if capture else hold_ms,
            "metadata": metadata,
        }
        # An answered key replays its stored bytes before any check or cluster contact.
        replayed = await self._replayed(caller, key, ROUTE_PAYMENTS, canonical)
        if replayed is not None:
            return replayed
        from_owner = await self.gateway.owner(payer)
        if from_owner is not None and from_owner != caller.client_id:
            raise errors.forbidden(
                f"account {payer!r} is not owned by client {caller.client_id}", "from"
            )
        to_owner = await self.gateway.owner(payee)
        # An account neither the genesis nor this gateway knows: ask the cluster whether it
        # exists, so a typo is a 422 naming the field rather than a receipted rejection.
        for field, name, owner in (("from", payer, from_owner), ("to", payee, to_owner)):
            if owner is None and not await self._exists(caller, name):
                raise errors.unknown_account(name, field)

        def prepare(request_id: int) -> _Prepared:
            pid = payment_id(caller.client_id, request_id)
            created = now_ms()
            operation = (
                Operation.transfer(payer, payee, amount)
                if capture
                else Operation.authorize(payer, payee, amount, hold_ms)
            )
            payment = PaymentRow(
                id=pid,
                client_id=caller.client_id,
                request_id=request_id,
                from_account=payer,
                to_account=payee,
                from_owner=from_owner,
                to_owner=to_owner,
                amount=amount,
                capture=capture,
                status=PENDING,
                reason="",
                captured_amount=0,
                refunded_amount=0,
                expires_in_ms=None if capture else hold_ms,
                expires_at_ms=None,
                metadata=metadata,
                seq=0,
                receipt=None,
                created_ms=created,
                updated_ms=created,
            )
            return _Prepared(
                pid, operation, payment, _pending_op(pid, caller, request_id, operation)
            )

        return await self._mutate(caller, key, ROUTE_PAYMENTS, canonical, prepare)

    async def capture(
        self, caller: Caller, key: str, payment_id_: str, amount: int | None
    ) -> Stored:
        if amount is not None:
            amount = _amount_field(amount, "amount")
        route = ROUTE_CAPTURE.replace("{id}", str(payment_id_))
        replayed = await self._replayed(caller, key, route, {"amount": amount})
        if replayed is not None:
            return replayed
        payment = await self._payment_for(caller, payment_id_, "payee", ("capture", "to"))
        if payment.capture:
            raise _not_a_hold(payment.id, "capture")
        hold = (payment.client_id, payment.request_id)
        value = payment.amount if amount is None else amount
        return await self._mutate(
            caller,
            key,
            route,
            {"amount": amount},
            self._operation_on(caller, payment.id, Operation.capture(hold, value)),
        )

    async def void(self, caller: Caller, key: str, payment_id_: str) -> Stored:
        route = ROUTE_VOID.replace("{id}", str(payment_id_))
        replayed = await self._replayed(caller, key, route, {})
        if replayed is not None:
            return replayed
        payment = await self._payment_for(caller, payment_id_, "either", ("void", "from"))
        if payment.capture:
            raise _not_a_hold(payment.id, "void")
        hold = (payment.client_id, payment.request_id)
        return await self._mutate(
            caller, key, route, {}, self._operation_on(caller, payment.id, Operation.void(hold))
        )

    async def refund(self, caller: Caller, key: str, payment_id_: str, amount: int) -> Stored:
        amount = _amount_field(amount, "amount")
        route = ROUTE_REFUND.replace("{id}", str(payment_id_))
        replayed = await self._replayed(caller, key, route, {"amount": amount})
        if replayed is not None:
            return replayed
        payment = await self._payment_for(caller, payment_id_, "payee", ("refund", "to"))
        operation = Operation.refund((payment.client_id, payment.request_id), amount)
        return await self._mutate(
            caller,
            key,
            route,
            {"amount": amount},
            self._operation_on(caller, payment.id, operation),
        )

    async def open_account(self, caller: Caller, key: str, name: str) -> Stored:
        name = _account_field(name, "name")

        def prepare(request_id: int) -> _Prepared:
            return _Prepared(name, Operation.open_account(name), None, None)

        return await self._mutate(caller, key, ROUTE_ACCOUNTS, {"name": name}, prepare)

    # -- reads --

    async def get_payment(self, caller: Caller, payment_id_: str) -> dict[str, Any]:
        row, operations = await self._visible(caller, payment_id_, PAYMENT_ID)
        return payment_json(row, operations, caller.client_id)

    async def list_payments(
        self, caller: Caller, account: str | None, limit: int, starting_after: str | None
    ) -> dict[str, Any]:
        """The caller's payments (made by its client, or naming an account it owns), newest
        first, `limit` (1..100) at a time; `starting_after` is the last id of the previous
        page."""
        if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
            raise errors.invalid_parameter(
                f"limit must be an integer in 1..{MAX_LIST_LIMIT}", "limit"
            )
        if account is not None:
            account = _account_field(account, "account", parameter=True)
        before: int | None = None
        if starting_after is not None:
            row, _operations = await self._visible(caller, starting_after, "starting_after")
            before = row.row
        rows = await self.store.payments_of(caller.client_id, account, limit + 1, before)
        return {
            "object": "list",
            "data": [
                payment_json(row, operations, caller.client_id) for row, operations in rows[:limit]
            ],
            "has_more": len(rows) > limit,
        }

    async def account(self, caller: Caller, name: str) -> dict[str, Any]:
        """An account's balance read: available, held, and the seq the answer holds at."""
        name = _account_field(name, "name", parameter=True)
        owner = await self.gateway.owner(name)
        if owner is not None and owner != caller.client_id:
            raise errors.forbidden(
                f"account {name!r} is not owned by client {caller.client_id}", "name"
            )
        if owner is None:
            # The cluster's balance read checks no owner: an account this gateway does not
            # know to be the caller's (opened elsewhere, or none) is not confirmed to exist.
            raise Problem(
                404,
                "unknown-account",
                "Unknown account",
                f"no account {name!r} of client {caller.client_id} is known to this gateway "
                "(accounts are known from the genesis or when opened through it)",
                "name",
            )
        read = await self._read(caller, name)
        if not read.exists:
            raise errors.unknown_account(name, "name", status=404)
        return {"name": name, "available": read.balance, "held": read.held, "seq": read.seq}

    async def _exists(self, caller: Caller, name: str) -> bool:
        return (await self._read(caller, name)).exists

    async def _read(self, caller: Caller, name: str) -> BalanceRead:
        # The client owns the timeout (and waits for a free read slot within it): an outer
        # deadline of the same length would fire first and skip the client's own handling.
        try:
            return await self.gateway.client_for(caller).balance(name)
        except PaymentTimeout:
            self.counts["timeouts"] += 1
            raise errors.cluster_timeout(None, self.timeout_s, account=name) from None
        except ClientError as error:
            self.counts["client_errors"] += 1
            raise errors.cluster_unavailable(str(error)) from None

    def verify_receipt(self, receipt_b64: str) -> dict[str, Any]:
        """A receipt checked offline against this cluster's keys and id: a verdict ("valid",
        "invalid" with the reason, or "unreadable") and the fields it proves; never raises
        for bad input."""
        cluster = self.gateway.cluster
        base: dict[str, Any] = {
            "object": "receipt_verification",
            "cluster": short_id(cluster.cluster_id),
        }

        def refused(verdict: str, reason: str, detail: str) -> dict[str, Any]:
            return {**base, "valid": False, "verdict": verdict, "reason": reason, "detail": detail}

        if not isinstance(receipt_b64, str) or len(receipt_b64) > MAX_RECEIPT_B64:
            return refused("unreadable", "unreadable", "not a receipt: too long for one")
        try:
            data = base64.b64decode(receipt_b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            return refused("unreadable", "unreadable", "not a receipt: not valid base64")
        try:
            verified = verify_receipt(data, self.gateway.keyring, cluster.cluster_id)
        except UnreadableReceipt as error:
            return refused("unreadable", error.reason, str(error))
        except ReceiptError as error:
            return refused("invalid", error.reason, str(error))
        return {
            **base,
            "valid": True,
            "verdict": "valid",
            "reason": None,
            "detail": "the receipt proves this outcome",
            "client": verified.client_id,
            "request_id": verified.request_id,
            "payment_id": payment_id(verified.client_id, verified.request_id)
            if verified.op in (Op.TRANSFER, Op.AUTHORIZE)
            else None,
            "op": verified.op,
            "from": verified.payer,
            "to": verified.payee,
            "amount": verified.amount,
            "ref": payment_id(verified.ref_client, verified.ref_request)
            if verified.op in (Op.CAPTURE, Op.VOID, Op.REFUND)
            else None,
            "expires_in_ms": verified.expires_in_ms,
            "outcome": verified.outcome,
            "outcome_reason": reason_text(verified.reason),
            "seq": verified.seq,
            "signers": sorted(verified.replicas),
        }

    def statistics(self) -> dict[str, int]:
        return {"in_flight": len(self._active), **self.counts}

    # -- background passes (see `run`) --

    async def resume_pass(self, batch: int = RESUME_BATCH) -> int:
        """Resubmit every unanswered record nobody in this process is working on, with its
        own request id, at most RESUME_CONCURRENCY at a time; the number answered."""
        answered = 0
        after: tuple[int, str] = (-1, "")
        limiter = trio.CapacityLimiter(RESUME_CONCURRENCY)

        async def one(record: IdempotencyRecord) -> None:
            nonlocal answered
            slot = (record.client_id, record.key)
            async with limiter:
                if slot in self._active or record.client_id not in self.gateway.clients:
                    return
                self._active.add(slot)
                try:
                    current = await self.store.idempotency(*slot)
                    if current is None or current.state == DONE:
                        return  # answered since it was listed (by a retry through a route)
                    await self._execute(current)
                    answered += 1
                    self.counts["resumed"] += 1
                except (Problem, sqlite3.Error):
                    self.counts["resume_failed"] += 1  # a timeout: the next pass tries again
                finally:
                    self._active.discard(slot)

        while True:
            records = await self.store.in_flight(batch, after)
            if not records:
                return answered
            async with trio.open_nursery() as nursery:
                for record in records:
                    nursery.start_soon(one, record)
            after = (records[-1].client_id, records[-1].key)

    async def expiry_pass(self, batch: int = EXPIRY_BATCH) -> int:
        """Ask the cluster about held payments whose expiry has passed (at most `batch`) and
        record the fate of each closed one (expired; or captured/voided by a request made
        elsewhere); the number changed. A hold still open past its expiry (the cluster
        releases holds when it next executes a batch) is asked again next pass."""
        due = await self.store.holds_due(now_ms(), batch, self._expiry_cursor)
        # Round robin: the next pass goes on after these, so holds the cluster keeps open
        # past their expiry (it releases them with its next batch) cannot starve the rest.
        self._expiry_cursor = due[-1].row if len(due) == batch else 0
        changed = 0
        now = now_ms()
        for payment in due:
            retry = self._backoff.get(payment.id)
            if retry is not None and now < retry[0]:
                continue
            client = self.gateway.clients.get(payment.client_id) or next(
                iter(self.gateway.clients.values())
            )
            try:
                result = await client.hold((payment.client_id, payment.request_id))
            except PaymentTimeout:
                self.counts["expiry_lookup_timeouts"] += 1
                continue
            except ClientError:
                self.counts["expiry_lookup_errors"] += 1
                continue
            if result.state != "found" or result.hold is None:
                continue
            fate = result.hold.fate
            after = {"expired": EXPIRED, "captured": CAPTURED, "voided": VOIDED}.get(fate)
            if after is None:
                if fate == "open" and await self._nudge(payment, result.hold.expires_at_ms):
                    changed += 1
                continue
            self._backoff.pop(payment.id, None)
            if await self._hold_closed(
                payment.id, after, result.hold.closed_seq, result.hold.captured
            ):
                changed += 1
        return changed

    async def _nudge(self, payment: PaymentRow, expires_at_ms: int) -> bool:
        """A hold the cluster still has open past its expiry: it releases expired holds only
        when it executes a batch, and an idle cluster executes none. Once the expiry plus
        the cluster's clock skew margin has passed by this clock, the creator's client
        voids the hold through the service (an idempotent request like any other): that
        batch first releases the hold, so the void is rejected hold_expired (-> expired);
        confirmed, the hold had not expired by the cluster's time (-> voided). Until then,
        and after a void that decided nothing, the hold is asked about again later, each
        time waiting twice as long (per hold)."""
        now = now_ms()
        _due, delay = self._backoff.get(payment.id, (0, EXPIRY_BACKOFF_MIN_MS // 2))
        delay = min(delay * 2, EXPIRY_BACKOFF_MAX_MS)
        if len(self._backoff) < MAX_EXPIRY_BACKOFFS or payment.id in self._backoff:
            self._backoff[payment.id] = (now + delay, delay)
        margin = self.gateway.cluster.config.max_clock_skew_ms
        if now <= expires_at_ms + margin or payment.client_id not in self.gateway.clients:
            return False
        creator = Caller(client_id=payment.client_id, key_id=0)
        try:
            stored = await self.void(creator, f"{EXPIRY_VOID_KEY}{payment.id}", payment.id)
        except (Problem, ClientError):
            self.counts["expiry_void_failed"] += 1
            return False
        self.counts[f"expiry_void_{stored.status_code}"] += 1
        found = await self.store.payment(payment.id)
        if found is not None and found[0].status != HELD:
            self._backoff.pop(payment.id, None)
            return True
        return False

    async def _hold_closed(self, pid: str, after: str, seq: int, captured: int) -> bool:
        closed = await self.store.run(lambda db: _close_hold(db, pid, after, seq, captured))
        if closed and after == EXPIRED:
            self.counts["expired"] += 1
        return closed

    async def prune_pass(self) -> tuple[int, int]:
        return await self.store.prune()

    # -- the idempotent path --

    async def _mutate(
        self,
        caller: Caller,
        key: str,
        route: str,
        body: dict[str, Any],
        prepare: Callable[[int], _Prepared],
    ) -> Stored:
        _check_key(key)
        client = self.gateway.client_for(caller)
        slot = (caller.client_id, key)
        if slot in self._active:
            self.counts["idempotency_in_flight"] += 1
            raise errors.key_in_flight(key)
        digest = body_digest(route, body)
        candidate = client.new_request_id()

        def build(
            request_id: int,
        ) -> tuple[IdempotencyRecord, PaymentRow | None, OperationRow | None]:
            prepared = prepare(request_id)
            record = IdempotencyRecord(
                client_id=caller.client_id,
                key=key,
                route=route,
                body_sha256=digest,
                request_id=request_id,
                target=prepared.target,
                operation=_operation_fields(prepared.operation),
                state="in_flight",
                status_code=None,
                response=None,
                created_ms=now_ms(),
            )
            return record, prepared.payment, prepared.op_row

        self._active.add(slot)
        try:
            # The key, its request id and the pending payment are committed before the
            # request is sent (one transaction); a known key is answered or resubmitted.
            record, fresh = await self.store.run(
                lambda db: db.claim(caller.client_id, key, candidate, build)
            )
            if not fresh:
                stored = self._replay(record, route, digest)
                if record.state == DONE:
                    return stored
                self.counts["resubmitted"] += 1
            return await self._execute(record)
        finally:
            self._active.discard(slot)

    async def _replayed(
        self, caller: Caller, key: str, route: str, body: dict[str, Any]
    ) -> Stored | None:
        """The stored answer of an answered key (422 if it was used for another request),
        found before any check or cluster contact: the answer is what was decided then,
        whatever the cluster or the payment looks like now. None for a key not answered."""
        _check_key(key)
        record = await self.store.idempotency(caller.client_id, key)
        if record is None or record.state != DONE:
            return None
        return self._replay(record, route, body_digest(route, body))

    def _replay(self, record: IdempotencyRecord, route: str, digest: bytes) -> Stored:
        """The stored answer of `record`, or 422 if the key was first used for another
        request. (An unanswered record gives an empty Stored; the caller resubmits it.)"""
        if record.route != route or record.body_sha256 != digest:
            self.counts["idempotency_reused"] += 1
            raise errors.key_reused(record.route)
        if record.state != DONE or record.status_code is None or record.response is None:
            return Stored(0, b"")
        self.counts["replayed"] += 1
        return Stored(record.status_code, record.response)

    async def _execute(self, record: IdempotencyRecord) -> Stored:
        """Send `record`'s request (again: its request id is fixed) and apply its decision."""
        client = self.gateway.clients.get(record.client_id)
        if client is None:
            raise errors.forbidden(
                f"client {record.client_id} is not served by this gateway", "Authorization"
            )
        operation = Operation(**record.operation)
        target = record.target if operation.op != Op.OPEN_ACCOUNT else None
        started = trio.current_time()
        try:
            # A backstop only, never the same length as the client's own timeouts (which
            # must fire first to clean up): the decision and a status lookup each time out
            # in the client; this bounds the whole, a wait for a free slot included.
            with trio.fail_after(EXECUTE_BACKSTOP * self.timeout_s):
                decided = await client.submit(operation, record.request_id)
                outcome: Outcome = (
                    decided.outcome,
                    decided.reason,
                    decided.seq,
                    None if decided.receipt is None else decided.receipt.encode(),
                )
                if decided.outcome == "unknown" or decided.reason == UNKNOWN_OUTCOME_REASON:
                    outcome = await self._resolve(client, record)
        except (PaymentTimeout, trio.TooSlowError):
            self.counts["timeouts"] += 1
            raise errors.cluster_timeout(target, self.timeout_s) from None
        except ClientError as error:
            # Not expected: the service checks every field first, and one request id is
            # never sent twice at once. Not recorded as the key's answer: if it was sent
            # after all, its decision is still owed (a retry or the resume task gets it).
            self.counts["client_errors"] += 1
            raise errors.invalid_request(str(error)) from None
        if self.on_decision is not None:
            self.on_decision(operation.op, outcome[0], outcome[1], trio.current_time() - started)
        self.counts[f"decided_{outcome[0]}"] += 1
        return await self._apply(record, operation, outcome)

    async def _resolve(self, client: PaymentClient, record: IdempotencyRecord) -> Outcome:
        """The cluster no longer remembers this request id in its dedup window: ask the
        history (f + 1 replicas) what became of it."""
        self.counts["resolved_by_lookup"] += 1
        result = await client.status(record.client_id, record.request_id)
        if result.state == "found" and result.record is not None:
            found = result.record
            receipt = None if result.receipt is None else result.receipt.encode()
            return (found.outcome, found.reason, found.seq, receipt)
        if result.state == "not_found":
            # Never executed, and too old to be executed now: it never will be.
            return ("rejected", UNKNOWN_OUTCOME_REASON, result.as_of_seq, None)
        raise PaymentTimeout("the replicas no longer hold this request's history")

    async def _apply(
        self, record: IdempotencyRecord, operation: Operation, outcome: Outcome
    ) -> Stored:
        if operation.op == Op.OPEN_ACCOUNT:
            return await self._apply_account(record, outcome, now_ms())
        return await self.store.run(lambda db: self._apply_in(db, record, operation, outcome))

    def _apply_in(
        self, db: Database, record: IdempotencyRecord, operation: Operation, outcome: Outcome
    ) -> Stored:
        """Apply a decision to its payment: read, change and write in one call on the
        store's worker (under its lock), so two operations on one payment decided at once
        cannot lose either's change. A decision already applied (a resubmission racing
        another) changes nothing again; its answer is still recorded."""
        status_word, reason, seq, receipt = outcome
        now = now_ms()
        payment = db.payment(record.target)
        if payment is None:  # written with the record, in one transaction
            raise RuntimeError(f"payment {record.target} of a recorded request is missing")
        operations = db.operations(payment.id)
        mine = (record.client_id, record.request_id)
        index = next(
            (i for i, o in enumerate(operations) if (o.client_id, o.request_id) == mine), None
        )
        if index is None:  # written with the record, in one transaction
            raise RuntimeError(f"operation {mine} of payment {payment.id} is missing")
        applied = operations[index].outcome != PENDING
        op_row = operations[index] = replace(
            operations[index], outcome=status_word, reason=reason, seq=seq, receipt=receipt
        )
        events: list[EventRow] = []
        before = payment.status
        if not applied:
            after = self._transition(payment, operation, status_word, reason)
            if operation.op in (Op.TRANSFER, Op.AUTHORIZE):
                payment.receipt = receipt
                if after == HELD:
                    payment.expires_at_ms = now + operation.expires_in_ms
            if status_word == "confirmed" or after != before or operation.op in FIRST_OPS:
                payment.reason = reason
                payment.seq = max(payment.seq, seq)
            payment.status = after
            payment.updated_ms = now
        # The answer goes to the caller that made this operation (metadata: its creator's).
        rendered = payment_json(payment, operations, record.client_id)
        refunded = operation.op == Op.REFUND and status_word == "confirmed"
        if not applied and (payment.status != before or refunded):
            kind = EVENT_TYPES[REFUNDED] if refunded else EVENT_TYPES[payment.status]
            # An event carries the payment with its latest operation only, not its history.
            data = payment_json(payment, operations, recent=1)
            events.append(EventRow(kind, payment.id, payment.client_id, data))
        stored = self._answer(operation, payment.id, status_word, reason, rendered, op_row)
        db.decide(
            Decision(
                payment=None if applied else payment,
                operation=None if applied else op_row,
                events=events,
                answer=(record.client_id, record.key, stored.status_code, stored.body),
            )
        )
        return stored

    def _transition(
        self, payment: PaymentRow, operation: Operation, outcome: str, reason: str
    ) -> str:
        status = payment.status
        if operation.op == Op.CAPTURE and outcome == "confirmed":
            payment.captured_amount = operation.amount
        if operation.op == Op.REFUND and outcome == "confirmed":
            payment.refunded_amount += operation.amount
            paid = payment.amount if payment.capture else payment.captured_amount
            if payment.refunded_amount >= paid:
                return TRANSITIONS.get((status, "refund_all:confirmed"), status)
            return status
        if operation.op in (Op.CAPTURE, Op.VOID) and reason == Reason.HOLD_EXPIRED:
            return TRANSITIONS.get((status, "expire"), status)
        return TRANSITIONS.get((status, f"{operation.op}:{outcome}"), status)

    def _answer(
        self,
        operation: Operation,
        pid: str,
        outcome: str,
        reason: str,
        rendered: dict[str, Any],
        op_row: OperationRow,
    ) -> Stored:
        if outcome == "confirmed" or (
            operation.op in (Op.TRANSFER, Op.AUTHORIZE) and reason != Reason.UNAUTHORIZED
        ):
            return Stored(200, dumps(rendered))
        if reason == Reason.UNAUTHORIZED:
            problem = errors.forbidden(
                f"the cluster refused the {operation.op}: the API key's client may not do it",
                None,
                reason=reason,
                payment_id=pid,
                operation=_op_json(op_row),
            )
        else:
            problem = errors.operation_rejected(reason, _op_json(op_row), pid)
        return Stored(problem.status, problem.to_bytes())

    async def _apply_account(self, record: IdempotencyRecord, outcome: Outcome, now: int) -> Stored:
        status_word, reason, seq, receipt = outcome
        name = record.target
        state = "open" if status_word == "confirmed" else "rejected"
        account = AccountRow(name, record.client_id, record.request_id, state, reason, seq, now)
        body = {
            "object": "account",
            "name": name,
            "owner": record.client_id,
            "status": state,
            "reason": reason_text(reason),
            "seq": seq,
            "receipt": receipt_json(receipt, Op.OPEN_ACCOUNT),
        }
        if status_word == "confirmed":
            stored = Stored(200, dumps(body))
        elif reason == Reason.UNAUTHORIZED:
            stored = Stored(
                403, errors.forbidden("the cluster refused", "name", reason=reason).to_bytes()
            )
        else:
            problem = errors.Problem(
                409,
                "operation-rejected",
                "The cluster rejected the operation",
                f"the cluster rejected opening account {name!r}: {reason}",
                "name",
                reason=reason,
                operation=body,
            )
            stored = Stored(409, problem.to_bytes())
        await self.store.decide(
            Decision(
                account=account if state == "open" else None,
                answer=(record.client_id, record.key, stored.status_code, stored.body),
            )
        )
        return stored

    # -- helpers --

    async def _visible(
        self, caller: Caller, pid: str, field: str
    ) -> tuple[PaymentRow, list[OperationRow]]:
        """A payment the caller may see (its client made it, or owns one of its accounts);
        404 otherwise, so ids of others' payments are not confirmed to exist."""
        if parse_payment_id(pid) is None:
            raise errors.invalid_parameter(
                f"{pid!r} is not a payment id (pay_<client>_<request>)", field
            )
        found = await self.store.payment(pid)
        if found is None or caller.client_id not in _parties(found[0]):
            raise errors.not_found(f"no payment {pid}", field)
        return found

    async def _payment_for(
        self, caller: Caller, pid: str, who: str, what: tuple[str, str]
    ) -> PaymentRow:
        """The payment an operation acts on, 403 if its account's known owner is another
        client (capture and refund: the payee's owner; void: the payer's or payee's)."""
        payment, operations = await self._visible(caller, pid, PAYMENT_ID)
        owners = (payment.to_owner,) if who == "payee" else (payment.from_owner, payment.to_owner)
        if all(owner is not None for owner in owners) and caller.client_id not in owners:
            action, side = what
            raise errors.forbidden(
                f"only the owner of the payment's {side!r} account may {action} it", PAYMENT_ID
            )
        if payment.status == PENDING:
            # Its own decision is not known yet: an operation on it now could be decided
            # before it and then be overwritten by it here.
            raise errors.Problem(
                409,
                "payment-pending",
                "The payment is not decided yet",
                f"payment {payment.id} is still pending: retry its creation with the same "
                "Idempotency-Key, or GET it until it is decided",
                PAYMENT_ID,
                payment_id=payment.id,
            )
        if len(operations) >= MAX_OPERATIONS:
            # Each operation (rejected ones too) is a stored row with its receipt: bounded.
            raise errors.Problem(
                409,
                "too-many-operations",
                "The payment has too many operations",
                f"payment {payment.id} already has {len(operations)} operations, at most "
                f"{MAX_OPERATIONS}",
                PAYMENT_ID,
                payment_id=payment.id,
            )
        return payment

    def _operation_on(
        self, caller: Caller, pid: str, operation: Operation
    ) -> Callable[[int], _Prepared]:
        def prepare(request_id: int) -> _Prepared:
            return _Prepared(pid, operation, None, _pending_op(pid, caller, request_id, operation))

        return prepare


@dataclass(frozen=True)
class _Prepared:
    target: str
    operation: Operation
    payment: PaymentRow | None
    op_row: OperationRow | None


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise errors.invalid_header(
            f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_LENGTH} characters",
            "Idempotency-Key",
        )


def _pending_op(pid: str, caller: Caller, request_id: int, operation: Operation) -> OperationRow:
    return OperationRow(
        payment_id=pid,
        client_id=caller.client_id,
        request_id=request_id,
        op=operation.op,
        amount=operation.amount,
        outcome=PENDING,
        reason="",
        seq=0,
        receipt=None,
        created_ms=now_ms(),
    )


def _close_hold(db: Database, pid: str, after: str, seq: int, captured: int) -> bool:
    """Record a held payment's fate learnt from the cluster (in the store's worker, read and
    write in one step); False if it is no longer held here (decided meanwhile)."""
    payment = db.payment(pid)
    if payment is None or payment.status != HELD:
        return False
    payment.status = after
    payment.seq = max(payment.seq, seq)
    payment.updated_ms = now_ms()
    if after == EXPIRED:
        payment.reason = Reason.HOLD_EXPIRED.value
    elif after == CAPTURED:
        payment.captured_amount = captured
    rendered = payment_json(payment, db.operations(pid), recent=1)
    db.decide(
        Decision(
            payment=payment,
            events=[EventRow(EVENT_TYPES[after], payment.id, payment.client_id, rendered)],
        )
    )
    return True


def _op_json(op_row: OperationRow) -> dict[str, Any]:
    from gateway.payments_json import operation_json

    return operation_json(op_row)


def _operation_fields(operation: Operation) -> dict[str, Any]:
    return {
        "op": str(operation.op),
        "payer": operation.payer,
        "payee": operation.payee,
        "amount": operation.amount,
        "ref_client": operation.ref_client,
        "ref_request": operation.ref_request,
        "expires_in_ms": operation.expires_in_ms,
    }


def _parties(payment: PaymentRow) -> set[int]:
    return {
        owner
        for owner in (payment.client_id, payment.from_owner, payment.to_owner)
        if owner is not None
    }


def _account_field(value: object, field: str, parameter: bool = False) -> str:
    """An account name from the body (422) or the path or query (`parameter`: 400)."""
    try:
        return check_account_name(value, field)
    except ClientError as error:
        if parameter:
            raise errors.invalid_parameter(str(error), field) from None
        raise errors.invalid_field(str(error), field) from None


def _amount_field(value: object, field: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_AMOUNT:
        raise errors.invalid_field(f"{field} must be an integer in 1..{MAX_AMOUNT}", field)
    return value


def _not_a_hold(pid: str, action: str) -> Problem:
    return Problem(
        409,
        "not-a-hold",
        "The payment is not a hold",
        f"payment {pid} was made with capture: true: there is no hold to {action}",
        PAYMENT_ID,
        payment_id=pid,
    )


class Gateway:
    """One per process: the cluster, the store, one PaymentClient per served client, the
    payment service, and the embedded replica if any (gateway/server.py sets `node`)."""

    def __init__(
        self,
        cluster: Cluster,
        store: GatewayStore,
        clients: dict[int, PaymentClient],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not clients:
            raise ValueError("a gateway serves at least one client")
        self.cluster = cluster
        self.store = store
        self.clients = clients
        self.keyring = cluster.keyring()
        self.node: ReplicaNode | None = None
        self.service = PaymentService(self, timeout_s=timeout_s)
        self.started_ms = now_ms()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        cluster: Cluster,
        client_ids: Iterable[int],
        store: GatewayStore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> AsyncIterator[Gateway]:
        """A Gateway with one running PaymentClient per client id (keys from the cluster
        directory), closed with it. ClusterFileError for a client id the cluster lacks."""
        client_ids = list(client_ids)
        # StoreError if the database is another cluster's (before any client is running).
        cluster_id = short_id(cluster.cluster_id)
        await store.run(lambda db: db.bind_cluster(cluster_id, client_ids))
        async with AsyncExitStack() as stack:
            clients: dict[int, PaymentClient] = {}
            for client_id in client_ids:
                if client_id in clients:
                    continue
                client = PaymentClient(cluster, client_id, timeout_s=timeout_s)
                clients[client_id] = await stack.enter_async_context(client)
            yield cls(cluster, store, clients, timeout_s=timeout_s)

    async def authenticate(self, authorization: str | None) -> Caller:
        """The Caller an Authorization header names: 401 if missing, malformed, unknown or
        revoked; 403 if its client is not one this gateway serves."""
        token = bearer_token(authorization)
        if token is None:
            raise errors.unauthorized(
                "missing or malformed Authorization header (expected: Bearer gk_...)"
            )
        caller = await self.store.lookup_token(token)
        if caller is None:
            raise errors.unauthorized("unknown or revoked API key")
        if caller.client_id not in self.clients:
            served = ", ".join(str(client) for client in sorted(self.clients))
            raise errors.forbidden(
                f"this API key acts as client {caller.client_id}, which this gateway does not "
                f"serve (it serves {served})",
                "Authorization",
                client=caller.client_id,
            )
        return caller

    def client_for(self, caller: Caller) -> PaymentClient:
        client = self.clients.get(caller.client_id)
        if client is None:
            raise errors.forbidden(
                f"client {caller.client_id} is not served by this gateway", "Authorization"
            )
        return client

    async def owner(self, account: str) -> int | None:
        """The client owning `account` if known: from the genesis, or opened through this
        gateway; None otherwise (the cluster's own check then decides)."""
        genesis = self.cluster.accounts.get(account)
        if genesis is not None:
            return genesis.owner
        opened = await self.store.account(account)
        return None if opened is None else opened.client_id

    def statistics(self) -> dict[str, Any]:
        return {
            "service": self.service.statistics(),
            "clients": {
                client_id: client.statistics() for client_id, client in self.clients.items()
            },
        }


async def run(
    gateway: Gateway,
    *,
    resume_interval_s: float = RESUME_INTERVAL_S,
    expiry_interval_s: float = EXPIRY_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The service's background work, until cancelled: resume unanswered requests (left by a
    killed gateway, or a timeout nobody retried), watch held payments for expiry, prune old
    idempotency records and events. Started beside the HTTP server (gateway/server.py)."""
    async with trio.open_nursery() as nursery:
        service = gateway.service
        nursery.start_soon(_every, resume_interval_s, service.resume_pass, service.counts)
        nursery.start_soon(_every, expiry_interval_s, service.expiry_pass, service.counts)
        nursery.start_soon(_every, PRUNE_INTERVAL_S, service.prune_pass, service.counts)
        task_status.started()


async def _every(
    interval_s: float, work: Callable[[], Awaitable[object]], counts: Counter[str]
) -> None:
    """`work` now and then every `interval_s`; a pass that fails (the cluster away, the
    database busy) is counted and tried again next time, never fatal."""
    failures = 0
    while True:
        try:
            await work()
        except (sqlite3.Error, PaymentTimeout, trio.TooSlowError, Problem, ClientError):
            counts["background_pass_failed"] += 1
            failures = min(failures + 1, 16)
        else:
            failures = 0
        # Back off while passes fail (the cluster away), never slower than a minute.
        await trio.sleep(min(interval_s * 2**failures, max(interval_s, BACKGROUND_BACKOFF_MAX_S)))
