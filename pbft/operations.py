"""The ledger's operations and what executing them records (issue 11).

Pure values shared by the request codec (pbft/messages.py), the ledger, the client and the
Executed records observers read (pbft/events.py); no state lives here.

The request's wire fields are `client_id, request_id, op, payer, payee, amount, ref_client,
ref_request, expires_in_ms`. Which fields each op uses:
- transfer: payer, payee, amount.
- authorize: payer, payee, amount, expires_in_ms; the hold's id is (client_id, request_id).
- capture: ref = the hold's id, amount (at most what is held).
- void: ref = the hold's id.
- refund: ref = the payment's id (a transfer's own id, or for a capture its hold's id), amount.
- open_account: payer = the new account's name.
Every other field must be empty (""/0); the ledger rejects it otherwise (invalid_request).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Op(enum.StrEnum):
    """The operation codes; the value is the wire code."""

    TRANSFER = "transfer"
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"
    OPEN_ACCOUNT = "open_account"


class Reason(enum.StrEnum):
    """Why a request was rejected; the value is the wire/JSON code (the ledger says in
    which order each op checks them: pbft/ledger_ops.py)."""

    NONE = ""  # only with CONFIRMED
    ID_REUSED = "id_reused"  # same (client, request id) seen with a different body
    REQUEST_EXPIRED = "request_expired"  # older than the retained dedup window
    INVALID_AMOUNT = "invalid_amount"  # amount <= 0, > MAX_AMOUNT, or payee overflow
    SAME_ACCOUNT = "same_account"
    UNKNOWN_ACCOUNT = "unknown_account"
    UNAUTHORIZED = "unauthorized"  # the signing client may not ask for this (see Op)
    INSUFFICIENT_FUNDS = "insufficient_funds"
    # Issue 11's operations, in this fixed order after the above.
    INVALID_REQUEST = "invalid_request"  # a field the op does not use is not empty
    INVALID_EXPIRY = "invalid_expiry"  # authorize: expires_in_ms not in 1..max hold duration
    INVALID_ACCOUNT_NAME = "invalid_account_name"
    ACCOUNT_EXISTS = "account_exists"
    TOO_MANY_ACCOUNTS = "too_many_accounts"  # the client's cap on opened accounts
    HOLD_NOT_FOUND = "hold_not_found"
    HOLD_ALREADY_CAPTURED = "hold_already_captured"
    HOLD_ALREADY_VOIDED = "hold_already_voided"
    HOLD_EXPIRED = "hold_expired"
    EXCEEDS_HOLD = "exceeds_hold"
    TOO_MANY_HOLDS = "too_many_holds"  # the client's cap on open holds
    PAYMENT_NOT_FOUND = "payment_not_found"
    EXCEEDS_REFUNDABLE = "exceeds_refundable"


OP_CODES: tuple[str, ...] = tuple(op.value for op in Op)
# The longest op code: the wire's bound on the field.
MAX_OP_LENGTH = max(len(code) for code in OP_CODES)


@dataclass(frozen=True)
class Operation:
    """What a client asks the ledger to do, without who asks (client and request id).

    Build it with the constructors below: each fills exactly the fields its op uses."""

    op: str
    payer: str = ""
    payee: str = ""
    amount: int = 0
    ref_client: int = 0
    ref_request: int = 0
    expires_in_ms: int = 0

    @classmethod
    def transfer(cls, payer: str, payee: str, amount: int) -> Operation:
        return cls(Op.TRANSFER.value, payer, payee, amount)

    @classmethod
    def authorize(cls, payer: str, payee: str, amount: int, expires_in_ms: int) -> Operation:
        return cls(Op.AUTHORIZE.value, payer, payee, amount, expires_in_ms=expires_in_ms)

    @classmethod
    def capture(cls, hold: tuple[int, int], amount: int) -> Operation:
        return cls(Op.CAPTURE.value, amount=amount, ref_client=hold[0], ref_request=hold[1])

    @classmethod
    def void(cls, hold: tuple[int, int]) -> Operation:
        return cls(Op.VOID.value, ref_client=hold[0], ref_request=hold[1])

    @classmethod
    def refund(cls, payment: tuple[int, int], amount: int) -> Operation:
        return cls(Op.REFUND.value, amount=amount, ref_client=payment[0], ref_request=payment[1])

    @classmethod
    def open_account(cls, name: str) -> Operation:
        return cls(Op.OPEN_ACCOUNT.value, payer=name)


@dataclass(frozen=True)
class Payment:
    """One ordered request as the ledger executes it: who asks and the operation's fields
    (pbft/operations.py); the defaults are a plain transfer's."""

    client_id: int
    request_id: int
    payer: str
    payee: str
    amount: int
    op: str = Op.TRANSFER.value
    ref_client: int = 0
    ref_request: int = 0
    expires_in_ms: int = 0


@dataclass(frozen=True)
class Posting:
    """What one executed operation did to one account's balances (deltas may be negative)."""

    account: str
    available_delta: int
    held_delta: int


@dataclass(frozen=True)
class Release:
    """A hold released because it expired at the start of a batch: `amount` went back from
    `payer`'s held balance to its available balance."""

    hold_client: int
    hold_request: int
    payer: str
    amount: int
