"""Receipts: a client's proof of a payment's outcome, checkable offline.

A receipt is the client-signed request plus f + 1 replies from distinct replicas
that agree on the request digest, the sequence number, the outcome and the
reason. At most f replicas lie, so f + 1 matching replies include a correct one.
A reply's result (with the cluster id, pbft/genesis.py) is a leaf of the Merkle tree its
replica signed the root of, once per batch (pbft/replies.py): the reply carries the
inclusion proof, so the result is under the signature without a signature of its own.
The receipt names the cluster id too: anyone holding the cluster's public keys and
genesis (cluster.toml) can check a receipt with `verify_receipt`, with no network and no
trust in whoever hands it over, and a receipt from another cluster (even one sharing
keys) is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from crypto.keys import KeyRing
from crypto.signing import VerificationCache
from pbft.codec import DecodeError, ListOf, Spec, Struct, UInt, unpack
from pbft.config import MAX_REPLICAS, fault_tolerance_of
from pbft.drops import DropReason
from pbft.genesis import CLUSTER_ID_BYTES
from pbft.messages import ENVELOPE, HASH, Message, Reply, Request
from pbft.replies import check_reply
from pbft.signed import Envelope, Rejected, peek, verify_signature

# Version 3: each reply proves its result under a batch root signed once (pbft/replies.py).
# Version 2 replies were signed one by one, version 1 named no cluster: neither is read.
RECEIPT_VERSION = 3
# Far above any real receipt (a request and at most MAX_REPLICAS replies of a few
# hundred bytes each); anything larger is not a receipt.
MAX_RECEIPT_BYTES = 1024 * 1024
# A request and at most MAX_REPLICAS replies, each a handful of msgpack objects.
MAX_RECEIPT_ITEMS = 16 * (MAX_REPLICAS + 2)
# Replies with this reason mean "too old to tell": never a payment's outcome.
UNKNOWN_OUTCOME_REASON = "request_expired"


class ReceiptError(ValueError):
    """The receipt does not prove what it claims; the message says why in one line.

    `reason` is a short code: other_cluster, unknown_key, bad_signature, bad_proof,
    outcome_mismatch, too_few, other_request, duplicate_replica, malformed_part, expired,
    bad_keyring.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnreadableReceipt(ReceiptError):
    """The input is not a receipt this verifier can read (garbage, empty, another version):
    nothing was checked, so it is neither valid nor invalid."""


@dataclass(frozen=True)
class Receipt(Struct):
    version: int
    cluster_id: bytes
    request: bytes
    replies: tuple[bytes, ...]

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "version": UInt(255),
        "cluster_id": HASH,
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
    cluster_id: bytes
    # The operation's own fields (pbft/operations.py); a transfer's are "transfer", 0, 0, 0.
    op: str
    ref_client: int
    ref_request: int
    expires_in_ms: int


def short_id(cluster_id: bytes) -> str:
    """The first 16 hex digits: enough to tell clusters apart in a message."""
    return cluster_id.hex()[:16]


def decode_receipt(data: bytes) -> Receipt:
    """Bytes from a file or a peer to a Receipt, or UnreadableReceipt saying why not."""
    if len(data) == 0:
        raise UnreadableReceipt("unreadable", "not a receipt: the data is empty")
    if len(data) > MAX_RECEIPT_BYTES:
        raise UnreadableReceipt(
            "unreadable", f"not a receipt: {len(data)} bytes, more than any receipt"
        )
    try:
        # A receipt file is untrusted input too: bounded work, however it is nested.
        fields = unpack(data, MAX_RECEIPT_BYTES, max_items=MAX_RECEIPT_ITEMS)
    except DecodeError as error:
        raise UnreadableReceipt("unreadable", f"not a receipt: {error}") from None
    if type(fields) is list and fields and type(fields[0]) is int:
        _check_version(fields[0])
    try:
        return Receipt.decode(data)
    except DecodeError as error:
        raise UnreadableReceipt("unreadable", f"not a receipt: {error}") from None


def _check_version(version: int) -> None:
    if version != RECEIPT_VERSION:
        raise UnreadableReceipt(
            "unknown_version",
            f"unknown receipt version {version} (this verifier reads version {RECEIPT_VERSION})",
        )


def verify_receipt(
    receipt: Receipt | bytes,
    keyring: KeyRing,
    cluster_id: bytes,
    cache: VerificationCache | None = None,
) -> VerifiedReceipt:
    """Check a receipt against one cluster's public keys and id (pbft.genesis) alone."""
    if len(cluster_id) != CLUSTER_ID_BYTES:
        raise ValueError(f"a cluster id is {CLUSTER_ID_BYTES} bytes, got {len(cluster_id)}")
    cache = cache if cache is not None else VerificationCache(max_entries=1024)
    if isinstance(receipt, bytes):
        receipt = decode_receipt(receipt)
    _check_version(receipt.version)
    # Before any signature: the most useful thing to say about a receipt from elsewhere.
    if receipt.cluster_id != cluster_id:
        raise ReceiptError(
            "other_cluster",
            f"from another cluster: the receipt names cluster {short_id(receipt.cluster_id)}, "
            f"this cluster is {short_id(cluster_id)}",
        )
    replica_count = len(keyring.replica_ids())
    if replica_count < 4:
        raise ReceiptError("bad_keyring", "the key ring holds fewer than 4 replicas")
    needed = fault_tolerance_of(replica_count) + 1
    envelope, request = _open("request", receipt.request, Request, keyring, cache)
    if not isinstance(request, Request):
        raise ReceiptError("malformed_part", "request: not a payment request")
    digest = hashlib.sha256(envelope.body).digest()
    agreed: tuple[int, str, str] | None = None
    first_replica = -1
    replicas: dict[int, None] = {}
    for index, raw in enumerate(receipt.replies):
        reply = _open_reply(f"reply {index}", raw, keyring, cache, cluster_id)
        if (reply.client_id, reply.request_id, reply.request_digest) != (
            request.client_id,
            request.request_id,
            digest,
        ):
            raise ReceiptError(
                "other_request",
                f"reply {index} (replica {reply.replica}) answers another request",
            )
        decision = (reply.seq, reply.outcome, reply.reason)
        if agreed is None:
            agreed, first_replica = decision, reply.replica
        elif decision != agreed:
            raise ReceiptError(
                "outcome_mismatch",
                f"the signed replies disagree: replica {first_replica} says "
                f"{_describe(agreed)}, replica {reply.replica} says {_describe(decision)}",
            )
        if reply.replica in replicas:
            raise ReceiptError(
                "duplicate_replica", f"replica {reply.replica} signs twice (counted once)"
            )
        replicas[reply.replica] = None
    if agreed is None or len(replicas) < needed:
        raise ReceiptError(
            "too_few",
            f"too few signatures: {len(replicas)} replica(s) sign this outcome, "
            f"need f + 1 = {needed}",
        )
    seq, outcome, reason = agreed
    if reason == UNKNOWN_OUTCOME_REASON:
        # The cluster forgot this request id: the replies prove nothing about the payment.
        raise ReceiptError("expired", "the replies say the request expired: they prove no outcome")
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
        cluster_id,
        request.op,
        request.ref_client,
        request.ref_request,
        request.expires_in_ms,
    )


def _describe(decision: tuple[int, str, str]) -> str:
    seq, outcome, reason = decision
    return f"{outcome} ({reason}) at seq {seq}" if reason else f"{outcome} at seq {seq}"


def _open_reply(
    label: str, raw: bytes, keyring: KeyRing, cache: VerificationCache, cluster_id: bytes
) -> Reply:
    """Form, the cluster its result names, the inclusion proof, then the root's signature."""
    try:
        envelope, reply = peek(raw, Reply)
    except Rejected as error:
        raise ReceiptError("malformed_part", f"{label}: malformed ({error})") from None
    if not isinstance(reply, Reply):
        raise ReceiptError("malformed_part", f"{label}: not a reply")
    if reply.cluster_id != cluster_id:
        raise ReceiptError(
            "other_cluster",
            f"{label} (replica {reply.replica}) is from another cluster "
            f"({short_id(reply.cluster_id)}, this cluster is {short_id(cluster_id)})",
        )
    try:
        check_reply(envelope, reply, keyring, cache)
    except Rejected as error:
        who = f"replica {reply.replica}"
        if error.reason == DropReason.BAD_REPLY_PROOF:
            raise ReceiptError(
                "bad_proof",
                f"{label} ({who}): its result is not under the batch root it carries "
                f"(inclusion proof fails: {error.detail})",
            ) from None
        if error.reason == DropReason.UNKNOWN_SENDER:
            raise ReceiptError(
                "unknown_key", f"{label}: signed by {who}, who is not in this cluster"
            ) from None
        raise ReceiptError(
            "bad_signature",
            f"{label}: the batch root's signature is not {who}'s in this cluster "
            "(other keys, or an altered root, view, seq or batch size)",
        ) from None
    return reply


def _open(
    label: str, raw: bytes, expected: type[Message], keyring: KeyRing, cache: VerificationCache
) -> tuple[Envelope, Message]:
    """Form, then the signature."""
    try:
        envelope, message = peek(raw, expected)
    except Rejected as error:
        raise ReceiptError("malformed_part", f"{label}: malformed ({error})") from None
    try:
        verify_signature(envelope, message, keyring, cache)
    except Rejected as error:
        who = f"{message.SIGNER} {envelope.sender}"
        if error.reason == "unknown_sender":
            problem = f"signed by {who}, who is not in this cluster"
        else:
            problem = f"signed by unknown keys: not {who}'s key in this cluster"
        raise ReceiptError("unknown_key", f"{label}: {problem}") from None
    return envelope, message
