"""Tests for pbft.signed: sealing, opening and the checks an envelope must pass."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache, signing_input
from pbft.codec import pack
from pbft.messages import (
    MAX_SEQ,
    MAX_VIEW,
    MESSAGE_CLASSES,
    Commit,
    Message,
    MessageType,
    Prepare,
    Reply,
    Request,
    Suspect,
)
from pbft.signed import (
    DECODED,
    PROTOCOL_VERSION,
    DecodedFrames,
    Envelope,
    Opened,
    Rejected,
    domain_of,
    open_envelope,
    peek,
    seal,
    verify_signature,
)

SEED = 23
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{i}") for i in range(4)]
CLIENT_ID = 5
CLIENT_KEY = SigningKey.derive(SEED, f"client/{CLIENT_ID}")
# A client whose id coincides with a replica id: its key must never pass for that replica's.
CLIENT_ZERO_KEY = SigningKey.derive(SEED, "client/0")
OUTSIDER_KEY = SigningKey.derive(SEED + 1, "replica/1")
KEYRING = KeyRing(
    {("replica", i): key.verify_key for i, key in enumerate(REPLICA_KEYS)}
    | {("client", CLIENT_ID): CLIENT_KEY.verify_key, ("client", 0): CLIENT_ZERO_KEY.verify_key}
)
DIGEST = hashlib.sha256(b"entry").digest()


def _cache() -> VerificationCache:
    return VerificationCache(max_entries=64)


def _rejection(
    raw: bytes, expected: type[Message] | tuple[type[Message], ...] | None = None
) -> str:
    with pytest.raises(Rejected) as caught:
        open_envelope(raw, KEYRING, _cache(), expected)
    return caught.value.reason


def _reenvelope(raw: bytes, **changes: object) -> bytes:
    """The same envelope with some fields replaced; body and signature kept unless named."""
    envelope = Envelope.decode(raw)
    fields = {name: getattr(envelope, name) for name in Envelope.SCHEMA} | changes
    return Envelope(**fields).encode()  # type: ignore[arg-type]


def _prepare(replica: int = 1, view: int = 2, seq: int = 9) -> Prepare:
    return Prepare(view, seq, replica, DIGEST)


# --- round trips -------------------------------------------------------------------------


def test_sealed_replica_message_opens_to_the_same_message() -> None:
    prepare = _prepare()
    raw = seal(prepare, REPLICA_KEYS[1])
    opened = open_envelope(raw, KEYRING, _cache())
    assert isinstance(opened, Opened)
    assert opened.message == prepare
    assert opened.raw == raw
    assert opened.body == prepare.encode()
    assert opened.body_digest == hashlib.sha256(prepare.encode()).digest()


def test_sealed_client_message_opens_to_the_same_message() -> None:
    request = Request(CLIENT_ID, 77, "transfer", "alice", "bob", 250)
    raw = seal(request, CLIENT_KEY)
    opened = open_envelope(raw, KEYRING, _cache(), Request)
    assert opened.message == request
    assert opened.raw == raw


def test_envelope_names_version_type_and_sender() -> None:
    raw = seal(_prepare(replica=3), REPLICA_KEYS[3])
    envelope = Envelope.decode(raw)
    assert envelope.version == PROTOCOL_VERSION
    assert envelope.type_code == MessageType.PREPARE
    assert envelope.sender == 3
    assert len(envelope.signature) == 64


def test_sealing_is_deterministic() -> None:
    # Ed25519 is deterministic, and the encoding canonical: equal messages, equal envelopes.
    assert seal(_prepare(), REPLICA_KEYS[1]) == seal(_prepare(), REPLICA_KEYS[1])


def test_peek_returns_the_message_without_checking_the_signature() -> None:
    raw = seal(_prepare(), OUTSIDER_KEY)
    envelope, message = peek(raw)
    assert message == _prepare()
    assert envelope.sender == 1
    assert _rejection(raw) == "bad_signature"


# --- domain separation -------------------------------------------------------------------


def test_every_message_type_has_its_own_signature_domain() -> None:
    domains = [domain_of(message_type) for message_type in MessageType]
    assert len(set(domains)) == len(MessageType)
    assert domain_of(MessageType.PREPARE) == b"pbft/v1/prepare"


def test_signature_for_prepare_never_verifies_as_commit() -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    as_commit = _reenvelope(raw, type_code=int(MessageType.COMMIT))
    # The form check passes: a Prepare body is a valid Commit body.
    _, message = peek(as_commit)
    assert message == Commit(2, 9, 1, DIGEST)
    assert _rejection(as_commit) == "bad_signature"


def test_cached_prepare_verification_never_vouches_for_a_commit() -> None:
    cache = _cache()
    raw = seal(_prepare(), REPLICA_KEYS[1])
    assert open_envelope(raw, KEYRING, cache).message == _prepare()
    as_commit = _reenvelope(raw, type_code=int(MessageType.COMMIT))
    with pytest.raises(Rejected) as caught:
        open_envelope(as_commit, KEYRING, cache)
    assert caught.value.reason == "bad_signature"
    assert cache.statistics().hits == 0


def test_signature_for_commit_never_verifies_as_prepare() -> None:
    raw = seal(Commit(2, 9, 1, DIGEST), REPLICA_KEYS[1])
    as_prepare = _reenvelope(raw, type_code=int(MessageType.PREPARE))
    assert isinstance(peek(as_prepare)[1], Prepare)
    assert _rejection(as_prepare) == "bad_signature"


@settings(max_examples=25, database=None, deadline=None)
@given(
    view=st.integers(0, MAX_VIEW),
    seq=st.integers(0, MAX_SEQ),
    replica=st.integers(0, 3),
    digest=st.binary(min_size=32, max_size=32),
)
def test_signature_over_a_prepare_body_is_only_valid_in_the_prepare_domain(
    view: int, seq: int, replica: int, digest: bytes
) -> None:
    prepare = Prepare(view, seq, replica, digest)
    raw = seal(prepare, REPLICA_KEYS[replica])
    envelope = Envelope.decode(raw)
    verify_key = REPLICA_KEYS[replica].verify_key
    assert verify_key.verify(domain_of(MessageType.PREPARE), envelope.body, envelope.signature)
    assert not verify_key.verify(domain_of(MessageType.COMMIT), envelope.body, envelope.signature)
    assert _rejection(_reenvelope(raw, type_code=int(MessageType.COMMIT))) == "bad_signature"


# --- sender binding ----------------------------------------------------------------------


def test_envelope_sender_differing_from_body_sender_is_rejected() -> None:
    raw = seal(_prepare(replica=1), REPLICA_KEYS[1])
    assert _rejection(_reenvelope(raw, sender=2)) == "sender_mismatch"


def test_message_re_signed_by_another_replica_under_its_own_envelope_is_rejected() -> None:
    # Replica 2 signs a body naming replica 1 and puts its own id on the envelope.
    forged = Envelope(
        PROTOCOL_VERSION,
        int(MessageType.PREPARE),
        2,
        _prepare(replica=1).encode(),
        REPLICA_KEYS[2].sign(domain_of(MessageType.PREPARE), _prepare(replica=1).encode()),
    ).encode()
    assert _rejection(forged) == "sender_mismatch"


def test_message_signed_by_another_replicas_key_is_rejected() -> None:
    assert _rejection(seal(_prepare(replica=1), REPLICA_KEYS[2])) == "bad_signature"


def test_replica_message_signed_by_a_key_outside_the_ring_is_rejected() -> None:
    assert _rejection(seal(_prepare(replica=1), OUTSIDER_KEY)) == "bad_signature"


def test_replica_message_signed_by_a_client_key_is_rejected() -> None:
    # Client 5 has a key but replica 5 does not exist: no replica key to check against.
    with pytest.raises(Rejected) as caught:
        open_envelope(seal(Suspect(0, CLIENT_ID), CLIENT_KEY), KEYRING, _cache())
    assert caught.value.reason == "unknown_sender"
    # Client 0 and replica 0 both exist: the client's key is not replica 0's key.
    assert _rejection(seal(Suspect(0, 0), CLIENT_ZERO_KEY)) == "bad_signature"


def test_client_message_signed_by_a_replica_key_is_rejected() -> None:
    request = Request(0, 1, "transfer", "alice", "bob", 1)
    assert _rejection(seal(request, REPLICA_KEYS[0])) == "bad_signature"
    assert (
        _rejection(seal(Request(3, 1, "transfer", "a", "b", 1), REPLICA_KEYS[3]))
        == "unknown_sender"
    )


def test_message_from_an_unknown_replica_is_rejected() -> None:
    assert _rejection(seal(Suspect(0, 9), OUTSIDER_KEY)) == "unknown_sender"


# --- form checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_protocol_version_is_rejected(version: int) -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    assert _rejection(_reenvelope(raw, version=version)) == "unknown_version"


@pytest.mark.parametrize("type_code", [0, len(MessageType) + 1, 255])
def test_unknown_message_type_is_rejected(type_code: int) -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    assert _rejection(_reenvelope(raw, type_code=type_code)) == "unknown_type"


def test_message_of_an_unexpected_type_is_rejected() -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    assert _rejection(raw, Commit) == "unexpected_type"
    assert _rejection(raw, (Commit, Reply)) == "unexpected_type"
    assert open_envelope(raw, KEYRING, _cache(), Prepare).message == _prepare()
    assert open_envelope(raw, KEYRING, _cache(), (Commit, Prepare)).message == _prepare()


def test_unexpected_type_is_rejected_before_the_body_is_decoded() -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    garbage_body = _reenvelope(raw, body=b"\xc1")
    assert _rejection(garbage_body) == "malformed_malformed"
    assert _rejection(garbage_body, Commit) == "unexpected_type"


def test_body_that_does_not_match_its_type_schema_is_rejected() -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    as_suspect = _reenvelope(raw, type_code=int(MessageType.SUSPECT))
    # A PREPARE body is longer than any SUSPECT can be: dropped on its length, unparsed.
    assert _rejection(as_suspect) == "oversize"
    three_fields = b"\x93\x00\x01\x02"  # short enough for a SUSPECT, one field too many
    as_suspect = _reenvelope(raw, type_code=int(MessageType.SUSPECT), body=three_fields)
    assert _rejection(as_suspect) == "malformed_extra_field"


def test_malformed_envelope_is_rejected_with_the_decode_reason() -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    assert _rejection(raw + b"\x00") == "malformed_malformed"
    assert _rejection(raw[:-1]) == "malformed_malformed"
    assert _rejection(pack([1, 3, 1])) == "malformed_missing_field"
    envelope = Envelope.decode(raw)
    assert _rejection(pack(envelope.to_wire()[:4] + [b"short"])) == "malformed_out_of_range"


def test_rejected_carries_reason_and_detail() -> None:
    rejection = Rejected("bad_signature", "PREPARE from replica 1")
    assert rejection.reason == "bad_signature"
    assert rejection.detail == "PREPARE from replica 1"
    assert str(rejection) == "bad_signature: PREPARE from replica 1"


# --- the signature covers exactly the body as received --------------------------------------


def test_signature_covers_exactly_the_envelope_body() -> None:
    prepare = _prepare()
    raw = seal(prepare, REPLICA_KEYS[1])
    envelope = Envelope.decode(raw)
    assert envelope.body == prepare.encode()
    assert REPLICA_KEYS[1].verify_key.verify(
        domain_of(MessageType.PREPARE), envelope.body, envelope.signature
    )
    # The signed bytes are the domain-separated signing input over the body, nothing else.
    assert REPLICA_KEYS[1].sign(domain_of(MessageType.PREPARE), envelope.body) == (
        envelope.signature
    )
    assert signing_input(domain_of(MessageType.PREPARE), envelope.body).endswith(envelope.body)


def test_signature_moved_onto_another_body_of_the_same_sender_is_rejected() -> None:
    first = seal(_prepare(seq=9), REPLICA_KEYS[1])
    second = seal(_prepare(seq=10), REPLICA_KEYS[1])
    spliced = _reenvelope(first, signature=Envelope.decode(second).signature)
    assert _rejection(spliced) == "bad_signature"


def test_validly_signed_non_canonical_body_is_rejected() -> None:
    # A signer could sign a wider encoding of the same message; receivers would then hold
    # two byte strings (two digests) for one message. It never passes the form check.
    canonical = Suspect(1, 2).encode()
    assert canonical == b"\x92\x01\x02"
    widened = b"\x92\xcc\x01\x02"
    signature = REPLICA_KEYS[2].sign(domain_of(MessageType.SUSPECT), widened)
    raw = Envelope(PROTOCOL_VERSION, int(MessageType.SUSPECT), 2, widened, signature).encode()
    assert _rejection(raw) == "malformed_non_canonical"


def test_validly_signed_non_canonical_envelope_is_rejected() -> None:
    raw = seal(Suspect(1, 2), REPLICA_KEYS[2])
    assert raw[:2] == b"\x95\x01"
    widened = b"\x95\xcc\x01" + raw[2:]
    assert _rejection(widened) == "malformed_non_canonical"


def test_verify_signature_checks_the_envelope_body_not_a_re_encoding() -> None:
    canonical_raw = seal(Suspect(1, 2), REPLICA_KEYS[2])
    envelope, message = peek(canonical_raw)
    verify_signature(envelope, message, KEYRING, _cache())
    # The same message in other bytes: a signature over the canonical body must not pass
    # for it (were the message re-encoded before checking, it would) ...
    widened = b"\x92\xcc\x01\x02"
    moved = Envelope(envelope.version, envelope.type_code, 2, widened, envelope.signature)
    with pytest.raises(Rejected) as caught:
        verify_signature(moved, message, KEYRING, _cache())
    assert caught.value.reason == "bad_signature"
    # ... while a signature over exactly those received bytes does.
    signature = REPLICA_KEYS[2].sign(domain_of(MessageType.SUSPECT), widened)
    as_signed = Envelope(envelope.version, envelope.type_code, 2, widened, signature)
    verify_signature(as_signed, message, KEYRING, _cache())


def test_opening_uses_the_verification_cache() -> None:
    cache = _cache()
    raw = seal(_prepare(), REPLICA_KEYS[1])
    open_envelope(raw, KEYRING, cache)
    open_envelope(raw, KEYRING, cache)
    statistics = cache.statistics()
    assert (statistics.misses, statistics.hits) == (1, 1)


def test_every_message_type_seals_and_opens_with_its_signers_key() -> None:
    # A message of each class, signed by the principal its SIGNER names.
    for cls in MESSAGE_CLASSES.values():
        assert cls.SIGNER in ("replica", "client")
        assert cls.SENDER_FIELD in cls.SCHEMA
    request = Request(CLIENT_ID, 1, "transfer", "a", "b", 1)
    assert open_envelope(seal(request, CLIENT_KEY), KEYRING, _cache()).message == request
    # (A replica signs a batch's root instead, pbft/replies.py; the envelope still works.)
    reply = Reply(0, 1, 2, CLIENT_ID, 1, DIGEST, "confirmed", "", DIGEST, 1, 1, 0, (), DIGEST)
    assert open_envelope(seal(reply, REPLICA_KEYS[2]), KEYRING, _cache()).message == reply


# --- the decode memo (each frame decoded once per process) --------------------------------


def test_a_sealed_frame_peeks_as_a_fresh_decode_of_its_bytes() -> None:
    # seal hands peek the objects it built; they must be what decoding the bytes gives.
    request = Request(CLIENT_ID, 78, "transfer", "alice", "bob", 251)
    raw = seal(request, CLIENT_KEY)
    assert DECODED.get(raw) is not None
    envelope, message = peek(raw)
    assert message is request
    DECODED.clear()
    fresh_envelope, fresh_message = peek(raw)
    assert fresh_message is not request
    assert (fresh_envelope, fresh_message) == (envelope, message)
    assert fresh_message.encode() == message.encode() == fresh_envelope.body


def test_a_frame_peeked_again_is_the_same_objects_and_unexpected_types_still_fail() -> None:
    DECODED.clear()
    raw = seal(_prepare(seq=31), REPLICA_KEYS[1])
    DECODED.clear()  # decoded from its bytes below, not seeded by seal
    first = peek(raw)
    second = peek(raw, Prepare)
    assert second[0] is first[0] and second[1] is first[1]
    with pytest.raises(Rejected) as caught:
        peek(raw, (Commit, Reply))
    assert caught.value.reason == "unexpected_type"
    assert caught.value.detail == "PREPARE"


def test_frames_that_fail_their_checks_are_not_kept() -> None:
    raw = seal(_prepare(), REPLICA_KEYS[1])
    DECODED.clear()
    garbage_body = _reenvelope(raw, body=b"\xc1")
    for _ in range(2):
        assert _rejection(garbage_body) == "malformed_malformed"
    assert len(DECODED) == 0


def test_decoded_frames_are_bounded_by_entries_and_by_bytes() -> None:
    frames = [seal(_prepare(seq=seq), REPLICA_KEYS[1]) for seq in range(1, 11)]
    decoded = [peek(raw) for raw in frames]
    by_entries = DecodedFrames(max_entries=3, max_bytes=1 << 20)
    for raw, pair in zip(frames, decoded, strict=True):
        by_entries.put(raw, pair)
    assert len(by_entries) == 3
    assert by_entries.get(frames[0]) is None and by_entries.get(frames[-1]) == decoded[-1]
    by_bytes = DecodedFrames(max_entries=100, max_bytes=2 * len(frames[0]))
    for raw, pair in zip(frames, decoded, strict=True):
        by_bytes.put(raw, pair)
    assert len(by_bytes) == 2
    too_long = DecodedFrames(max_frame_bytes=len(frames[0]) - 1)
    too_long.put(frames[0], decoded[0])
    assert len(too_long) == 0
