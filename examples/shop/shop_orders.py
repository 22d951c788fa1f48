"""What the shop does next with an order: a pure function of its journal and the gateway's
answers (no I/O here, so every case is tested directly: tests/test_shop_orders.py).

An order moves through the journal's stages (examples/shop/shop_store.py writes them):

    started --held--> reserved --captured--> done(fulfilled)
       |                 \\--hold gone/refused--> released --voided--> done(cancelled)
       |--held, no stock--> out_of_stock --voided--> done(out_of_stock)
       \\--rejected/refused--> done(declined)

Each stage has exactly one gateway call that moves it on (authorize, capture or void), each
with its own Idempotency-Key fixed when the order started, so repeating the call after a
crash, a timeout or a restart of either process places no second hold and takes no second
capture: the gateway replays the first answer. The stock is touched only in the shop's own
SQLite transactions (reserve, release), each journalled in the same transaction. So the
invariant "charged if and only if an item was reserved" holds at every crash point: money
moves only by the capture, which is only ever sent from `reserved`; stock leaves `reserved`
only when the capture can no longer happen (the hold is voided, expired or refused).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

PROBLEM_PREFIX = "https://pbft-payments.dev/problems/"
# The problem types that mean "the same request may still succeed: ask again, same key".
# cluster-timeout: the cluster did not answer in time (504; the payment is pending).
# idempotency-key-in-flight: the key's first request is still running in the gateway (409).
# payment-pending: the payment operated on is not decided yet (409).
RETRYABLE_PROBLEMS = frozenset({"cluster-timeout", "idempotency-key-in-flight", "payment-pending"})
# The problem type of a decided rejection of capture/void/refund (409 with "reason").
REJECTED_PROBLEM = "operation-rejected"
# The same key was used with another body: never by this shop (the body comes from the
# journal), so it means a hold may exist that the shop cannot see. Needs a person.
KEY_REUSED_PROBLEMS = frozenset({"idempotency-key-reused"})


class Stage(enum.StrEnum):
    STARTED = "started"
    RESERVED = "reserved"
    OUT_OF_STOCK = "out_of_stock"
    RELEASED = "released"
    DONE = "done"


class Outcome(enum.StrEnum):
    FULFILLED = "fulfilled"  # captured, item reserved
    OUT_OF_STOCK = "out_of_stock"  # hold voided, no item
    DECLINED = "declined"  # the authorization was rejected or refused: nothing held
    CANCELLED = "cancelled"  # the hold ended (expired, voided, refused capture): item released


class Call(enum.StrEnum):
    """The gateway calls, each with its own idempotency key."""

    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"


class Kind(enum.StrEnum):
    """An HTTP answer of the gateway, reduced to what the shop decides on."""

    PAYMENT = "payment"  # 200 with the payment object
    REJECTED = "rejected"  # 409 operation-rejected: the cluster refused the operation
    RETRY = "retry"  # 504, 409 in flight, 429, 5xx, no connection: same call again later
    REFUSED = "refused"  # 400/404/413/422 input problem: the gateway sent nothing
    DENIED = "denied"  # 401/403: the shop's key does not (or no longer) allow it
    KEY_REUSED = "key_reused"  # 422 for the same key with another body
    UNKNOWN = "unknown"  # a conflict (409) of a type the shop does not know


@dataclass(frozen=True)
class Answer:
    kind: Kind
    status: str = ""  # the payment's status, for PAYMENT
    reason: str = ""  # the cluster's reason (PAYMENT, REJECTED) or the problem's title
    payment_id: str = ""  # when the answer names the payment (also a 504's problem)


class Do(enum.StrEnum):
    CALL = "call"  # make `call` (again, same key)
    RETRY = "retry"  # wait, then make the same call again
    RESERVE = "reserve"  # take one item in a transaction: -> reserved or out_of_stock
    RELEASE = "release"  # give the item back (-> released), then void
    FINISH = "finish"  # journal done with `outcome`
    STUCK = "stuck"  # the shop cannot tell what is safe: keep everything, tell a person


@dataclass(frozen=True)
class Step:
    do: Do
    call: Call | None = None
    outcome: Outcome | None = None
    note: str = ""


# The one call that moves each unfinished stage on.
STAGE_CALL = {
    Stage.STARTED: Call.AUTHORIZE,
    Stage.RESERVED: Call.CAPTURE,
    Stage.OUT_OF_STOCK: Call.VOID,
    Stage.RELEASED: Call.VOID,
}
# Hold states after which no capture can happen (a void is then a no-op).
_HOLD_OVER = frozenset({"voided", "expired", "rejected"})
_HOLD_OVER_REASONS = frozenset({"hold_already_voided", "hold_expired", "hold_not_found"})
_CAPTURED = frozenset({"captured", "refunded"})


def first_step(stage: Stage) -> Step:
    """Where an order of this stage resumes (after a restart too)."""
    if stage is Stage.DONE:
        raise ValueError("a done order has no next step")
    return Step(Do.CALL, STAGE_CALL[stage])


def after(stage: Stage, answer: Answer) -> Step:
    """The next step once the stage's call got `answer`."""
    call = STAGE_CALL[stage]
    if answer.kind is Kind.RETRY:
        return Step(Do.RETRY, call, note=answer.reason)
    if answer.kind in (Kind.DENIED, Kind.KEY_REUSED, Kind.UNKNOWN):
        # A hold may exist that this key cannot see or touch: nothing is safe to assume.
        return Step(Do.STUCK, note=f"{call} {answer.kind}: {answer.reason}")
    if stage is Stage.STARTED:
        return _after_authorize(answer)
    if stage is Stage.RESERVED:
        return _after_capture(answer)
    return _after_void(stage, answer)


def _after_authorize(answer: Answer) -> Step:
    if answer.kind is Kind.REFUSED:
        # Refused before anything was sent (the same body is refused on every attempt).
        return Step(Do.FINISH, outcome=Outcome.DECLINED, note=answer.reason)
    if answer.kind is Kind.REJECTED:
        # POST /v1/payments answers a rejection as a payment (200), except the cluster's
        # `unauthorized` (403): the buyer's client may not spend from that account.
        if answer.reason == "unauthorized":
            return Step(Do.FINISH, outcome=Outcome.DECLINED, note=answer.reason)
        return Step(Do.STUCK, note=f"authorize answered rejected {answer.reason}")
    status = answer.status
    if status == "held":
        return Step(Do.RESERVE)
    if status in _HOLD_OVER:
        return Step(Do.FINISH, outcome=Outcome.DECLINED, note=answer.reason or status)
    if status == "pending":
        return Step(Do.RETRY, Call.AUTHORIZE, note="pending")
    # captured/confirmed before the shop reserved anything: it never asks for either.
    return Step(Do.STUCK, note=f"authorize answered {status!r}")


def _after_capture(answer: Answer) -> Step:
    if answer.kind is Kind.PAYMENT:
        if answer.status in _CAPTURED:
            return Step(Do.FINISH, outcome=Outcome.FULFILLED)
        if answer.status in _HOLD_OVER:
            return Step(Do.RELEASE, note=answer.status)
        # held/pending: the capture is not decided yet.
        return Step(Do.RETRY, Call.CAPTURE, note=answer.status)
    if answer.kind is Kind.REJECTED:
        if answer.reason == "hold_already_captured":
            return Step(Do.FINISH, outcome=Outcome.FULFILLED)
        # Expired, voided, forgotten, or refused for good: no capture will ever happen.
        return Step(Do.RELEASE, note=answer.reason)
    # REFUSED: the capture cannot be sent as it is (our bug): keep the item, the hold open.
    return Step(Do.STUCK, note=f"capture refused: {answer.reason}")


def _after_void(stage: Stage, answer: Answer) -> Step:
    outcome = Outcome.OUT_OF_STOCK if stage is Stage.OUT_OF_STOCK else Outcome.CANCELLED
    if answer.kind is Kind.PAYMENT:
        if answer.status in _HOLD_OVER:
            return Step(Do.FINISH, outcome=outcome)
        if answer.status in _CAPTURED:
            return Step(Do.STUCK, note="charged without an item")
        return Step(Do.RETRY, Call.VOID, note=answer.status)
    if answer.kind is Kind.REJECTED:
        if answer.reason in _HOLD_OVER_REASONS:
            return Step(Do.FINISH, outcome=outcome, note=answer.reason)
        if answer.reason == "hold_already_captured":
            return Step(Do.STUCK, note="charged without an item")
    return Step(Do.STUCK, note=f"void {answer.kind}: {answer.reason}")


def classify(status_code: int | None, body: Any) -> Answer:
    """Reduce the gateway's HTTP answer (None: no answer at all) to an Answer.

    `body` is the decoded JSON (anything: the gateway is outside this process); with no
    answer, what went wrong (a str)."""
    if status_code is None:
        return Answer(Kind.RETRY, reason=f"no answer: {_text(body) or 'unknown'}")
    fields = body if isinstance(body, dict) else {}
    payment_id = _text(fields.get("id" if status_code == 200 else "payment_id"))
    if not _PAYMENT_ID.fullmatch(payment_id):
        payment_id = ""  # it goes into a URL path: only the gateway's own id shape

    if status_code == 200:
        status = _text(fields.get("status"))
        if fields.get("object") != "payment" or not status:
            return Answer(Kind.RETRY, reason="200 without a payment")
        return Answer(Kind.PAYMENT, status, _text(fields.get("reason")), payment_id)
    slug = _text(fields.get("type")).removeprefix(PROBLEM_PREFIX)
    detail = f"{status_code} {slug or 'no problem type'}: {_text(fields.get('detail'))}"
    reason = _text(fields.get("reason"))
    if status_code == 409 and slug == REJECTED_PROBLEM:
        return Answer(Kind.REJECTED, reason=reason or detail, payment_id=payment_id)
    if status_code == 403 and reason == "unauthorized" and "operation" in fields:
        # The cluster itself refused the operation to this client: decided, receipted.
        return Answer(Kind.REJECTED, reason=reason, payment_id=payment_id)
    if slug in RETRYABLE_PROBLEMS or status_code in (408, 429, 502, 503, 504):
        return Answer(Kind.RETRY, reason=detail, payment_id=payment_id)
    if status_code >= 500:
        return Answer(Kind.RETRY, reason=detail)
    if status_code == 409:
        # A conflict the shop does not know (not-a-hold, ...): nothing is safe to assume.
        return Answer(Kind.UNKNOWN, reason=detail)
    if slug in KEY_REUSED_PROBLEMS:
        return Answer(Kind.KEY_REUSED, reason=detail)
    if status_code == 403 and fields.get("field") in ("from", "to"):
        # The order names an account its client does not own: the service refuses that
        # before it records anything, on every attempt alike (owners never change).
        return Answer(Kind.REFUSED, reason=detail)
    if status_code in (401, 403):
        return Answer(Kind.DENIED, reason=detail)
    return Answer(Kind.REFUSED, reason=detail)


_PAYMENT_ID = re.compile(r"pay_[0-9]{1,10}_[0-9]{1,20}")


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def idempotency_key(shop: str, instance: str, order_id: str, nonce: str, call: Call) -> str:
    """The key of one call of one order: the same on every attempt, in every process.

    `instance` is the database's random id and `nonce` the order's, drawn when it was first
    journalled: a lost or restored database, or another one under the same shop name,
    makes other keys for a re-posted order id instead of replaying holds it never made."""
    return f"{shop}:{instance}:{order_id}:{nonce}:{call}"
