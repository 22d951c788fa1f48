"""Tests for pbft.codec and the message schemas of pbft.messages, named after the rules."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.codec import (
    MAX_UINT64,
    Bytes,
    DecodeError,
    ListOf,
    Nested,
    SignedInt,
    Spec,
    Struct,
    Text,
    UInt,
    pack,
    unpack,
)
from pbft.config import MAX_BATCH_SIZE, MAX_REPLICAS
from pbft.history import AccountEntry, HoldView
from pbft.messages import (
    MAX_SEQ,
    MAX_VIEW,
    MAX_WINDOW,
    MESSAGE_CLASSES,
    BalanceQuery,
    BalanceReply,
    Checkpoint,
    CheckpointState,
    Commit,
    CommitCertificate,
    DropCount,
    Fetch,
    Heartbeat,
    LookupAnswer,
    LookupQuery,
    Message,
    MessageType,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    ReplicaStatusAnswer,
    Reply,
    Request,
    StateChunk,
    StateRequest,
    StatusQuery,
    Suspect,
    ViewChange,
)
from pbft.receipt import Receipt
from pbft.signed import PROTOCOL_VERSION, Envelope, Rejected, open_envelope, peek, seal

SEED = 11
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{i}") for i in range(4)]
CLIENT_KEY = SigningKey.derive(SEED, "client/7")
KEYRING = KeyRing(
    {("replica", i): key.verify_key for i, key in enumerate(REPLICA_KEYS)}
    | {("client", 7): CLIENT_KEY.verify_key}
)


def _h(tag: int) -> bytes:
    return bytes([tag]) * 32


def _envelope_bytes(tag: int) -> bytes:
    """Opaque embedded-envelope bytes: the schema only bounds their length."""
    return b"envelope-" + bytes([tag]) * 5


# --- one valid instance per class -------------------------------------------------------

FACTORIES: dict[type[Struct], Callable[[], Struct]] = {
    Request: lambda: Request(7, 42, "transfer", "alice", "bob", 1500),
    PrePrepare: lambda: PrePrepare(
        3, 17, 3, _h(1), _h(2), (_envelope_bytes(1), _envelope_bytes(2)), 1_700_000_000_000
    ),
    Prepare: lambda: Prepare(3, 17, 1, _h(3)),
    Commit: lambda: Commit(3, 17, 2, _h(3)),
    Reply: lambda: Reply(
        3, 17, 1, 7, 42, _h(4), "rejected", "insufficient_funds", _h(21), 17, 3, 1, (_h(6),), _h(7)
    ),
    Heartbeat: lambda: Heartbeat(5, 1, 300, 290),
    Suspect: lambda: Suspect(5, 2),
    Checkpoint: lambda: Checkpoint(32, 0, _h(5), _h(6)),
    ViewChange: lambda: ViewChange(
        6,
        2,
        32,
        _h(5),
        _h(6),
        (_envelope_bytes(3), _envelope_bytes(4), _envelope_bytes(5)),
        (
            PreparedCertificate(_envelope_bytes(6), (_envelope_bytes(7), _envelope_bytes(8))),
            PreparedCertificate(_envelope_bytes(9), ()),
        ),
    ),
    NewView: lambda: NewView(6, 2, (_envelope_bytes(10),) * 3, (_envelope_bytes(11),)),
    Fetch: lambda: Fetch(3, 65, 64, 2),
    CheckpointState: lambda: CheckpointState(
        1, 64, _h(7), _h(8), b"snapshot", (_envelope_bytes(12), _envelope_bytes(13))
    ),
    CommitCertificate: lambda: CommitCertificate(
        0, _envelope_bytes(14), (_envelope_bytes(15), _envelope_bytes(16))
    ),
    StateChunk: lambda: StateChunk(
        1,
        64,
        _h(7),
        _h(8),
        (_envelope_bytes(12), _envelope_bytes(13)),
        1_000_001,
        16384,
        14,
        (b"\x94\xa7account", b"leaf"),
        (_h(9), _h(10)),
    ),
    StateRequest: lambda: StateRequest(3, 64, 16384),
    BalanceQuery: lambda: BalanceQuery(2, 77, "acct-00003"),
    BalanceReply: lambda: BalanceReply(1, 2, 77, "acct-00003", 1, 12_345, 40, _h(22), 6_789),
    LookupQuery: lambda: LookupQuery(2, 78, "history", 0, 0, "acct-00003", 40, 2, 50, 41),
    LookupAnswer: lambda: LookupAnswer(
        1,
        2,
        78,
        _h(24),
        _h(22),
        "found",
        41,
        1,
        (),
        b"",
        (AccountEntry(40, 3, 1_700_000, "refund", 5, 2**64 - 1, -(2**63 - 1), 0),),
        (HoldView(5, 9, "acct-00001", "acct-00002", 70, 1_234, 12, "captured", 14, 55),),
    ),
    StatusQuery: lambda: StatusQuery(2, 79),
    ReplicaStatusAnswer: lambda: ReplicaStatusAnswer(
        3,
        2,
        79,
        _h(22),
        5,
        "view_change",
        130,
        128,
        128,
        256,
        (DropCount("bad_signature", 4), DropCount("malformed_out_of_range", 2**64 - 1)),
    ),
    # Not messages, but Structs with the same codec: checked alongside.
    PreparedCertificate: lambda: PreparedCertificate(_envelope_bytes(17), (_envelope_bytes(18),)),
    Envelope: lambda: Envelope(1, 3, 1, b"\x94\x01\x02\x03", b"\x00" * 64),
    Receipt: lambda: Receipt(2, _h(23), _envelope_bytes(19), (_envelope_bytes(20),)),
}

ALL_STRUCTS: list[type[Struct]] = list(FACTORIES)
ALL_MESSAGES: list[type[Message]] = list(MESSAGE_CLASSES.values())


def _name(cls: type[Any]) -> str:
    return cls.__name__


def test_every_message_class_has_a_factory() -> None:
    assert set(MESSAGE_CLASSES.values()) <= set(FACTORIES)
    assert {cls.TYPE for cls in MESSAGE_CLASSES.values()} == set(MessageType)
    assert all(MESSAGE_CLASSES[message_type].TYPE is message_type for message_type in MessageType)


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=_name)
def test_every_struct_round_trips_through_its_encoding(cls: type[Struct]) -> None:
    message = FACTORIES[cls]()
    assert type(message) is cls
    data = message.encode()
    decoded = cls.decode(data)
    assert decoded == message
    assert type(decoded) is cls


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=_name)
def test_encoding_is_canonical_same_message_same_bytes(cls: type[Struct]) -> None:
    first = FACTORIES[cls]()
    second = FACTORIES[cls]()
    assert first is not second
    data = first.encode()
    assert data == second.encode()
    assert cls.decode(data).encode() == data
    # A list given where a tuple is declared is normalised, so it encodes the same.
    as_lists = cls(**{name: _as_list(getattr(first, name)) for name in cls.SCHEMA})
    assert as_lists.encode() == data
    assert as_lists == first


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_encoding_is_a_msgpack_array_of_fields_in_declaration_order() -> None:
    request = Request(7, 42, "transfer", "alice", "bob", 1500)
    assert msgpack.unpackb(request.encode()) == [7, 42, "transfer", "alice", "bob", 1500, 0, 0, 0]
    reply = FACTORIES[Reply]()
    assert msgpack.unpackb(reply.encode())[6:9] == ["rejected", "insufficient_funds", _h(21)]


def test_hashes_travel_as_msgpack_bin_not_str() -> None:
    data = Prepare(0, 0, 0, _h(9)).encode()
    # fixarray(4), 0, 0, 0, bin8 of length 32.
    assert data == b"\x94\x00\x00\x00\xc4\x20" + _h(9)


def test_prepare_and_commit_share_a_body_schema() -> None:
    prepare = Prepare(1, 2, 3, _h(1))
    assert Commit.decode(prepare.encode()) == Commit(1, 2, 3, _h(1))


# --- schema-derived strategies: every valid message round-trips --------------------------


def _strategy_for_spec(spec: Spec) -> st.SearchStrategy[Any]:
    if isinstance(spec, UInt):
        return st.one_of(
            st.integers(0, min(spec.maximum, 300)),
            st.integers(0, spec.maximum),
            st.just(spec.maximum),
        )
    if isinstance(spec, Bytes):
        longest = min(spec.maximum_length, max(spec.minimum_length, 40))
        return st.binary(min_size=spec.minimum_length, max_size=longest)
    if isinstance(spec, Text):
        if spec.choices is not None:
            return st.sampled_from(spec.choices)
        return st.text(max_size=spec.maximum_length)
    if isinstance(spec, ListOf):
        return st.lists(_strategy_for_spec(spec.item), max_size=min(spec.maximum_items, 3))
    if isinstance(spec, Nested):
        return _strategy_for_struct(spec.cls)
    if isinstance(spec, SignedInt):
        return st.one_of(st.integers(-300, 300), st.integers(-spec.bound, spec.bound))
    raise AssertionError(f"no strategy for {spec!r}")


def _strategy_for_struct(cls: type[Struct]) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{name: _strategy_for_spec(spec) for name, spec in cls.SCHEMA.items()})


ANY_STRUCT = st.sampled_from(ALL_STRUCTS).flatmap(_strategy_for_struct)


@settings(max_examples=300, database=None, deadline=None)
@given(ANY_STRUCT)
def test_any_valid_struct_round_trips_canonically(message: Struct) -> None:
    cls = type(message)
    data = message.encode()
    decoded = cls.decode(data)
    assert decoded == message
    assert decoded.encode() == data


# --- validation on construction ----------------------------------------------------------


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(DecodeError) as caught:
        call()
    return caught.value.reason


@pytest.mark.parametrize(
    "build",
    [
        lambda: Prepare(MAX_VIEW + 1, 0, 0, _h(0)),
        lambda: Prepare(0, MAX_SEQ + 1, 0, _h(0)),
        lambda: Prepare(0, 0, MAX_REPLICAS, _h(0)),
        lambda: Prepare(-1, 0, 0, _h(0)),
        lambda: Request(2**32, 0, "transfer", "a", "b", 1),
        lambda: Request(0, MAX_UINT64 + 1, "transfer", "a", "b", 1),
        lambda: Request(0, 0, "transfer", "a", "b", -5),
        lambda: Envelope(256, 3, 0, b"x", b"\x00" * 64),
    ],
    ids=[
        "view",
        "seq",
        "replica",
        "negative",
        "client_id",
        "request_id",
        "amount",
        "envelope_version",
    ],
)
def test_out_of_range_integer_is_rejected_on_construction(build: Callable[[], object]) -> None:
    assert _reason(build) == "out_of_range"


def test_largest_allowed_integers_are_accepted_on_construction() -> None:
    assert Prepare(MAX_VIEW, MAX_SEQ, MAX_REPLICAS - 1, _h(0)).view == MAX_VIEW
    assert Request(2**32 - 1, MAX_UINT64, "transfer", "a", "b", MAX_UINT64).amount == MAX_UINT64


@pytest.mark.parametrize(
    "build",
    [
        lambda: Suspect(True, 0),
        lambda: Suspect(0, False),
        lambda: Request(7, 1, "transfer", "a", "b", True),
        lambda: Prepare(1.0, 0, 0, _h(0)),
        lambda: Prepare("1", 0, 0, _h(0)),
        lambda: Prepare(None, 0, 0, _h(0)),
    ],
    ids=["bool_view", "bool_replica", "bool_amount", "float", "str", "none"],
)
def test_bool_or_non_int_where_int_expected_is_rejected(build: Callable[[], object]) -> None:
    assert _reason(build) == "wrong_type"


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_hash_of_wrong_length_is_rejected(length: int) -> None:
    reason = _reason(lambda: Prepare(0, 0, 0, b"\x01" * length))
    assert reason == ("oversize" if length > 32 else "out_of_range")
    assert _reason(lambda: Checkpoint(0, 0, _h(0), b"\x01" * length)) == reason


@pytest.mark.parametrize(
    "build",
    [
        lambda: Prepare(0, 0, 0, "x" * 32),
        lambda: Prepare(0, 0, 0, bytearray(32)),
        lambda: Request(7, 1, "transfer", b"alice", "bob", 1),
        lambda: PrePrepare(0, 0, 0, _h(0), _h(0), b"not a list", 0),
        lambda: PrePrepare(0, 0, 0, _h(0), _h(0), ("text",), 0),
        lambda: ViewChange(1, 0, 0, _h(0), _h(0), (), ("not a certificate",)),
    ],
    ids=["str_hash", "bytearray_hash", "bytes_account", "bytes_list", "str_item", "nested"],
)
def test_wrong_type_is_rejected_on_construction(build: Callable[[], object]) -> None:
    assert _reason(build) == "wrong_type"


@pytest.mark.parametrize(
    "build",
    [
        lambda: PrePrepare(0, 0, 0, _h(0), _h(0), (b"r",) * (MAX_BATCH_SIZE + 1), 0),
        lambda: NewView(1, 1, (b"v",) * (MAX_REPLICAS + 1), ()),
        lambda: NewView(1, 1, (), (b"p",) * (MAX_WINDOW + 1)),
        lambda: CommitCertificate(0, b"p", (b"c",) * (MAX_REPLICAS + 1)),
        lambda: Receipt(2, _h(0), b"r", (b"x",) * (MAX_REPLICAS + 1)),
    ],
    ids=["batch", "view_changes", "pre_prepares", "commits", "receipt_replies"],
)
def test_oversize_list_is_rejected_on_construction(build: Callable[[], object]) -> None:
    assert _reason(build) == "oversize"


def test_lists_at_their_limit_are_accepted() -> None:
    pre_prepare = PrePrepare(0, 0, 0, _h(0), _h(0), (b"r",) * MAX_BATCH_SIZE, 0)
    assert PrePrepare.decode(pre_prepare.encode()) == pre_prepare


def test_empty_embedded_envelope_is_rejected() -> None:
    assert _reason(lambda: PrePrepare(0, 0, 0, _h(0), _h(0), (b"",), 0)) == "out_of_range"
    assert _reason(lambda: CommitCertificate(0, b"", ())) == "out_of_range"


# batch seq, batch size, index, path, root: a batch of one.
REPLY_PROOF = (1, 1, 0, (), _h(2))


@pytest.mark.parametrize(
    ("outcome", "reason", "expected"),
    [
        ("maybe", "", "out_of_range"),
        ("CONFIRMED", "", "out_of_range"),
        ("confirmed", "bogus", "out_of_range"),
        ("x" * 17, "", "oversize"),
        ("confirmed", "y" * 33, "oversize"),
        (b"confirmed", "", "wrong_type"),
        ("confirmed", None, "wrong_type"),
    ],
)
def test_reply_outcome_and_reason_must_be_known_choices(
    outcome: object, reason: object, expected: str
) -> None:
    reply = lambda: Reply(0, 1, 0, 7, 1, _h(0), outcome, reason, _h(1), *REPLY_PROOF)  # noqa: E731
    assert _reason(reply) == expected


def test_every_known_outcome_and_reason_is_accepted() -> None:
    spec_outcome = Reply.SCHEMA["outcome"]
    spec_reason = Reply.SCHEMA["reason"]
    assert isinstance(spec_outcome, Text) and isinstance(spec_reason, Text)
    assert spec_outcome.choices == ("confirmed", "rejected")
    assert spec_reason.choices is not None and "" in spec_reason.choices
    for outcome in spec_outcome.choices:
        for reason in spec_reason.choices:
            reply = Reply(0, 1, 0, 7, 1, _h(0), outcome, reason, _h(1), *REPLY_PROOF)
            assert Reply.decode(reply.encode()) == reply


def test_account_name_longer_than_64_characters_is_rejected() -> None:
    assert Request(7, 1, "transfer", "a" * 64, "b", 1).payer == "a" * 64
    assert _reason(lambda: Request(7, 1, "transfer", "a" * 65, "b", 1)) == "oversize"


def test_messages_are_frozen() -> None:
    prepare = Prepare(0, 0, 0, _h(0))
    with pytest.raises(AttributeError):
        prepare.view = 5  # type: ignore[misc]


# --- decoding rejects malformed input ----------------------------------------------------


def _decode_reason(cls: type[Struct], data: bytes) -> str:
    with pytest.raises(DecodeError) as caught:
        cls.decode(data)
    return caught.value.reason


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=_name)
def test_decoding_an_array_with_a_field_missing_is_rejected(cls: type[Struct]) -> None:
    fields = FACTORIES[cls]().to_wire()
    assert _decode_reason(cls, pack(fields[:-1])) == "missing_field"
    assert _decode_reason(cls, pack([])) == "missing_field"


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=_name)
def test_decoding_an_array_with_an_extra_field_is_rejected(cls: type[Struct]) -> None:
    fields = FACTORIES[cls]().to_wire()
    assert _decode_reason(cls, pack([*fields, 0])) == "extra_field"


def test_decoding_a_nested_certificate_with_a_missing_field_is_rejected() -> None:
    fields = FACTORIES[ViewChange]().to_wire()
    fields[-1] = [[b"pre-prepare"]]
    assert _decode_reason(ViewChange, pack(fields)) == "missing_field"
    fields[-1] = [b"not an array"]
    assert _decode_reason(ViewChange, pack(fields)) == "wrong_type"


@pytest.mark.parametrize(
    "fields",
    [[True, 0], [0, False], [1.0, 0], [None, 0], ["1", 0], [b"\x01", 0], [[1], 0]],
)
def test_decoding_a_field_of_the_wrong_type_is_rejected(fields: list[Any]) -> None:
    assert _decode_reason(Suspect, pack(fields)) == "wrong_type"


def test_decoding_an_out_of_range_field_is_rejected() -> None:
    assert _decode_reason(Suspect, pack([-1, 0])) == "out_of_range"
    assert _decode_reason(Suspect, pack([0, MAX_REPLICAS])) == "out_of_range"
    assert _decode_reason(Suspect, pack([MAX_VIEW + 1, 0])) == "out_of_range"


def test_decoding_a_str_where_bin_belongs_is_rejected() -> None:
    fields = Prepare(0, 0, 0, _h(0)).to_wire()
    fields[3] = "a" * 32
    assert _decode_reason(Prepare, pack(fields)) == "wrong_type"


def test_decoding_a_bin_where_str_belongs_is_rejected() -> None:
    fields = Request(7, 1, "transfer", "alice", "bob", 1).to_wire()
    fields[2] = b"alice"
    assert _decode_reason(Request, pack(fields)) == "wrong_type"


@pytest.mark.parametrize("value", [5, "x", b"x", None, True, 1.5])
def test_decoding_a_non_array_top_level_is_rejected(value: object) -> None:
    assert _decode_reason(Suspect, pack(value)) == "wrong_type"


def test_decoding_a_map_is_rejected() -> None:
    assert _decode_reason(Suspect, b"\x80") == "wrong_type"  # empty fixmap
    assert _decode_reason(Suspect, b"\x82\x00\x01\x01\x02") == "malformed"
    assert _decode_reason(Suspect, b"\xde\x00\x00") == "wrong_type"  # empty map16
    assert _decode_reason(Suspect, pack([{}, 0])) == "wrong_type"


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=_name)
def test_decoding_with_trailing_bytes_is_rejected(cls: type[Struct]) -> None:
    data = FACTORIES[cls]().encode()
    assert _decode_reason(cls, data + b"\x00") == "malformed"
    assert _decode_reason(cls, data + data) == "malformed"


@pytest.mark.parametrize("cls", ALL_STRUCTS, ids=_name)
def test_decoding_a_truncated_encoding_is_rejected(cls: type[Struct]) -> None:
    data = FACTORIES[cls]().encode()
    for length in range(len(data)):
        with pytest.raises(DecodeError):
            cls.decode(data[:length])


def test_decoding_empty_or_non_bytes_input_is_rejected() -> None:
    assert _decode_reason(Suspect, b"") == "malformed"
    canonical = Suspect(1, 2).encode()
    assert _decode_reason(Suspect, bytearray(canonical)) == "wrong_type"  # type: ignore[arg-type]
    assert _decode_reason(Suspect, memoryview(canonical)) == "wrong_type"  # type: ignore[arg-type]


def test_decoding_ext_types_is_rejected() -> None:
    assert _decode_reason(Suspect, b"\x92\xd4\x01\x00\x00") == "malformed"  # fixext1
    assert _decode_reason(Suspect, b"\x92\xc7\x00\x05\x00") == "wrong_type"  # empty ext8


# Hand-built encodings of Suspect(view=1, replica=2), whose canonical form is 92 01 02.
NON_CANONICAL_SUSPECTS = {
    "uint8": b"\x92\xcc\x01\x02",
    "uint16": b"\x92" + b"\xcd" + struct.pack(">H", 1) + b"\x02",
    "uint32": b"\x92" + b"\xce" + struct.pack(">I", 1) + b"\x02",
    "uint64": b"\x92" + b"\xcf" + struct.pack(">Q", 1) + b"\x02",
    "int8": b"\x92\xd0\x01\x02",
    "int64": b"\x92" + b"\xd3" + struct.pack(">q", 1) + b"\x02",
    "array16": b"\xdc" + struct.pack(">H", 2) + b"\x01\x02",
    "array32": b"\xdd" + struct.pack(">I", 2) + b"\x01\x02",
}


def test_canonical_suspect_bytes_are_what_the_non_canonical_cases_widen() -> None:
    assert Suspect(1, 2).encode() == b"\x92\x01\x02"
    for data in NON_CANONICAL_SUSPECTS.values():
        assert msgpack.unpackb(data) == [1, 2]


@pytest.mark.parametrize("name", sorted(NON_CANONICAL_SUSPECTS))
def test_an_int_or_array_in_a_wider_format_than_necessary_is_non_canonical(name: str) -> None:
    assert _decode_reason(Suspect, NON_CANONICAL_SUSPECTS[name]) == "non_canonical"


def test_a_large_int_in_a_wider_format_than_necessary_is_non_canonical() -> None:
    # 300 needs uint16; uint32 and uint64 encode the same value non-canonically.
    assert Suspect.decode(b"\x92\xcd\x01\x2c\x02") == Suspect(300, 2)
    assert _decode_reason(Suspect, b"\x92\xce\x00\x00\x01\x2c\x02") == "non_canonical"
    assert _decode_reason(Suspect, b"\x92\xcf" + struct.pack(">Q", 300) + b"\x02") == (
        "non_canonical"
    )


def test_bin_and_str_in_a_wider_format_than_necessary_are_non_canonical() -> None:
    canonical = Prepare(0, 0, 0, _h(1)).encode()
    assert canonical[4:6] == b"\xc4\x20"
    bin16 = canonical[:4] + b"\xc5" + struct.pack(">H", 32) + _h(1)
    bin32 = canonical[:4] + b"\xc6" + struct.pack(">I", 32) + _h(1)
    assert _decode_reason(Prepare, bin16) == "non_canonical"
    assert _decode_reason(Prepare, bin32) == "non_canonical"

    request = Request(7, 1, "transfer", "al", "bob", 1)
    head, tail = b"\x99\x07\x01\xa8transfer", b"\xa3bob\x01\x00\x00\x00"
    assert request.encode() == head + b"\xa2al" + tail
    str8 = head + b"\xd9\x02al" + tail
    str16 = head + b"\xda\x00\x02al" + tail
    fields = [7, 1, "transfer", "al", "bob", 1, 0, 0, 0]
    assert msgpack.unpackb(str8) == msgpack.unpackb(str16) == fields
    assert _decode_reason(Request, str8) == "non_canonical"
    assert _decode_reason(Request, str16) == "non_canonical"


def test_a_nested_list_in_a_wider_format_than_necessary_is_non_canonical() -> None:
    pre_prepare = PrePrepare(0, 0, 0, _h(0), _h(0), (b"r",), 0)
    data = pre_prepare.encode()
    # The requests list, then the timestamp (a positive fixint 0).
    fixarray_of_one = b"\x91\xc4\x01r\x00"
    assert data.endswith(fixarray_of_one)
    widened = data[: -len(fixarray_of_one)] + b"\xdc\x00\x01\xc4\x01r\x00"
    assert _decode_reason(PrePrepare, widened) == "non_canonical"


def test_decode_error_carries_reason_and_detail() -> None:
    error = DecodeError("oversize", "too long")
    assert isinstance(error, ValueError)
    assert (error.reason, error.detail, str(error)) == (
        "oversize",
        "too long",
        "oversize: too long",
    )
    assert str(DecodeError("malformed")) == "malformed"


def test_unpack_rejects_deep_nesting_as_malformed() -> None:
    assert _reason(lambda: unpack(b"\x91" * 5000 + b"\x01")) == "malformed"


# --- fuzz: hostile bytes only ever give DecodeError / Rejected ---------------------------

FUZZ = settings(
    max_examples=200,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MSGPACK_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), MAX_UINT64),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=40),
        st.sampled_from(["confirmed", "rejected", "", "insufficient_funds"]),
    ),
    lambda children: st.lists(children, max_size=9),
    max_leaves=25,
)


@FUZZ
@given(cls=st.sampled_from(ALL_STRUCTS), data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_to_a_valid_message_or_decode_error(
    cls: type[Struct], data: bytes
) -> None:
    try:
        message = cls.decode(data)
    except DecodeError:
        return
    assert message.encode() == data


@FUZZ
@given(cls=st.sampled_from(ALL_STRUCTS), value=MSGPACK_VALUES)
def test_arbitrary_msgpack_values_decode_to_a_valid_message_or_decode_error(
    cls: type[Struct], value: Any
) -> None:
    data = pack(value)
    try:
        message = cls.decode(data)
    except DecodeError:
        return
    assert type(message) is cls
    assert message.encode() == data


@FUZZ
@given(
    message=ANY_STRUCT,
    position=st.integers(0, 10_000),
    mask=st.integers(1, 255),
    insert=st.binary(min_size=1, max_size=3),
    mode=st.sampled_from(["flip", "truncate", "insert"]),
)
def test_mutated_valid_encoding_decodes_canonically_or_raises_decode_error(
    message: Struct, position: int, mask: int, insert: bytes, mode: str
) -> None:
    cls = type(message)
    mutated = _mutate(message.encode(), mode, position, mask, insert)
    try:
        decoded = cls.decode(mutated)
    except DecodeError:
        return
    assert decoded.encode() == mutated


def _mutate(data: bytes, mode: str, position: int, mask: int, insert: bytes) -> bytes:
    if mode == "flip":
        index = position % len(data)
        return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]
    if mode == "truncate":
        return data[: position % len(data)]
    index = position % (len(data) + 1)
    return data[:index] + insert + data[index:]


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_into_peek_raise_only_rejected(data: bytes) -> None:
    try:
        envelope, message = peek(data)
    except Rejected as rejection:
        assert rejection.reason
        return
    # Whatever passes the form check is a canonical envelope around a canonical body.
    assert envelope.encode() == data
    assert message.encode() == envelope.body


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_into_open_envelope_raise_only_rejected(data: bytes) -> None:
    with pytest.raises(Rejected):
        open_envelope(data, KEYRING, VerificationCache(max_entries=16))


@FUZZ
@given(
    version=st.one_of(st.just(PROTOCOL_VERSION), st.integers(0, 300)),
    type_code=st.one_of(st.sampled_from([int(t) for t in MessageType]), st.integers(0, 300)),
    sender=st.one_of(st.integers(0, 8), st.integers(-5, 2**33)),
    body=st.one_of(MSGPACK_VALUES.map(pack), st.binary(max_size=60)),
    signature=st.one_of(st.binary(min_size=64, max_size=64), st.binary(max_size=70)),
)
def test_structured_hostile_envelopes_raise_only_rejected(
    version: int, type_code: int, sender: int, body: bytes, signature: bytes
) -> None:
    raw = pack([version, type_code, sender, body, signature])
    with pytest.raises(Rejected):
        open_envelope(raw, KEYRING, VerificationCache(max_entries=16))
    try:
        envelope, message = peek(raw)
    except Rejected as rejection:
        assert rejection.reason
        return
    assert (envelope.sender, message.sender) == (sender, sender)
    assert message.encode() == body


def _valid_envelopes() -> list[bytes]:
    request = seal(Request(7, 42, "transfer", "alice", "bob", 1500), CLIENT_KEY)
    return [
        request,
        seal(Prepare(3, 17, 1, _h(3)), REPLICA_KEYS[1]),
        seal(PrePrepare(3, 17, 3, _h(1), _h(2), (request,), 0), REPLICA_KEYS[3]),
        seal(BalanceReply(0, 7, 42, "alice", 1, 1500, 17, _h(5), 250), REPLICA_KEYS[0]),
    ]


VALID_ENVELOPES = _valid_envelopes()


def test_valid_envelopes_used_for_mutation_open() -> None:
    for raw in VALID_ENVELOPES:
        assert open_envelope(raw, KEYRING, VerificationCache()).raw == raw


@FUZZ
@given(
    which=st.integers(0, len(VALID_ENVELOPES) - 1),
    position=st.integers(0, 10_000),
    mask=st.integers(1, 255),
    insert=st.binary(min_size=1, max_size=3),
    mode=st.sampled_from(["flip", "truncate", "insert"]),
)
def test_mutated_signed_envelope_never_opens(
    which: int, position: int, mask: int, insert: bytes, mode: str
) -> None:
    original = VALID_ENVELOPES[which]
    mutated = _mutate(original, mode, position, mask, insert)
    try:
        opened = open_envelope(mutated, KEYRING, VerificationCache(max_entries=16))
    except Rejected as rejection:
        assert rejection.reason
        return
    # Only a "mutation" that changed nothing may open.
    assert mutated == original
    assert opened.raw == original
