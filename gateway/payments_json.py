"""The payment object: what the API returns for a payment, and every event's `data`.

Built only from the gateway's stored rows (gateway/store.py), so a payment renders the same
bytes whoever asks and whenever: a replayed response, an event and a GET agree.
"""

from __future__ import annotations

import base64
from typing import Any

from gateway.store import OperationRow, PaymentRow
from pbft.messages import Reply
from pbft.receipt import Receipt, decode_receipt, short_id
from pbft.signed import Rejected, peek

# Metadata: at most this many keys, each key and value a string of at most these lengths.
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500
# A payment shows at most its last this many operations ("operations_has_more" says whether
# there are older ones), so a payment, a list page and an event stay small however many
# operations it had (the service also caps them: MAX_OPERATIONS in gateway/service.py).
MAX_RENDERED_OPERATIONS = 20
PENDING = "pending"
REJECTED = "rejected"
FIRST_OPS = ("transfer", "authorize")


def payment_id(client_id: int, request_id: int) -> str:
    return f"pay_{client_id}_{request_id}"


def parse_payment_id(text: str) -> tuple[int, int] | None:
    """(client, request id) of a payment id, None if `text` is not one."""
    if not isinstance(text, str) or len(text) > 64 or not text.isascii():
        return None
    parts = text.split("_")
    if len(parts) != 3 or parts[0] != "pay" or not all(p.isdigit() for p in parts[1:]):
        return None
    return int(parts[1]), int(parts[2])


def reason_text(reason: str) -> str:
    """The cluster's reason code as the API shows it: "none" for a confirmed decision."""
    return reason or "none"


def receipt_json(data: bytes | None, op: str) -> dict[str, Any] | None:
    """A receipt's bytes (base64) and its fields as read from it, without verifying it
    (the gateway got it from f + 1 matching replies; anyone can check it with
    POST /v1/receipts/verify or `pbft verify-receipt`)."""
    if data is None:
        return None
    receipt: Receipt = decode_receipt(data)
    signers: list[int] = []
    fields: dict[str, Any] = {"client": None, "request_id": None, "seq": 0}
    outcome, reason = "", ""
    for raw in receipt.replies:
        try:
            _envelope, reply = peek(raw, Reply)
        except Rejected:
            continue
        if isinstance(reply, Reply):
            signers.append(reply.replica)
            fields = {"client": reply.client_id, "request_id": reply.request_id, "seq": reply.seq}
            outcome, reason = reply.outcome, reply.reason
    return {
        "data": base64.b64encode(data).decode("ascii"),
        "client": fields["client"],
        "request_id": fields["request_id"],
        "op": op,
        "outcome": outcome,
        "reason": reason_text(reason),
        "seq": fields["seq"],
        "cluster": short_id(receipt.cluster_id),
        "signers": sorted(signers),
    }


def operation_json(operation: OperationRow) -> dict[str, Any]:
    return {
        "op": operation.op,
        "request_id": operation.request_id,
        "outcome": operation.outcome,
        "reason": reason_text(operation.reason),
        "seq": operation.seq,
        "amount": operation.amount,
        "receipt": receipt_json(operation.receipt, operation.op),
    }


def shown_operations(operations: list[OperationRow]) -> list[OperationRow]:
    """The operations a payment lists: its own first one and every one not rejected. A
    rejected capture/void/refund changed nothing; its answer (with its receipt) is the
    Idempotency-Key's stored response, so retries with fresh keys cannot grow the payment."""
    return [o for o in operations if o.op in FIRST_OPS or o.outcome != REJECTED]


def payment_json(
    payment: PaymentRow,
    operations: list[OperationRow],
    viewer: int | None = None,
    recent: int | None = None,
) -> dict[str, Any]:
    """The payment as `viewer` (a client id) sees it: metadata is the creating client's own
    and is shown only to it (None: the creator's view, as events and stored answers are).
    At most the last `recent` operations are listed (events list only the latest one)."""
    first_op = "transfer" if payment.capture else "authorize"
    shown = shown_operations(operations)
    listed = shown[-(MAX_RENDERED_OPERATIONS if recent is None else recent) :]
    mine = viewer is None or viewer == payment.client_id
    return {
        "object": "payment",
        "id": payment.id,
        "status": payment.status,
        "reason": reason_text(payment.reason),
        "from": payment.from_account,
        "to": payment.to_account,
        "amount": payment.amount,
        "capture": payment.capture,
        "captured_amount": payment.captured_amount,
        "refunded_amount": payment.refunded_amount,
        "expires_in_ms": payment.expires_in_ms,
        "metadata": payment.metadata if mine else {},
        "seq": payment.seq,
        "created_ms": payment.created_ms,
        "updated_ms": payment.updated_ms,
        "receipt": receipt_json(payment.receipt, first_op),
        "operations": [operation_json(operation) for operation in listed],
        "operations_has_more": len(shown) > len(listed),
    }


def check_metadata(metadata: object) -> dict[str, str]:
    """The metadata as given if within the limits, else ValueError naming what is wrong."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object of strings")
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(metadata)} keys, at most {MAX_METADATA_KEYS}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY_LENGTH:
            raise ValueError(f"metadata keys must be 1..{MAX_METADATA_KEY_LENGTH} characters")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_LENGTH:
            raise ValueError(
                f"metadata value of {key!r} must be a string of at most "
                f"{MAX_METADATA_VALUE_LENGTH} characters"
            )
    return dict(metadata)
