"""Canonical msgpack encoding of frozen, validated message classes.

Every message is a msgpack array of its fields in declaration order. Decoding
untrusted bytes yields either a fully valid message or `DecodeError`; it never
returns a half-valid object. Encoding is canonical: decoding re-encodes and
rejects any input whose bytes differ, so one message has exactly one encoding
and digests over encoded bytes are stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import msgpack

# The largest frame any peer may send us: a NEW-VIEW carries 2f + 1 view changes, each
# with up to a window of prepared batches, so this bound is generous but finite.
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_UINT64 = 2**64 - 1
# A record in a replica's own storage: at most the largest ledger snapshot plus its proof.
MAX_LOCAL_RECORD_BYTES = 320 * 1024 * 1024


class DecodeError(ValueError):
    """Untrusted bytes are not a valid message. `reason` is a short code for drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Spec:
    """How one field is checked and put on the wire."""

    def check(self, value: Any, field: str) -> Any:
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:
        return value


class UInt(Spec):
    def __init__(self, maximum: int = MAX_UINT64) -> None:
        self.maximum = maximum

    def check(self, value: Any, field: str) -> int:
        # bool is an int subclass; a boolean where a number belongs is a malformed message.
        if type(value) is not int:
            raise DecodeError("wrong_type", f"{field} must be an integer")
        if not 0 <= value <= self.maximum:
            raise DecodeError("out_of_range", f"{field}={value} not in 0..{self.maximum}")
        return value


class Bytes(Spec):
    def __init__(self, minimum_length: int = 0, maximum_length: int = MAX_FRAME_BYTES) -> None:
        self.minimum_length = minimum_length
        self.maximum_length = maximum_length

    def check(self, value: Any, field: str) -> bytes:
        if type(value) is not bytes:
            raise DecodeError("wrong_type", f"{field} must be bytes")
        if not self.minimum_length <= len(value) <= self.maximum_length:
            raise DecodeError(
                "oversize" if len(value) > self.maximum_length else "out_of_range",
                f"{field} length {len(value)} not in {self.minimum_length}..{self.maximum_length}",
            )
        return value


class Text(Spec):
    def __init__(self, maximum_length: int = 64, choices: Sequence[str] | None = None) -> None:
        self.maximum_length = maximum_length
        self.choices = tuple(choices) if choices is not None else None

    def check(self, value: Any, field: str) -> str:
        if type(value) is not str:
            raise DecodeError("wrong_type", f"{field} must be a string")
        if len(value) > self.maximum_length:
            raise DecodeError("oversize", f"{field} longer than {self.maximum_length}")
        if self.choices is not None and value not in self.choices:
            raise DecodeError("out_of_range", f"{field}={value!r} not one of {self.choices}")
        return value


class ListOf(Spec):
    def __init__(self, item: Spec, maximum_items: int) -> None:
        self.item = item
        self.maximum_items = maximum_items

    def check(self, value: Any, field: str) -> tuple[Any, ...]:
        if type(value) not in (list, tuple):
            raise DecodeError("wrong_type", f"{field} must be a list")
        if len(value) > self.maximum_items:
            raise DecodeError("oversize", f"{field} has more than {self.maximum_items} items")
        return tuple(self.item.check(item, f"{field}[{index}]") for index, item in enumerate(value))

    def to_wire(self, value: Any) -> Any:
        return [self.item.to_wire(item) for item in value]


class Nested(Spec):
    def __init__(self, cls: type[Struct]) -> None:
        self.cls = cls

    def check(self, value: Any, field: str) -> Struct:
        if isinstance(value, self.cls):
            return value
        return self.cls.from_wire(value, field)

    def to_wire(self, value: Any) -> Any:
        return value.to_wire()


StructT = TypeVar("StructT", bound="Struct")


class Struct:
    """Base of frozen message classes: subclasses are dataclasses with a SCHEMA per field."""

    SCHEMA: ClassVar[dict[str, Spec]]

    def __post_init__(self) -> None:
        # Validate on construction too, so a locally built invalid message fails loudly.
        for name, spec in self.SCHEMA.items():
            checked = spec.check(getattr(self, name), f"{type(self).__name__}.{name}")
            object.__setattr__(self, name, checked)

    def to_wire(self) -> list[Any]:
        return [spec.to_wire(getattr(self, name)) for name, spec in self.SCHEMA.items()]

    @classmethod
    def from_wire(cls: type[StructT], value: Any, field: str = "") -> StructT:
        label = field or cls.__name__
        if type(value) is not list:
            raise DecodeError("wrong_type", f"{label} must be an array")
        if len(value) != len(cls.SCHEMA):
            raise DecodeError(
                "missing_field" if len(value) < len(cls.SCHEMA) else "extra_field",
                f"{label} has {len(value)} fields, expected {len(cls.SCHEMA)}",
            )
        # Checked field by field here, so build the instance without checking it twice.
        instance = cls.__new__(cls)
        for (name, spec), item in zip(cls.SCHEMA.items(), value, strict=True):
            object.__setattr__(instance, name, spec.check(item, f"{label}.{name}"))
        return instance

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def decode(cls: type[StructT], data: bytes) -> StructT:
        message = cls.from_wire(unpack(data))
        if message.encode() != data:
            raise DecodeError("non_canonical", f"{cls.__name__} is not canonically encoded")
        return message


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes, limit_bytes: int = MAX_FRAME_BYTES) -> Any:
    """Parse untrusted msgpack with every size limit set; any parser failure is a DecodeError.

    `limit_bytes` is one frame for what comes off the network; a replica's own storage
    records (a stable checkpoint with its whole ledger) may be larger.
    """
    if type(data) is not bytes:
        raise DecodeError("wrong_type", "frame must be bytes")
    if len(data) > limit_bytes:
        raise DecodeError("oversize", f"frame of {len(data)} bytes")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limit_bytes,
            max_bin_len=limit_bytes,
            max_array_len=1 << 20,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as error:  # noqa: BLE001 - the parser's failures on hostile bytes vary
        raise DecodeError("malformed", type(error).__name__) from None
