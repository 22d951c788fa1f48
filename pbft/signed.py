"""Signed envelopes: how a message is sealed by its sender and opened by a receiver.

Wire form: msgpack [version, type, sender, body, signature] where body is the
message's canonical encoding and the signature covers a per-type domain tag plus
the body bytes. Opening checks, in order: the envelope's form, the type, the body's
form, that the body names the same sender as the envelope, that the sender holds a
key of the right role (client or replica), and the signature over the body bytes as
received. Any failure raises `Rejected` with a reason code for the drop counters.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.codec import MAX_FRAME_BYTES, Bytes, DecodeError, Spec, Struct, UInt, pack
from pbft.drops import DropReason
from pbft.messages import MESSAGE_CLASSES, Message, MessageType

PROTOCOL_VERSION = 1


class Rejected(Exception):
    """An untrusted message failed a check. Not a local bug: the receiver drops and counts it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def domain_of(message_type: MessageType) -> bytes:
    """The signature domain tag: a signed PREPARE can never be passed off as a COMMIT."""
    return b"pbft/v1/" + message_type.name.lower().encode()


_DOMAINS = {message_type: domain_of(message_type) for message_type in MessageType}

# The most bytes an envelope adds around its body: array marker, version, type, sender
# (uint32), the body's bin32 header and the 64-byte signature with its bin8 header.
ENVELOPE_OVERHEAD = 1 + 2 + 2 + 5 + 5 + 2 + 64
MAX_SENDER = 2**32 - 1


def body_limit(cls: type[Message]) -> int:
    """The longest body a message of this class can have: its schema's bound, at most a frame.

    A REQUEST is a few hundred bytes, so 16 MiB claiming to be one is dropped on its length
    alone, before a single byte of it is parsed.
    """
    return min(MAX_FRAME_BYTES, cls.max_bytes())


BODY_LIMITS: dict[int, int] = {int(t): body_limit(cls) for t, cls in MESSAGE_CLASSES.items()}
_CLIENT_TYPES = tuple(int(t) for t, cls in MESSAGE_CLASSES.items() if cls.SIGNER == "client")


def type_code_of(raw: bytes) -> int | None:
    """The type code of a canonical envelope (95 01 <type> ...), read without parsing it;
    None if `raw` cannot be one (`peek` would reject it anyway)."""
    if type(raw) is bytes and len(raw) > 2 and raw[0] == 0x95 and raw[2] <= 0x7F:
        return raw[2]
    return None


def client_may_send(raw: bytes) -> bool:
    """Whether a frame from a client's connection is of a type a client signs (REQUEST,
    BALANCE_QUERY). Anything else could only be relayed; dropping it unparsed keeps a client
    key from making us decode frames of the replica types, which are allowed to be large."""
    return type_code_of(raw) in _CLIENT_TYPES


@dataclass(frozen=True)
class Envelope(Struct):
    version: int
    type_code: int
    sender: int
    body: bytes
    signature: bytes

    SCHEMA: ClassVar[dict[str, Spec]] = {
        "version": UInt(255),
        "type_code": UInt(255),
        "sender": UInt(MAX_SENDER),
        "body": Bytes(1, MAX_FRAME_BYTES),
        "signature": Bytes(64, 64),
    }


@dataclass(frozen=True)
class Opened:
    """A verified message together with the exact bytes it arrived in, and the peer that
    delivered them when the driver says (see `MessageReceived.link`)."""

    message: Message
    raw: bytes
    body: bytes
    link: Principal | None = None

    @property
    def body_digest(self) -> bytes:
        return hashlib.sha256(self.body).digest()


class DecodedFrames:
    """Bounded memo of frames that passed peek's form checks: raw bytes -> (envelope,
    message). One frame is met many times in a process (the simulator delivers a broadcast
    to every replica; a request comes alone, then again inside a pre-prepare and a
    certificate), and its form is a function of its bytes alone, so it is decoded once and
    the immutable objects are shared. Only successes are kept: a malformed frame pays for
    its checks every time. Oldest first out, bounded by entries and by bytes; safe without
    a lock (a lost race costs a decode, never a wrong answer).
    """

    def __init__(
        self, max_entries: int = 4096, max_bytes: int = 4 << 20, max_frame_bytes: int = 1 << 16
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_frame_bytes = max_frame_bytes
        # An OrderedDict: popping the oldest of a plain dict scans the holes left before it.
        self._frames: OrderedDict[bytes, tuple[Envelope, Message]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, raw: bytes) -> tuple[Envelope, Message] | None:
        # Exact bytes only: a bytearray (mutable) or a subclass is decoded afresh.
        if type(raw) is not bytes:
            return None
        decoded = self._frames.get(raw)
        if decoded is None:
            self.misses += 1
        else:
            self.hits += 1
        return decoded

    def put(self, raw: bytes, decoded: tuple[Envelope, Message]) -> None:
        if type(raw) is not bytes or len(raw) > self.max_frame_bytes or raw in self._frames:
            return
        self._frames[raw] = decoded
        self._bytes += len(raw)
        frames = self._frames
        while len(frames) > self.max_entries or self._bytes > self.max_bytes:
            try:
                oldest, _ = frames.popitem(last=False)
            except KeyError:  # emptied by another thread
                return
            self._bytes -= len(oldest)

    def clear(self) -> None:
        self._frames.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._frames)


# One per process: every replica and client core in it shares what was decoded.
DECODED = DecodedFrames()


def _unchecked_envelope(code: int, sender: int, body: bytes, signature: bytes) -> Envelope:
    envelope = Envelope.__new__(Envelope)
    for name, value in (
        ("version", PROTOCOL_VERSION),
        ("type_code", code),
        ("sender", sender),
        ("body", body),
        ("signature", signature),
    ):
        object.__setattr__(envelope, name, value)
    return envelope


def seal(message: Message, key: SigningKey) -> bytes:
    body = message.encode()
    signature = key.sign(_DOMAINS[message.TYPE], body)
    code = int(message.TYPE)
    sender = message.sender
    if sender <= MAX_SENDER and len(signature) == 64 and 1 <= len(body) <= MAX_FRAME_BYTES:
        # What Envelope's own checks would pass (the message checked its fields when it was
        # built), without paying for them on every frame sent.
        envelope = _unchecked_envelope(code, sender, body, signature)
        raw = pack([PROTOCOL_VERSION, code, sender, body, signature])
    else:  # let the checks say what is wrong
        envelope = Envelope(PROTOCOL_VERSION, code, sender, body, signature)
        raw = envelope.encode()
    # Receivers in this process (the simulator's other replicas) peek these very bytes: hand
    # them what peek would build. Both objects passed their schema's checks on construction
    # and decoding a canonical encoding checks the same schema, so peek would return equal
    # objects, provided none of its size checks stops it first: the frame is within its
    # type's limits and the body short enough that no object count is taken.
    cls = type(message)
    if (
        cls is MESSAGE_CLASSES.get(message.TYPE)
        and len(body) <= min(BODY_LIMITS[code], cls.decode_budget())
        and len(raw) <= BODY_LIMITS[code] + ENVELOPE_OVERHEAD
    ):
        DECODED.put(raw, (envelope, message))
    return raw


def peek(
    raw: bytes, expected: type[Message] | tuple[type[Message], ...] | None = None
) -> tuple[Envelope, Message]:
    """Check the form of an envelope and its body, without the signature.

    Cheap: receivers use it to drop what is stale or irrelevant before paying for a
    signature check. Nothing read here may be trusted until `verify_signature` passes.
    Its cost is bounded whatever the bytes: the type code sits at a fixed offset of a
    canonical envelope (95 01 <type> ...), so a frame longer than its type allows is
    dropped unparsed, and decoding builds at most the objects the schema can hold
    (`Struct.decode_budget`). Frames that decoded before are answered from `DECODED`
    (the same immutable objects: the form of bytes is a function of the bytes alone).
    """
    decoded = DECODED.get(raw)
    if decoded is None:
        decoded = _decode(raw, expected)
        DECODED.put(raw, decoded)
    if expected is not None:
        cls = type(decoded[1])
        if not (cls is expected if isinstance(expected, type) else cls in expected):
            raise Rejected(DropReason.UNEXPECTED_TYPE, cls.TYPE.name)
    return decoded


def _decode(
    raw: bytes, expected: type[Message] | tuple[type[Message], ...] | None
) -> tuple[Envelope, Message]:
    """peek's checks in their order (so a frame wrong in two ways names the same one)."""
    code = type_code_of(raw)
    if code is not None:
        limit = BODY_LIMITS.get(code)
        if limit is not None and len(raw) > limit + ENVELOPE_OVERHEAD:
            raise Rejected(DropReason.OVERSIZE, f"{len(raw)} bytes for type {code}")
    try:
        envelope = Envelope.decode(raw)
    except DecodeError as error:
        raise Rejected(f"malformed_{error.reason}", error.detail) from None
    if envelope.version != PROTOCOL_VERSION:
        raise Rejected(DropReason.UNKNOWN_VERSION, str(envelope.version))
    try:
        message_type = MessageType(envelope.type_code)
    except ValueError:
        raise Rejected(DropReason.UNKNOWN_TYPE, str(envelope.type_code)) from None
    cls = MESSAGE_CLASSES[message_type]
    if len(envelope.body) > BODY_LIMITS[envelope.type_code]:
        raise Rejected(DropReason.OVERSIZE, f"{len(envelope.body)} bytes for {message_type.name}")
    if expected is not None and not (
        cls is expected if isinstance(expected, type) else cls in expected
    ):
        raise Rejected(DropReason.UNEXPECTED_TYPE, message_type.name)
    try:
        message = cls.decode(envelope.body)
    except DecodeError as error:
        raise Rejected(f"malformed_{error.reason}", error.detail) from None
    if message.sender != envelope.sender:
        raise Rejected(DropReason.SENDER_MISMATCH, f"{message_type.name} body names another sender")
    return envelope, message


def verify_signature(
    envelope: Envelope, message: Message, keyring: KeyRing, cache: VerificationCache
) -> None:
    verify_key = keyring.get((message.SIGNER, envelope.sender))
    if verify_key is None:
        raise Rejected(DropReason.UNKNOWN_SENDER, f"{message.SIGNER} {envelope.sender}")
    if not cache.verify(verify_key, _DOMAINS[message.TYPE], envelope.body, envelope.signature):
        raise Rejected(
            DropReason.BAD_SIGNATURE, f"{message.TYPE.name} from {message.SIGNER} {envelope.sender}"
        )


def open_envelope(
    raw: bytes,
    keyring: KeyRing,
    cache: VerificationCache,
    expected: type[Message] | tuple[type[Message], ...] | None = None,
) -> Opened:
    """Check form and signature: the message is then known to come from its named sender."""
    envelope, message = peek(raw, expected)
    verify_signature(envelope, message, keyring, cache)
    return Opened(message, raw, envelope.body)
