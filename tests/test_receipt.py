"""Tests for pbft.receipt: f + 1 matching signed replies prove a payment's outcome offline."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.codec import pack
from pbft.config import ClusterConfig
from pbft.genesis import compute_cluster_id
from pbft.ledger import Account
from pbft.messages import MAX_REPLY_PATH, Reply, Request
from pbft.receipt import (
    RECEIPT_VERSION,
    Receipt,
    ReceiptError,
    UnreadableReceipt,
    VerifiedReceipt,
    verify_receipt,
)
from pbft.replies import ReplyResult, sign_replies
from pbft.signed import Envelope, peek, seal

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
GENESIS = {"alice": Account(CLIENT_ID, 10_000), "bob": Account(4, 0)}
CLUSTER_ID = compute_cluster_id(ClusterConfig(), KEYRING, GENESIS)
# The same keys with another genesis: another cluster.
OTHER_CLUSTER_ID = compute_cluster_id(ClusterConfig(), KEYRING, {**GENESIS, "bob": Account(4, 1)})
REQUEST = Request(CLIENT_ID, 9, "transfer", "alice", "bob", 700)
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
    cluster_id: bytes = CLUSTER_ID,
    batch: int = 5,
    index: int = 2,
) -> bytes:
    """A reply for the result at `index` of a batch of `batch` results (the others are other
    clients' payments), signed once for the batch as a replica does."""
    result = ReplyResult(client_id, request_id, digest, seq, outcome, reason)
    others = [
        ReplyResult(100 + i, i, hashlib.sha256(bytes([i])).digest(), seq, "confirmed", "")
        for i in range(batch - 1)
    ]
    results = [*others[:index], result, *others[index:]]
    signer = key if key is not None else REPLICA_KEYS[replica]
    return sign_replies(signer, replica, view, seq, cluster_id, results)[index]


def _tampered(raw: bytes, **changes: object) -> bytes:
    """The reply with some body fields changed, under the signature it came with."""
    envelope, reply = peek(raw, Reply)
    body = replace(reply, **changes).encode()  # type: ignore[arg-type]
    return Envelope(
        envelope.version, envelope.type_code, envelope.sender, body, envelope.signature
    ).encode()


def _receipt(
    *replies: bytes, request: bytes = REQUEST_RAW, cluster_id: bytes = CLUSTER_ID
) -> Receipt:
    return Receipt(RECEIPT_VERSION, cluster_id, request, replies)


def _caught(
    receipt: Receipt | bytes, keyring: KeyRing = KEYRING, cluster_id: bytes = CLUSTER_ID
) -> ReceiptError:
    with pytest.raises(ReceiptError) as caught:
        verify_receipt(receipt, keyring, cluster_id)
    return caught.value


def _error(
    receipt: Receipt | bytes, keyring: KeyRing = KEYRING, cluster_id: bytes = CLUSTER_ID
) -> str:
    message = str(_caught(receipt, keyring, cluster_id))
    assert "\n" not in message  # one line, for the command line
    return message


# --- valid receipts ---------------------------------------------------------------------


def test_f_plus_one_matching_replies_make_a_valid_receipt() -> None:
    verified = verify_receipt(_receipt(_reply(0), _reply(2)), KEYRING, CLUSTER_ID)
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
        cluster_id=CLUSTER_ID,
        op="transfer",
        ref_client=0,
        ref_request=0,
        expires_in_ms=0,
    )


def test_receipt_verifies_after_encoding_to_bytes_and_back() -> None:
    receipt = _receipt(_reply(3), _reply(1, view=2))
    data = receipt.encode()
    assert Receipt.decode(data) == receipt
    from_bytes = verify_receipt(data, KEYRING, CLUSTER_ID)
    assert from_bytes == verify_receipt(Receipt.decode(data), KEYRING, CLUSTER_ID)
    assert from_bytes.replicas == (3, 1)


def test_receipt_for_a_rejected_payment_reports_the_reason() -> None:
    replies = [_reply(i, outcome="rejected", reason="insufficient_funds") for i in (1, 2)]
    verified = verify_receipt(_receipt(*replies), KEYRING, CLUSTER_ID)
    assert (verified.outcome, verified.reason, verified.seq) == (
        "rejected",
        "insufficient_funds",
        SEQ,
    )


def test_replies_from_different_views_still_agree() -> None:
    verified = verify_receipt(_receipt(_reply(0, view=0), _reply(1, view=5)), KEYRING, CLUSTER_ID)
    assert verified.replicas == (0, 1)


def test_more_than_f_plus_one_matching_replies_are_accepted() -> None:
    verified = verify_receipt(_receipt(*(_reply(i) for i in range(4))), KEYRING, CLUSTER_ID)
    assert verified.replicas == (0, 1, 2, 3)


def test_verification_accepts_a_shared_cache() -> None:
    cache = VerificationCache(max_entries=8)
    receipt = _receipt(_reply(0), _reply(1))
    verify_receipt(receipt, KEYRING, CLUSTER_ID, cache)
    verify_receipt(receipt, KEYRING, CLUSTER_ID, cache)
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
        _receipt(_reply(0), _reply(1), _reply(6, key=keys[6])), ring, CLUSTER_ID
    ).replicas == (
        0,
        1,
        6,
    )


# --- rejections --------------------------------------------------------------------------


def test_receipt_from_another_cluster_with_the_same_keys_is_refused() -> None:
    # Everything genuinely signed by these very keys, but in another cluster (another
    # genesis): the replies prove nothing here.
    replies = (_reply(0, cluster_id=OTHER_CLUSTER_ID), _reply(1, cluster_id=OTHER_CLUSTER_ID))
    receipt = _receipt(*replies, cluster_id=OTHER_CLUSTER_ID)
    assert verify_receipt(receipt, KEYRING, OTHER_CLUSTER_ID).replicas == (0, 1)
    error = _caught(receipt)
    assert error.reason == "other_cluster"
    assert str(error) == (
        f"from another cluster: the receipt names cluster {OTHER_CLUSTER_ID.hex()[:16]}, "
        f"this cluster is {CLUSTER_ID.hex()[:16]}"
    )


def test_receipt_relabelled_for_this_cluster_is_refused_by_its_signed_replies() -> None:
    # The receipt's own cluster field is unsigned: a receipt re-labelled with this cluster's
    # id still carries replies whose signatures cover the other cluster's id.
    relabelled = _receipt(
        _reply(0, cluster_id=OTHER_CLUSTER_ID), _reply(1, cluster_id=OTHER_CLUSTER_ID)
    )
    error = _caught(relabelled)
    assert error.reason == "other_cluster"
    assert str(error).startswith("reply 0 (replica 0) is from another cluster")
    # One foreign reply among genuine ones spoils it too.
    mixed = _receipt(_reply(0), _reply(1, cluster_id=OTHER_CLUSTER_ID), _reply(2))
    assert str(_caught(mixed)).startswith("reply 1 (replica 1) is from another cluster")


def test_a_cluster_id_that_is_not_32_bytes_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        verify_receipt(_receipt(_reply(0), _reply(1)), KEYRING, b"short")


def test_only_f_replies_are_not_enough() -> None:
    assert _error(_receipt(_reply(0))) == (
        "too few signatures: 1 replica(s) sign this outcome, need f + 1 = 2"
    )
    assert _caught(_receipt(_reply(0))).reason == "too_few"


def test_receipt_with_no_replies_is_rejected() -> None:
    assert "too few signatures: 0 replica(s)" in _error(_receipt())


def test_two_replies_from_the_same_replica_count_once() -> None:
    assert "replica 1 signs twice" in _error(_receipt(_reply(1), _reply(1)))
    # Even when the two differ in view (both signed by replica 1), it is one voice.
    assert "replica 1 signs twice" in _error(_receipt(_reply(1, view=1), _reply(1, view=2)))


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
    assert "the signed replies disagree: replica 0 says" in _error(_receipt(first, second))
    assert _caught(_receipt(first, second)).reason == "outcome_mismatch"
    # And with enough agreeing replies around, one dissenter still spoils the receipt.
    third = _reply(2, **base)  # type: ignore[arg-type]
    assert verify_receipt(_receipt(first, third), KEYRING, CLUSTER_ID).replicas == (0, 2)
    assert "replica 1 says" in _error(_receipt(first, third, second))


def test_outcome_mismatch_names_both_outcomes() -> None:
    lie = _reply(1, outcome="rejected", reason="insufficient_funds")
    assert _error(_receipt(_reply(0), lie)) == (
        f"the signed replies disagree: replica 0 says confirmed at seq {SEQ}, "
        f"replica 1 says rejected (insufficient_funds) at seq {SEQ}"
    )


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


BAD_SIGNATURE = (
    "the batch root's signature is not replica {}'s in this cluster "
    "(other keys, or an altered root, view, seq or batch size)"
)


def test_reply_signed_by_a_key_outside_the_ring_is_rejected() -> None:
    forged = _reply(1, key=OUTSIDER_KEY)
    assert _error(_receipt(_reply(0), forged)) == "reply 1: " + BAD_SIGNATURE.format(1)
    assert _caught(_receipt(_reply(0), forged)).reason == "bad_signature"


def test_reply_signed_by_a_client_key_is_rejected() -> None:
    # Client 0's key, claiming to be replica 0.
    assert BAD_SIGNATURE.format(0) in _error(_receipt(_reply(0, key=CLIENT_ZERO_KEY), _reply(1)))
    # The paying client's own key, claiming to be replica 1.
    assert BAD_SIGNATURE.format(1) in _error(_receipt(_reply(0), _reply(1, key=CLIENT_KEY)))


def test_reply_from_a_replica_missing_from_the_ring_is_rejected() -> None:
    error = _caught(_receipt(_reply(0), _reply(1)), _keyring_without(1))
    assert (str(error), error.reason) == (
        "reply 1: signed by replica 1, who is not in this cluster",
        "unknown_key",
    )


def _keyring_without(replica: int) -> KeyRing:
    ring = KeyRing({("client", CLIENT_ID): CLIENT_KEY.verify_key})
    for i in range(5):
        if i != replica:
            key = REPLICA_KEYS[i] if i < 4 else SigningKey.derive(SEED, "replica/4")
            ring.add(("replica", i), key.verify_key)
    return ring


def test_request_in_the_reply_slot_is_rejected() -> None:
    assert "reply 1: malformed (unexpected_type" in _error(_receipt(_reply(0), REQUEST_RAW))


def test_reply_in_the_request_slot_is_rejected() -> None:
    error = _error(_receipt(_reply(0), _reply(1), request=_reply(2)))
    assert error.startswith("request:")
    assert "unexpected_type" in error


def test_tampered_request_is_rejected() -> None:
    envelope = Envelope.decode(REQUEST_RAW)
    richer = Request(CLIENT_ID, 9, "transfer", "alice", "bob", 7_000_000)
    tampered = Envelope(
        envelope.version, envelope.type_code, envelope.sender, richer.encode(), envelope.signature
    ).encode()
    error = _error(_receipt(_reply(0), _reply(1), request=tampered))
    assert error == "request: signed by unknown keys: not client 3's key in this cluster"


def test_request_re_signed_by_its_client_with_another_body_is_rejected() -> None:
    # The client itself swaps in a different payment under the same request id.
    other_body = seal(Request(CLIENT_ID, 9, "transfer", "alice", "bob", 1), CLIENT_KEY)
    assert "answers another request" in _error(_receipt(_reply(0), _reply(1), request=other_body))


def test_request_signed_by_another_client_is_rejected() -> None:
    stolen = seal(REQUEST, OTHER_CLIENT_KEY)
    assert "request: signed by unknown keys" in _error(
        _receipt(_reply(0), _reply(1), request=stolen)
    )


def test_request_with_a_flipped_byte_is_rejected() -> None:
    receipt_replies = (_reply(0), _reply(1))
    for index in range(len(REQUEST_RAW)):
        flipped = bytearray(REQUEST_RAW)
        flipped[index] ^= 0x01
        with pytest.raises(ReceiptError):
            verify_receipt(_receipt(*receipt_replies, request=bytes(flipped)), KEYRING, CLUSTER_ID)


def test_unknown_receipt_version_is_rejected() -> None:
    receipt = Receipt(RECEIPT_VERSION + 1, CLUSTER_ID, REQUEST_RAW, (_reply(0), _reply(1)))
    assert "unknown receipt version 4" in _error(receipt)
    assert isinstance(_caught(receipt.encode()), UnreadableReceipt)
    # A version 1 receipt (before cluster ids) has one field fewer: the version says why.
    old = pack([1, REQUEST_RAW, [_reply(0), _reply(1)]])
    assert _error(old) == "unknown receipt version 1 (this verifier reads version 3)"
    # Version 2 (a signature per reply) has the same shape as version 3: refused on its
    # version alone, before its replies are read.
    two = pack([2, CLUSTER_ID, REQUEST_RAW, [_reply(0), _reply(1)]])
    assert _error(two) == "unknown receipt version 2 (this verifier reads version 3)"
    assert _caught(two).reason == "unknown_version"


@pytest.mark.parametrize("replicas", [0, 1, 3])
def test_key_ring_with_fewer_than_four_replicas_is_rejected(replicas: int) -> None:
    replies = [_reply(i) for i in range(replicas)]
    assert "fewer than 4 replicas" in _error(_receipt(*replies), _keyring(replicas))


def test_malformed_receipt_bytes_are_not_a_receipt() -> None:
    data = _receipt(_reply(0), _reply(1)).encode()
    for garbage in (data + b"\x00", data[:-1], pack([RECEIPT_VERSION, REQUEST_RAW]), b"\xc1"):
        error = _caught(garbage)
        assert isinstance(error, UnreadableReceipt)
        assert str(error).startswith("not a receipt: ")
    assert _error(b"") == "not a receipt: the data is empty"
    assert "more than any receipt" in _error(b"\x00" * (1024 * 1024 + 1))


@settings(max_examples=200, database=None, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_bytes_give_only_receipt_error(data: bytes) -> None:
    with pytest.raises(ReceiptError):
        verify_receipt(data, KEYRING, CLUSTER_ID)


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
    receipt = Receipt(RECEIPT_VERSION, CLUSTER_ID, request, tuple(replies))
    try:
        verified = verify_receipt(receipt.encode(), KEYRING, CLUSTER_ID)
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
        verify_receipt(bytes(data), KEYRING, CLUSTER_ID)


# --- one signature per batch: tampering with a reply's result or proof ------------------


def test_replies_from_batches_of_any_size_and_position_verify() -> None:
    for batch in (1, 2, 3, 5, 8, 33, 64):
        for index in sorted({0, batch // 2, batch - 1}):
            replies = (_reply(0, batch=batch, index=index), _reply(3, batch=batch, index=index))
            assert verify_receipt(_receipt(*replies), KEYRING, CLUSTER_ID).replicas == (0, 3)


OTHER_DIGEST = hashlib.sha256(b"x").digest()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"outcome": "rejected", "reason": "insufficient_funds"}, "bad_proof"),
        ({"reason": "unknown_account"}, "bad_proof"),
        ({"seq": SEQ + 1}, "bad_proof"),
        ({"index": 1}, "bad_proof"),
        ({"index": 3}, "bad_proof"),
        ({"root": OTHER_DIGEST}, "bad_proof"),
        ({"batch_seq": SEQ + 1}, "bad_signature"),
        ({"view": 7}, "bad_signature"),
    ],
    ids=["outcome", "reason", "seq", "index-1", "index-3", "root", "batch_seq", "view"],
)
def test_a_tampered_reply_fails_with_a_named_reason(
    changes: dict[str, object], reason: str
) -> None:
    genuine = _reply(1)
    if "reason" in changes and "outcome" not in changes:
        genuine = _reply(1, outcome="rejected", reason="insufficient_funds")
    tampered = _tampered(genuine, **changes)
    error = _caught(_receipt(_reply(0), tampered))
    assert error.reason == reason
    assert str(error).startswith("reply 1")


def test_a_changed_proof_node_fails_as_bad_proof() -> None:
    genuine = _reply(1)
    path = peek(genuine, Reply)[1].path  # type: ignore[attr-defined]
    for position in range(len(path)):
        nodes = list(path)
        nodes[position] = bytes([nodes[position][0] ^ 1]) + nodes[position][1:]
        error = _caught(_receipt(_reply(0), _tampered(genuine, path=tuple(nodes))))
        assert error.reason == "bad_proof"
        assert str(error) == (
            "reply 1 (replica 1): its result is not under the batch root it carries "
            "(inclusion proof fails: result not under its root)"
        )


def test_a_proof_of_the_wrong_length_is_refused_before_any_hashing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pbft.replies

    def no_hashing(*_: object) -> bool:
        raise AssertionError("hashed a proof of the wrong length")

    monkeypatch.setattr(pbft.replies, "verify_inclusion", no_hashing)
    genuine = _reply(1)
    path = peek(genuine, Reply)[1].path  # type: ignore[attr-defined]
    for wrong in (path[:-1], (*path, path[0]), ()):
        # First in the receipt: nothing before it gets hashed either.
        error = _caught(_receipt(_tampered(genuine, path=wrong), _reply(0)))
        assert error.reason == "bad_proof"
        assert "proof nodes for a tree of 5" in str(error)


def test_a_proof_longer_than_any_batch_is_malformed() -> None:
    genuine = _reply(1)
    too_long = tuple(OTHER_DIGEST for _ in range(MAX_REPLY_PATH + 1))
    envelope, reply = peek(genuine, Reply)
    fields = [getattr(reply, name) for name in Reply.SCHEMA]
    fields[list(Reply.SCHEMA).index("path")] = list(too_long)
    raw = Envelope(
        envelope.version, envelope.type_code, envelope.sender, pack(fields), envelope.signature
    ).encode()
    error = _caught(_receipt(_reply(0), raw))
    assert error.reason == "malformed_part"


def test_a_result_relabelled_with_this_cluster_id_fails_its_proof() -> None:
    # Genuinely signed in another cluster, its cluster id rewritten to this one's.
    foreign = _reply(1, cluster_id=OTHER_CLUSTER_ID)
    error = _caught(_receipt(_reply(0), _tampered(foreign, cluster_id=CLUSTER_ID)))
    assert error.reason == "bad_proof"


def test_the_receipt_cluster_id_changed_is_another_cluster() -> None:
    receipt = _receipt(_reply(0), _reply(1), cluster_id=OTHER_CLUSTER_ID)
    assert _caught(receipt, KEYRING, CLUSTER_ID).reason == "other_cluster"


def test_a_changed_signature_fails_as_bad_signature() -> None:
    envelope = Envelope.decode(_reply(1))
    signature = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    raw = Envelope(
        envelope.version, envelope.type_code, envelope.sender, envelope.body, signature
    ).encode()
    assert _caught(_receipt(_reply(0), raw)).reason == "bad_signature"


def test_a_reply_is_bound_to_its_request() -> None:
    # Another client's genuine result from the same batch, offered as this payment's.
    neighbour = ReplyResult(100, 0, hashlib.sha256(bytes([0])).digest(), SEQ, "confirmed", "")
    mine = ReplyResult(CLIENT_ID, REQUEST.request_id, DIGEST, SEQ, "confirmed", "")
    frames = sign_replies(REPLICA_KEYS[1], 1, 1, SEQ, CLUSTER_ID, [mine, neighbour])
    error = _caught(_receipt(_reply(0), frames[1]))
    assert error.reason == "other_request"
