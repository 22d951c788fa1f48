"""Tests for pbft.receipt: f + 1 matching signed replies prove a payment's outcome offline."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.codec import pack
from pbft.messages import Reply, Request
from pbft.receipt import RECEIPT_VERSION, Receipt, ReceiptError, VerifiedReceipt, verify_receipt
from pbft.signed import Envelope, seal

SEED = 31
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{i}") for i in range(4)]
CLIENT_ID = 3
CLIENT_KEY = SigningKey.derive(SEED, f"client/{CLIENT_ID}")
OTHER_CLIENT_KEY = SigningKey.derive(SEED, "client/4")
CLIENT_ZERO_KEY = SigningKey.derive(SEED, "client/0")
OUTSIDER_KEY = SigningKey.derive(SEED + 1, "replica/0")


def _keyring(replicas: int = 4) -> KeyRing:
    return KeyRing(
        {("replica", i): REPLICA_KEYS[i].verify_key for i in range(replicas)}
        | {
            ("client", CLIENT_ID): CLIENT_KEY.verify_key,
            ("client", 4): OTHER_CLIENT_KEY.verify_key,
            ("client", 0): CLIENT_ZERO_KEY.verify_key,
        }
    )


KEYRING = _keyring()
REQUEST = Request(CLIENT_ID, 9, "alice", "bob", 700)
REQUEST_RAW = seal(REQUEST, CLIENT_KEY)
DIGEST = hashlib.sha256(REQUEST.encode()).digest()
SEQ = 12


def _reply(
    replica: int,
    *,
    view: int = 1,
    seq: int = SEQ,
    outcome: str = "confirmed",
    reason: str = "",
    request_id: int = REQUEST.request_id,
    client_id: int = CLIENT_ID,
    digest: bytes = DIGEST,
    key: SigningKey | None = None,
) -> bytes:
    reply = Reply(view, seq, replica, client_id, request_id, digest, outcome, reason)
    return seal(reply, key if key is not None else REPLICA_KEYS[replica])


def _receipt(*replies: bytes, request: bytes = REQUEST_RAW) -> Receipt:
    return Receipt(RECEIPT_VERSION, request, replies)


def _error(receipt: Receipt | bytes, keyring: KeyRing = KEYRING) -> str:
    with pytest.raises(ReceiptError) as caught:
        verify_receipt(receipt, keyring)
    return str(caught.value)


# --- valid receipts ---------------------------------------------------------------------


def test_f_plus_one_matching_replies_make_a_valid_receipt() -> None:
    verified = verify_receipt(_receipt(_reply(0), _reply(2)), KEYRING)
    assert verified == VerifiedReceipt(
        client_id=CLIENT_ID,
        request_id=9,
        payer="alice",
        payee="bob",
        amount=700,
        outcome="confirmed",
        reason="",
        seq=SEQ,
        replicas=(0, 2),
    )


def test_receipt_verifies_after_encoding_to_bytes_and_back() -> None:
    receipt = _receipt(_reply(3), _reply(1, view=2))
    data = receipt.encode()
    assert Receipt.decode(data) == receipt
    from_bytes = verify_receipt(data, KEYRING)
    assert from_bytes == verify_receipt(Receipt.decode(data), KEYRING)
    assert from_bytes.replicas == (3, 1)


def test_receipt_for_a_rejected_payment_reports_the_reason() -> None:
    replies = [_reply(i, outcome="rejected", reason="insufficient_funds") for i in (1, 2)]
    verified = verify_receipt(_receipt(*replies), KEYRING)
    assert (verified.outcome, verified.reason, verified.seq) == (
        "rejected",
        "insufficient_funds",
        SEQ,
    )


def test_replies_from_different_views_still_agree() -> None:
    verified = verify_receipt(_receipt(_reply(0, view=0), _reply(1, view=5)), KEYRING)
    assert verified.replicas == (0, 1)


def test_more_than_f_plus_one_matching_replies_are_accepted() -> None:
    verified = verify_receipt(_receipt(*(_reply(i) for i in range(4))), KEYRING)
    assert verified.replicas == (0, 1, 2, 3)


def test_verification_accepts_a_shared_cache() -> None:
    cache = VerificationCache(max_entries=8)
    receipt = _receipt(_reply(0), _reply(1))
    verify_receipt(receipt, KEYRING, cache)
    verify_receipt(receipt, KEYRING, cache)
    assert cache.statistics().hits == 3  # the request and both replies, the second time


def test_larger_cluster_needs_more_replies() -> None:
    keys = [SigningKey.derive(SEED, f"replica/{i}") for i in range(7)]
    ring = KeyRing(
        {("replica", i): key.verify_key for i, key in enumerate(keys)}
        | {("client", CLIENT_ID): CLIENT_KEY.verify_key}
    )
    # n = 7: f = 2, so 3 replies are needed.
    assert "need f + 1 = 3" in _error(_receipt(_reply(0), _reply(1)), ring)
    assert verify_receipt(
        _receipt(_reply(0), _reply(1), _reply(6, key=keys[6])), ring
    ).replicas == (
        0,
        1,
        6,
    )


# --- rejections --------------------------------------------------------------------------


def test_only_f_replies_are_not_enough() -> None:
    assert "1 matching replies, need f + 1 = 2" in _error(_receipt(_reply(0)))


def test_receipt_with_no_replies_is_rejected() -> None:
    assert "0 matching replies" in _error(_receipt())


def test_two_replies_from_the_same_replica_count_once() -> None:
    assert "counted twice" in _error(_receipt(_reply(1), _reply(1)))
    # Even when the two differ in view (both signed by replica 1), it is one voice.
    assert "counted twice" in _error(_receipt(_reply(1, view=1), _reply(1, view=2)))


REJECTED_FUNDS = {"outcome": "rejected", "reason": "insufficient_funds"}


@pytest.mark.parametrize(
    ("base", "other"),
    [
        ({}, REJECTED_FUNDS),
        ({}, {"seq": SEQ + 1}),
        (REJECTED_FUNDS, {"outcome": "rejected", "reason": "unknown_account"}),
    ],
    ids=["outcome", "seq", "reason"],
)
def test_replies_that_disagree_are_rejected(
    base: dict[str, object], other: dict[str, object]
) -> None:
    first = _reply(0, **base)  # type: ignore[arg-type]
    second = _reply(1, **other)  # type: ignore[arg-type]
    assert "disagrees" in _error(_receipt(first, second))
    # And with enough agreeing replies around, one dissenter still spoils the receipt.
    third = _reply(2, **base)  # type: ignore[arg-type]
    assert verify_receipt(_receipt(first, third), KEYRING).replicas == (0, 2)
    assert "disagrees" in _error(_receipt(first, third, second))


@pytest.mark.parametrize(
    "changes",
    [
        {"request_id": REQUEST.request_id + 1},
        {"client_id": 4},
        {"digest": hashlib.sha256(b"another body").digest()},
    ],
    ids=["request_id", "client_id", "digest"],
)
def test_reply_for_another_request_is_rejected(changes: dict[str, object]) -> None:
    foreign = _reply(1, **changes)  # type: ignore[arg-type]
    assert "answers another request" in _error(_receipt(_reply(0), foreign))
    assert "answers another request" in _error(_receipt(foreign, _reply(0)))


def test_reply_signed_by_a_key_outside_the_ring_is_rejected() -> None:
    forged = _reply(1, key=OUTSIDER_KEY)
    assert "bad_signature" in _error(_receipt(_reply(0), forged))


def test_reply_signed_by_a_client_key_is_rejected() -> None:
    # Client 0's key, claiming to be replica 0.
    assert "bad_signature" in _error(_receipt(_reply(0, key=CLIENT_ZERO_KEY), _reply(1)))
    # The paying client's own key, claiming to be replica 1.
    assert "bad_signature" in _error(_receipt(_reply(0), _reply(1, key=CLIENT_KEY)))


def test_reply_from_a_replica_missing_from_the_ring_is_rejected() -> None:
    assert "unknown_sender" in _error(_receipt(_reply(0), _reply(1)), _keyring_without(1))


def _keyring_without(replica: int) -> KeyRing:
    ring = KeyRing({("client", CLIENT_ID): CLIENT_KEY.verify_key})
    for i in range(5):
        if i != replica:
            key = REPLICA_KEYS[i] if i < 4 else SigningKey.derive(SEED, "replica/4")
            ring.add(("replica", i), key.verify_key)
    return ring


def test_request_in_the_reply_slot_is_rejected() -> None:
    assert "unexpected_type" in _error(_receipt(_reply(0), REQUEST_RAW))


def test_reply_in_the_request_slot_is_rejected() -> None:
    error = _error(_receipt(_reply(0), _reply(1), request=_reply(2)))
    assert error.startswith("request:")
    assert "unexpected_type" in error


def test_tampered_request_is_rejected() -> None:
    envelope = Envelope.decode(REQUEST_RAW)
    richer = Request(CLIENT_ID, 9, "alice", "bob", 7_000_000)
    tampered = Envelope(
        envelope.version, envelope.type_code, envelope.sender, richer.encode(), envelope.signature
    ).encode()
    error = _error(_receipt(_reply(0), _reply(1), request=tampered))
    assert error.startswith("request:") and "bad_signature" in error


def test_request_re_signed_by_its_client_with_another_body_is_rejected() -> None:
    # The client itself swaps in a different payment under the same request id.
    other_body = seal(Request(CLIENT_ID, 9, "alice", "bob", 1), CLIENT_KEY)
    assert "answers another request" in _error(_receipt(_reply(0), _reply(1), request=other_body))


def test_request_signed_by_another_client_is_rejected() -> None:
    stolen = seal(REQUEST, OTHER_CLIENT_KEY)
    assert "bad_signature" in _error(_receipt(_reply(0), _reply(1), request=stolen))


def test_request_with_a_flipped_byte_is_rejected() -> None:
    receipt_replies = (_reply(0), _reply(1))
    for index in range(len(REQUEST_RAW)):
        flipped = bytearray(REQUEST_RAW)
        flipped[index] ^= 0x01
        with pytest.raises(ReceiptError):
            verify_receipt(_receipt(*receipt_replies, request=bytes(flipped)), KEYRING)


def test_unknown_receipt_version_is_rejected() -> None:
    receipt = Receipt(RECEIPT_VERSION + 1, REQUEST_RAW, (_reply(0), _reply(1)))
    assert "unknown receipt version" in _error(receipt)
    assert "unknown receipt version" in _error(receipt.encode())


@pytest.mark.parametrize("replicas", [0, 1, 3])
def test_key_ring_with_fewer_than_four_replicas_is_rejected(replicas: int) -> None:
    replies = [_reply(i) for i in range(replicas)]
    assert "fewer than 4 replicas" in _error(_receipt(*replies), _keyring(replicas))


def test_malformed_receipt_bytes_are_rejected() -> None:
    data = _receipt(_reply(0), _reply(1)).encode()
    assert "malformed receipt" in _error(data + b"\x00")
    assert "malformed receipt" in _error(data[:-1])
    assert "malformed receipt" in _error(pack([RECEIPT_VERSION, REQUEST_RAW]))
    assert "malformed receipt" in _error(b"")


@settings(max_examples=200, database=None, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_bytes_give_only_receipt_error(data: bytes) -> None:
    with pytest.raises(ReceiptError):
        verify_receipt(data, KEYRING)


@settings(max_examples=100, database=None, deadline=None)
@given(
    request=st.one_of(st.just(REQUEST_RAW), st.binary(min_size=1, max_size=80)),
    replies=st.lists(
        st.one_of(st.sampled_from([_reply(0), _reply(1)]), st.binary(min_size=1, max_size=80)),
        max_size=4,
    ),
)
def test_receipts_with_garbage_envelopes_give_only_receipt_error(
    request: bytes, replies: list[bytes]
) -> None:
    receipt = Receipt(RECEIPT_VERSION, request, tuple(replies))
    try:
        verified = verify_receipt(receipt.encode(), KEYRING)
    except ReceiptError:
        return
    # Only the genuine request with both genuine, distinct replies can pass.
    assert request == REQUEST_RAW
    assert sorted(replies) == sorted([_reply(0), _reply(1)])
    assert verified.amount == 700


@settings(max_examples=150, database=None, deadline=None)
@given(
    position=st.integers(0, 10_000),
    mask=st.integers(1, 255),
)
def test_receipt_with_a_flipped_byte_never_verifies(position: int, mask: int) -> None:
    data = bytearray(_receipt(_reply(0), _reply(1)).encode())
    data[position % len(data)] ^= mask
    with pytest.raises(ReceiptError):
        verify_receipt(bytes(data), KEYRING)
