"""Canonical msgpack encoding of frozen, validated message classes.

Every message is a msgpack array of its fields in declaration order. Decoding
untrusted bytes yields either a fully valid message or `DecodeError`; it never
returns a half-valid object. Encoding is canonical: decoding re-encodes and
rejects any input whose bytes differ, so one message has exactly one encoding
and digests over encoded bytes are stable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, ClassVar, TypeVar

import msgpack

# The largest frame any peer may send us: a NEW-VIEW carries 2f + 1 view changes, each
# with up to a window of prepared batches, so this bound is generous but finite.
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_UINT64 = 2**64 - 1
# A record in a replica's own storage: at most the largest ledger snapshot plus its proof.
MAX_LOCAL_RECORD_BYTES = 320 * 1024 * 1024
# Decoding work is bounded by the number of msgpack objects built, not by bytes: 16 MiB of
# empty arrays (one byte each) is 16 M Python lists, about 1.1 GiB and seconds of CPU. So a
# message's objects are capped in total, at what its schema can legitimately hold, but
# never below SMALL_ITEMS (input that short cannot hold more objects than bytes, so it is
# parsed as before and keeps its precise reasons) nor above MAX_DECODE_ITEMS.
SMALL_ITEMS = 4096
MAX_DECODE_ITEMS = 1 << 17
# Deeper than any schema nests (ViewChange: message, list, certificate, list = 4).
MAX_DECODE_DEPTH = 16


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

    def max_items(self) -> int:
        """The most msgpack objects a valid value holds (itself included)."""
        return 1

    def max_bytes(self) -> int:
        """The longest canonical encoding of a valid value."""
        raise NotImplementedError


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

    def max_bytes(self) -> int:
        return 9  # uint64: marker and 8 bytes


class SignedInt(Spec):
    """An integer in -bound..bound (a balance's change); bound <= 2**63 - 1, msgpack's int64."""

    def __init__(self, bound: int) -> None:
        self.bound = bound

    def check(self, value: Any, field: str) -> int:
        if type(value) is not int:
            raise DecodeError("wrong_type", f"{field} must be an integer")
        if not -self.bound <= value <= self.bound:
            raise DecodeError("out_of_range", f"{field}={value} not in -{self.bound}..{self.bound}")
        return value

    def max_bytes(self) -> int:
        return 9  # int64: marker and 8 bytes


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

    def max_bytes(self) -> int:
        return 5 + self.maximum_length  # bin32 header


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

    def max_bytes(self) -> int:
        return 5 + 4 * self.maximum_length  # str32 header, 4 UTF-8 bytes per character


class ListOf(Spec):
    def __init__(self, item: Spec, maximum_items: int) -> None:
        self.item = item
        self.maximum_items = maximum_items

    def check(self, value: Any, field: str) -> tuple[Any, ...]:
        if type(value) not in (list, tuple):
            raise DecodeError("wrong_type", f"{field} must be a list")
        if len(value) > self.maximum_items:
            raise DecodeError("oversize", f"{field} has more than {self.maximum_items} items")
        check = self.item.check
        try:
            # Labelled by the list's name; on a failure, checked again for the item's label.
            return tuple([check(item, field) for item in value])
        except DecodeError:
            return tuple(check(item, f"{field}[{index}]") for index, item in enumerate(value))

    def to_wire(self, value: Any) -> Any:
        return [self.item.to_wire(item) for item in value]

    def max_items(self) -> int:
        return 1 + self.maximum_items * self.item.max_items()

    def max_bytes(self) -> int:
        return 5 + self.maximum_items * self.item.max_bytes()


class Nested(Spec):
    def __init__(self, cls: type[Struct]) -> None:
        self.cls = cls

    def check(self, value: Any, field: str) -> Struct:
        if isinstance(value, self.cls):
            return value
        return self.cls.from_wire(value, field)

    def to_wire(self, value: Any) -> Any:
        return value.to_wire()

    def max_items(self) -> int:
        return self.cls.max_items()

    def max_bytes(self) -> int:
        return self.cls.max_bytes()


StructT = TypeVar("StructT", bound="Struct")


class Struct:
    """Base of frozen message classes: subclasses are dataclasses with a SCHEMA per field."""

    SCHEMA: ClassVar[dict[str, Spec]]

    def __post_init__(self) -> None:
        # Validate on construction too, so a locally built invalid message fails loudly.
        for name, spec, label in _fields_of(type(self)):
            value = getattr(self, name)
            checked = spec.check(value, label)
            if checked is not value:  # a list became a tuple, a wire array a struct
                object.__setattr__(self, name, checked)

    def to_wire(self) -> list[Any]:
        getter, nested = _wire_plan(type(self))
        values = list(getter(self))
        for index, spec in nested:
            values[index] = spec.to_wire(values[index])
        return values

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
        if field:
            for (name, spec), item in zip(cls.SCHEMA.items(), value, strict=True):
                object.__setattr__(instance, name, spec.check(item, f"{label}.{name}"))
        else:  # labelled "Class.name": built once per class
            for (name, spec, name_label), item in zip(_fields_of(cls), value, strict=True):
                object.__setattr__(instance, name, spec.check(item, name_label))
        return instance

    @classmethod
    def max_items(cls) -> int:
        """The most msgpack objects a valid encoding holds (from the schema)."""
        return 1 + sum(spec.max_items() for spec in cls.SCHEMA.values())

    @classmethod
    def max_bytes(cls) -> int:
        """An upper bound on the length of a valid encoding (from the schema)."""
        return 5 + sum(spec.max_bytes() for spec in cls.SCHEMA.values())

    @classmethod
    def decode_budget(cls) -> int:
        """How many msgpack objects decoding may build: see SMALL_ITEMS."""
        budget = _BUDGETS.get(cls)
        if budget is None:
            budget = min(MAX_DECODE_ITEMS, max(SMALL_ITEMS, cls.max_items()))
            _BUDGETS[cls] = budget
        return budget

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def decode(cls: type[StructT], data: bytes) -> StructT:
        message = cls.from_wire(unpack(data, max_items=cls.decode_budget()))
        if message.encode() != data:
            raise DecodeError("non_canonical", f"{cls.__name__} is not canonically encoded")
        return message


_BUDGETS: dict[type[Struct], int] = {}
_FIELDS: dict[type[Struct], tuple[tuple[str, Spec, str], ...]] = {}


WirePlan = tuple[Callable[[Any], tuple[Any, ...]], tuple[tuple[int, Spec], ...]]
_WIRE_PLANS: dict[type[Struct], WirePlan] = {}


def _wire_plan(cls: type[Struct]) -> WirePlan:
    """How to put a struct on the wire fast: one getter for every field, then the fields
    whose spec changes their value (lists and nested structs); the rest go as they are."""
    plan = _WIRE_PLANS.get(cls)
    if plan is None:
        names = tuple(cls.SCHEMA)
        # attrgetter of one name gives the value itself; of two or more, a tuple.
        getter: Callable[[Any], tuple[Any, ...]] = (
            attrgetter(*names) if len(names) > 1 else lambda value: (getattr(value, names[0]),)
        )
        nested = tuple(
            (index, spec)
            for index, spec in enumerate(cls.SCHEMA.values())
            if type(spec).to_wire is not Spec.to_wire
        )
        plan = (getter, nested)
        _WIRE_PLANS[cls] = plan
    return plan


def _fields_of(cls: type[Struct]) -> tuple[tuple[str, Spec, str], ...]:
    """(name, spec, "Class.name") per field of a schema, built once per class (not per
    message: every frame sealed or checked walks its fields)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = tuple((name, spec, f"{cls.__name__}.{name}") for name, spec in cls.SCHEMA.items())
        _FIELDS[cls] = fields
    return fields


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes, limit_bytes: int = MAX_FRAME_BYTES, max_items: int | None = None) -> Any:
    """Parse untrusted msgpack with every size limit set; any parser failure is a DecodeError.

    `limit_bytes` is one frame for what comes off the network; a replica's own storage
    records (a stable checkpoint with its whole ledger) may be larger. `max_items` bounds
    the objects built in total (every level together): input longer than that is counted
    first by `count_items`, which reads headers only and stops at the budget.
    """
    if type(data) is not bytes:
        raise DecodeError("wrong_type", "frame must be bytes")
    if len(data) > limit_bytes:
        raise DecodeError("oversize", f"frame of {len(data)} bytes")
    if max_items is not None and len(data) > max_items:
        # Every object takes at least one byte, so shorter input cannot exceed the budget.
        count_items(data, max_items)
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
    except Exception as error:  # the parser's failures on hostile bytes vary
        raise DecodeError("malformed", type(error).__name__) from None


# msgpack first bytes -> (kind, fixed length) for the formats with a one-byte marker.
_EXTRA: dict[int, int] = {
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xCA: 4, 0xCB: 8,
}  # fmt: skip
_BLOB_HEADER: dict[int, int] = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT_HEADER: dict[int, int] = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXEXT: dict[int, int] = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_CONTAINER: dict[int, tuple[int, int]] = {  # marker -> (length bytes, objects per entry)
    0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2),
}  # fmt: skip


# Objects of one byte: fixints, nil, booleans, and the empty fixstr, fixarray and fixmap.
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\x80\x90\xa0\xc0\xc2\xc3\xe0-\xff]+")


def count_items(data: bytes, max_items: int, max_depth: int = MAX_DECODE_DEPTH) -> int:
    """Count the objects of the first msgpack value in `data` without building any.

    Reads only headers (a bin or str is skipped in one step), so the work is at most
    `max_items` steps whatever the input. DecodeError("oversize") once the count passes
    `max_items` (a container's announced length is charged before its entries are read, so
    one header claiming a million entries fails at once) or nesting passes `max_depth`.
    Input that is truncated or invalid is left to the parser, which fails on it anyway:
    the count so far is returned.
    """
    size = len(data)
    position = 0
    count = 0
    pending = [1]  # objects still to read at each open level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        # A run of one-byte objects (what bombs are made of) is counted in one step.
        run = _ONE_BYTE_RUN.match(data, position)
        if run is not None and run.end() - position > 1:
            taken = min(run.end() - position, pending[-1])
            count += taken
            if count > max_items:
                raise DecodeError("oversize", f"more than {max_items} objects")
            position += taken
            pending[-1] -= taken
            continue
        pending[-1] -= 1
        if position >= size:
            return count
        marker = data[position]
        position += 1
        count += 1
        if count > max_items:
            raise DecodeError("oversize", f"more than {max_items} objects")
        entries = 0
        per_entry = 1
        if marker <= 0x7F or marker >= 0xE0 or marker in (0xC0, 0xC2, 0xC3):
            continue
        if 0x90 <= marker <= 0x9F:
            entries = marker & 0x0F
        elif 0x80 <= marker <= 0x8F:
            entries, per_entry = marker & 0x0F, 2
        elif 0xA0 <= marker <= 0xBF:
            position += marker & 0x1F
            continue
        elif marker in _EXTRA:
            position += _EXTRA[marker]
            continue
        elif marker in _BLOB_HEADER or marker in _EXT_HEADER:
            width = _BLOB_HEADER.get(marker) or _EXT_HEADER[marker]
            if position + width > size:
                return count
            length = int.from_bytes(data[position : position + width], "big")
            position += width + length + (1 if marker in _EXT_HEADER else 0)
            continue
        elif marker in _FIXEXT:
            position += 1 + _FIXEXT[marker]
            continue
        elif marker in _CONTAINER:
            width, per_entry = _CONTAINER[marker]
            if position + width > size:
                return count
            entries = int.from_bytes(data[position : position + width], "big")
            position += width
        else:  # 0xC1: never used; the parser rejects it
            return count
        objects = entries * per_entry
        if count + objects > max_items:
            raise DecodeError("oversize", f"more than {max_items} objects")
        if objects:
            if len(pending) >= max_depth:
                raise DecodeError("oversize", f"nested deeper than {max_depth}")
            pending.append(objects)
    return count
