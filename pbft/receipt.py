"""Receipts: a client's proof of a payment's outcome, checkable offline.

A receipt is the client-signed request plus f + 1 replies from distinct replicas
that agree on the request digest, the sequence number, the outcome and the
reason. At most f replicas lie, so f + 1 matching replies include a correct one.
Anyone holding the cluster's public keys can check a receipt with
`verify_receipt`, with no network and no trust in whoever hands it over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from crypto.keys import KeyRing
from crypto.signing import VerificationCache
from pbft.codec import DecodeError, ListOf, Spec, Struct, UInt
from pbft.config import fault_tolerance_of
from pbft.messages import ENVELOPE, MAX_REPLICAS, Reply, Request
from pbft.signed import Rejected, open_envelope

RECEIPT_VERSION = 1
# Replies with this reason mean "too old to tell": never a payment's outcome.
UNKNOWN_OUTCOME_REASON = "request_expired"


class ReceiptError(ValueError):
    """The receipt does not prove what it claims; the message says why."""


@dataclass(frozen=True)
class Receipt(Struct):
    version: int
    request: bytes
    replies: tuple[bytes, ...]

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "version": UInt(255),
        "request": ENVELOPE,
        "replies": ListOf(ENVELOPE, MAX_REPLICAS),
    }


@dataclass(frozen=True)
class VerifiedReceipt:
    client_id: int
    request_id: int
    payer: str
    payee: str
    amount: int
    outcome: str
    reason: str
    seq: int
    replicas: tuple[int, ...]


def verify_receipt(
    receipt: Receipt | bytes, keyring: KeyRing, cache: VerificationCache | None = None
) -> VerifiedReceipt:
    """Check a receipt against the cluster's public keys alone."""
    cache = cache if cache is not None else VerificationCache(max_entries=1024)
    if isinstance(receipt, bytes):
        try:
            receipt = Receipt.decode(receipt)
        except DecodeError as error:
            raise ReceiptError(f"malformed receipt: {error}") from None
    if receipt.version != RECEIPT_VERSION:
        raise ReceiptError(f"unknown receipt version {receipt.version}")
    replica_count = len(keyring.replica_ids())
    if replica_count < 4:
        raise ReceiptError("the key ring holds fewer than 4 replicas")
    needed = fault_tolerance_of(replica_count) + 1
    try:
        request_opened = open_envelope(receipt.request, keyring, cache, Request)
    except Rejected as error:
        raise ReceiptError(f"request: {error}") from None
    request = request_opened.message
    if not isinstance(request, Request):
        raise ReceiptError("request: not a payment request")
    digest = hashlib.sha256(request_opened.body).digest()
    agreed: tuple[int, str, str] | None = None
    replicas: dict[int, None] = {}
    for index, raw in enumerate(receipt.replies):
        try:
            reply = open_envelope(raw, keyring, cache, Reply).message
        except Rejected as error:
            raise ReceiptError(f"reply {index}: {error}") from None
        if not isinstance(reply, Reply):
            raise ReceiptError(f"reply {index}: not a reply")
        if (reply.client_id, reply.request_id, reply.request_digest) != (
            request.client_id,
            request.request_id,
            digest,
        ):
            raise ReceiptError(f"reply {index} answers another request")
        decision = (reply.seq, reply.outcome, reply.reason)
        if agreed is None:
            agreed = decision
        elif decision != agreed:
            raise ReceiptError(f"reply {index} disagrees with the others")
        if reply.replica in replicas:
            raise ReceiptError(f"replica {reply.replica} counted twice")
        replicas[reply.replica] = None
    if agreed is None or len(replicas) < needed:
        raise ReceiptError(f"{len(replicas)} matching replies, need f + 1 = {needed}")
    seq, outcome, reason = agreed
    if reason == UNKNOWN_OUTCOME_REASON:
        # The cluster forgot this request id: the replies prove nothing about the payment.
        raise ReceiptError("the replies say the request expired: they prove no outcome")
    return VerifiedReceipt(
        request.client_id,
        request.request_id,
        request.payer,
        request.payee,
        request.amount,
        outcome,
        reason,
        seq,
        tuple(replicas),
    )
