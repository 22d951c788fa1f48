"""Durable storage for the records a replica persists: an append-only, checksummed log.

The protocol core asks for `Persist(key, value)` (None deletes the key) and the rule is:
whatever it asks to persist is on disk, fsynced, before any message that depends on it
is sent. The driver collects the `Persist` actions of one `handle()` call, hands them to
`DurableStore.apply` as one batch, and sends nothing until `apply` has returned. A
restarted replica is rebuilt from `DurableStore.open(path).records()`.

Why a hand-written log and not sqlite
-------------------------------------
- We need explicit, testable semantics for the two ways a file can be damaged. A crash
  in the middle of a write leaves a *torn tail*: normal, expected, repaired on open by
  dropping the unfinished batch (and reported). Damage anywhere else is *corruption*:
  the store refuses to open rather than hand a replica state that is missing votes it
  already sent (a replica that forgets a vote can equivocate, which turns a crash fault
  into a Byzantine one; a replica that refuses to start is only a crash fault, which the
  cluster tolerates). sqlite repairs or rejects on its own terms, which we cannot state or test.
- One fsync per batch (group commit) and nothing else: a batch is a single `write` plus
  a single `fsync`. With sqlite the number of syncs per transaction depends on the
  journal mode and its settings, and the journal/WAL files are more state to reason about.
- A format small enough to document here completely and to test byte by byte.

On-disk format (version 3)
--------------------------
All integers are big-endian. The file is a header followed by records::

    header  = magic (8 bytes: 89 50 42 46 54 4B 56 0A, i.e. b"\\x89PBFTKV\\n")
              | format version (u32, = 3)                                  -- 12 bytes
              | batch count (u64) | committed length (u64)
              | counter checksum (u32: zlib.crc32 of the header's first 28 bytes)
                                                                           -- 32 bytes
    record  = length (u32: byte length of payload, 1 .. MAX_RECORD_BYTES)
              | checksum (u32)
              | payload (length bytes)
    payload = msgpack array of 3: [op, key, value]
              op 1 PUT:    key = array of str|uint (the key's parts), value = bin
              op 2 DELETE: key = array of str|uint,                   value = nil
              op 3 COMMIT: key = [n] (n = number of PUT/DELETE records in the batch),
                           value = nil
              op 4 PART:   key = array of str|uint, value = bin (1 .. MAX_CHUNK_BYTES bytes):
                           a leading piece of the value of the PUT that completes it

Large values are stored in chunks. A value longer than the store's chunk size C
(CHUNK_BYTES, 4 MiB, unless `open(chunk_bytes=...)` says less) is written as PART
records of C bytes each, then the PUT of the same key carrying the rest (1 .. C bytes);
the value is the PARTs' bytes followed by the PUT's, at most MAX_VALUE_BYTES in all. A
key's PARTs come directly before its PUT, in the same batch, nothing between them: a PART
followed by anything else, or by the PUT of another key, is corruption (no writer makes
one); PARTs left open at the end of the file are part of the torn, uncommitted batch.
So chunking changes nothing about atomicity: the COMMIT and the header's counter decide
whether a batch took effect, however many records its values took. The COMMIT counts the
PUT/DELETE records only (a chunked value counts once), as in version 2. A reader accepts
any chunk size up to MAX_CHUNK_BYTES, so logs written with another chunk size read back.

Why chunks of 4 MiB: a record is the unit the checksum and the length check cover, and
the record limit is what tells a damaged length field from a torn write (see below) and
bounds the checksum work of looking past a bad record; 4 MiB keeps both small while the
per-record overhead (8 bytes of header, about 20 of msgpack and key) stays below 0.001%.
The writer encodes and writes one record at a time, so storing a value costs one chunk of
memory beyond the value, not a second copy of it.

Version 2 (no PART records, records up to 64 MiB) is read and migrated on open: the log
is compacted into a version 3 file at once (the rename makes the switch atomic; a crash
before it leaves the version 2 log, migrated on the next open). Other versions are
refused as corruption ("unsupported format version").

Every payload therefore starts with the byte 0x93 (a fixarray of 3). The checksum is
`zlib.crc32` (CRC-32/ISO-HDLC, the zip/PNG polynomial; not CRC-32C, which the standard
library lacks) of the payload, *chained*: `checksum = zlib.crc32(payload, previous)`,
where `previous` is the previous record's checksum and, for the first record,
`zlib.crc32` of the header's first 12 bytes (magic and version). PART records are records
like the others: each has its own checksum in the chain. A record is thus
only valid in the one position it was written in: a record copied, moved or replayed
from elsewhere (even from an older file of the same store) fails its checksum. CRC-32
detects accidental damage; it is no defence against someone who can write the file.

A *batch* is the records of one `apply` call followed by one COMMIT record. Only
committed batches are part of the state: a batch is atomic, either all of its records
take effect on reopen or none do (what the replica needs: all of one `handle()` call's
persists, or none). A compacted file is one batch: a PUT per live key, then COMMIT; a
store with no keys is the header alone (count 0, length 32).

Only the last batch may be lost
-------------------------------
Each batch is fsynced before the next is written, so a crash can tear only the last one;
losing more means the file was damaged after the fact (truncated, zeroed), and a replica
rebuilt from it would have forgotten votes it sent. The chained checksums cannot see that
on their own: a log cut exactly at a batch boundary is a valid, shorter log. So the header
counts the committed batches and the byte length they end at. `apply` rewrites these 20
bytes in place (one `pwrite` into the first sector, which the disk writes whole) after
appending the batch, and the one fsync makes both durable. A crash before that fsync
completes may leave either write without the other, so on open, with B complete batches
ending at byte E and the header counting H ending at L:

- B = H and E = L: the counter is current; anything after E is the torn, uncounted
  batch the crash interrupted (the rules below).
- B = H - 1: the counter landed, the batch did not (or not entirely): repaired like a
  torn tail, also when nothing of it is left (the file ends at E). Data past L must be
  zeros. This is also what a file cut at exactly its last boundary after the fsync looks
  like, so a repaired store says so (`recovery_report.repaired`) and the replica treats
  its last batch of votes as possibly sent (pbft/replica.py, `lost_votes`).
- B = H + 1, the last batch starting at L, nothing after it: the batch landed, the counter
  did not. Nothing is lost; the counter is rewritten (`header_rewritten`).
- Anything else is `StorageCorruptError` naming the file, E and both counts: a log cut
  in the middle or at the end of an earlier batch, zeros over more than the last batch,
  a counter that fails its checksum. A counter in the header rather than a side file
  keeps one fsync per batch; in the COMMIT records it would not help, since a cut log's
  last COMMIT is as self-consistent as any.

Reading the log (`DurableStore.open`)
-------------------------------------
Records are read in order, checked, and each committed batch is applied to a dict. The
first record that does not check out (the *bad record*) decides what happens:

- Torn tail, repaired: the file ends inside a record header (fewer than 8 bytes left);
  or the bad record's declared length reaches past the end of the file (short payload);
  or its checksum is wrong (or its length is 0) and nothing but zero bytes follows its
  declared end. (Zeros, because a filesystem can make a file longer before the data
  lands: the unfinished batch then reads as zeros from some point on.) A torn candidate
  with a length field is accepted only if no checksum-valid record chained from its
  stored checksum starts anywhere after its header; otherwise its length field was
  damaged in the middle of the log and valid records follow, which is corruption.
  Complete records after the last COMMIT (an incomplete batch) are a torn tail too.
  A torn tail is discarded: the file is truncated to the end of the last COMMIT, the
  header's counter is set to the batches kept, both in one fsync, and
  `store.recovery_report` says what was dropped (offset, bytes, records, why); a warning
  is logged.
- Corruption, `StorageCorruptError` (names the file, the byte offset and the problem):
  a bad header (too short, even empty, wrong magic, unknown version; a new log is
  created complete, by a rename, so no crash leaves a short header); a length above
  MAX_RECORD_BYTES (even at the end: a torn write leaves a short or zeroed length, not a
  huge one); a bad record followed by anything but zero bytes (so a crash whose pages
  landed out of order, a later one but not an earlier one, is refused too: the safe
  side); a checksum-valid record whose payload is malformed (not msgpack, bad op, bad
  key, wrong value type), a COMMIT whose count does not match its batch, or PART records
  not directly followed by their key's PUT. The store
  never returns damaged state.
- Consequence of chaining: a record copied to the very end of the file is
  indistinguishable from a torn write (a bad checksum on the final record), so it is
  discarded; a record moved or duplicated anywhere else is corruption.

The whole log is read into memory on open; compaction keeps it within COMPACT_RATIO
times the live data (or COMPACT_MIN_BYTES).

Writing (`DurableStore.apply`)
------------------------------
Keys and values are checked first (nothing is written for an invalid batch). Then the
batch's records and its COMMIT are written in order (one buffered `write` per record, so a
large value is never copied whole; how the writes are split does not matter, a crash can
tear the batch anywhere and the COMMIT and counter rules above apply), then one `flush`,
the header's counter with one `pwrite`, one `os.fsync`, and only then is the in-memory
dict updated. An empty batch writes nothing.
If the write or the fsync fails, the file's contents are unknown (after a failed fsync
Linux may drop the dirty pages and report success next time), so the store is poisoned:
every later call raises `StorageFailedError`. The driver should treat any exception from
`apply` as fatal: crash, restart, and let `open` read what actually reached the disk.

Compaction
----------
When the file is larger than `compact_ratio` (4) times the live data and larger than
`compact_min_bytes` (1 MiB), `apply` compacts after its batch is durable; `compact()`
does it on demand. Steps: write header + one PUT per live key + COMMIT to
`<log>.compact` in the same directory (large values in chunks, as `apply` writes
them), fsync it, `os.replace` it over the log, fsync the
directory, then continue appending to the new file. A crash before the replace leaves
the old log intact and a stray `<log>.compact`, which `open` deletes; a crash after it
leaves the old or the new log, each complete (the rename is atomic, and durable once the
directory is fsynced). A failed automatic compaction
before the replace is logged and the old log kept; a failure after the replace poisons
the store (our handle may point at the replaced file).

Files are private: the log, `<log>.compact` and `<log>.lock` are created mode 0600 (they
hold balances and votes); an existing log readable by group or others is changed to
owner-only on open, with a warning (fixing beats refusing: the data is the replica's
own, and refusing would turn an upgrade into an outage).

Also: one process at a time. `open` takes an exclusive `flock` on `<log>.lock` (left in
place; deleting lock files races) and raises `StorageLockedError` if it is held. The
store is not thread-safe: one caller at a time (the trio driver calls it through
`trio.to_thread.run_sync`, one call at a time). Plain blocking I/O, no trio here.

Limits: a key is a tuple of 1 to MAX_KEY_PARTS parts, each a str of at most
MAX_KEY_PART_BYTES UTF-8 bytes or an int in 0 .. 2**64 - 1 (not a bool); a value is
bytes of at most MAX_VALUE_BYTES (1 GiB, why: at the constant); a payload is at most
MAX_RECORD_BYTES (a chunk and its key).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import os
import stat
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import msgpack

__all__ = [
    "COMPACT_MIN_BYTES",
    "CHUNK_BYTES",
    "COMPACT_RATIO",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_KEY_PARTS",
    "MAX_KEY_PART_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_VALUE_BYTES",
    "DurableStore",
    "Key",
    "RecoveryReport",
    "StorageCorruptError",
    "StorageError",
    "StorageFailedError",
    "StorageLockedError",
    "StoreStatistics",
    "TornTail",
]

logger = logging.getLogger(__name__)

Key = tuple[str | int, ...]

MAGIC = b"\x89PBFTKV\n"
FORMAT_VERSION = 3
_LEGACY_VERSION = 2  # no PART records, values in one record: read, then migrated on open
_HEADER = struct.Struct(">8sI")
_FIXED_HEADER_SIZE = _HEADER.size  # 12: magic and version, never rewritten
_COUNTERS = struct.Struct(">QQ")  # batch count, committed length
_COUNTERS_CHECKED = struct.Struct(">QQI")  # ... and crc32 of the first 28 header bytes
HEADER_SIZE = _FIXED_HEADER_SIZE + _COUNTERS_CHECKED.size  # 32
_RECORD_HEADER = struct.Struct(">II")
RECORD_HEADER_SIZE = _RECORD_HEADER.size  # 8
_PAYLOAD_FIRST_BYTE = b"\x93"  # msgpack fixarray of 3

OP_PUT = 1
OP_DELETE = 2
OP_COMMIT = 3
OP_PART = 4
_OPS = (OP_PUT, OP_DELETE, OP_COMMIT, OP_PART)

MAX_KEY_PARTS = 16
MAX_KEY_PART_BYTES = 256
MAX_UINT64 = 2**64 - 1
# Values longer than this are written as PART records of this size and a final PUT (see
# "Large values" in the module doc: small enough for the record checks, overhead < 0.001%).
CHUNK_BYTES = 4 * 1024 * 1024
MAX_CHUNK_BYTES = CHUNK_BYTES  # the largest piece a reader accepts in one record
# The largest value: the largest the replica persists is its stable checkpoint, at most
# pbft.codec.MAX_LOCAL_RECORD_BYTES (320 MiB: a 256 MiB ledger snapshot and its proof;
# tests/test_storage.py checks the store takes it). 1 GiB (256 chunks) leaves the core's
# limits room to grow without a store change, and no more than that, because open() holds
# the whole log in memory and compaction lets the log reach COMPACT_RATIO times the live
# data: a value of V bytes can cost about 5 V of memory at start-up.
MAX_VALUE_BYTES = 256 * CHUNK_BYTES
# A PUT or PART payload: array and op (2) + key (at most 3 + 16 * (3 + 256)) + bin32
# header (5) + a chunk; 8 KiB covers the key with room to spare.
MAX_RECORD_BYTES = MAX_CHUNK_BYTES + 8 * 1024
# Version 2 kept a value (up to 64 MiB then) in one record.
_LEGACY_MAX_RECORD_BYTES = 64 * 1024 * 1024 + 8 * 1024

COMPACT_RATIO = 4
COMPACT_MIN_BYTES = 1024 * 1024

FILE_MODE = 0o600  # the log, its lock and compaction files


# --- errors and reports -----------------------------------------------------------------


class StorageError(Exception):
    """Anything the store refuses to do."""


class StorageCorruptError(StorageError):
    """The log is damaged somewhere other than a torn tail; no state is returned."""

    def __init__(self, path: str, offset: int, problem: str) -> None:
        super().__init__(f"{path}: corrupt at byte {offset}: {problem}")
        self.path = path
        self.offset = offset
        self.problem = problem


class StorageLockedError(StorageError):
    """Another open store (in this or another process) holds the log."""


class StorageFailedError(StorageError):
    """Opening, a write, an fsync or a compaction step failed (an OSError, kept as the
    cause); the store must be reopened (restart)."""


@dataclass(frozen=True)
class TornTail:
    """What `open` discarded from the end of the log."""

    offset: int  # the file was truncated here: the end of the last committed batch
    bad_record_offset: int | None  # the first bad record; None if only a batch's COMMIT is missing
    reason: str
    bytes_discarded: int
    records_discarded: int  # complete, checksum-valid records of the uncommitted batch


@dataclass(frozen=True)
class RecoveryReport:
    path: str
    created: bool  # no log existed: a new, empty one was made
    removed_temp_file: bool  # a `<log>.compact` left by a crash mid-compaction was deleted
    file_size_before: int
    file_size_after: int
    batches_replayed: int
    records_replayed: int
    torn_tail: TornTail | None
    header_rewritten: bool = False  # the last batch landed, its counter update did not
    migrated_from_version: int | None = None  # an older format, rewritten as FORMAT_VERSION

    @property
    def repaired(self) -> bool:
        """Something was discarded: the replica may have lost votes of its last batch."""
        return self.torn_tail is not None

    @property
    def clean(self) -> bool:
        return self.torn_tail is None and not self.removed_temp_file and not self.header_rewritten


@dataclass(frozen=True)
class StoreStatistics:
    records_written: int  # PUT/DELETE records appended by apply (not COMMITs, not compaction)
    bytes_written: int  # bytes appended by apply plus the size of each compacted file
    fsyncs: int  # every os.fsync this store made, files and directory
    compactions: int
    live_keys: int
    file_size_bytes: int
    # fsync latency, for metrics: counts per FSYNC_BUCKETS_S upper bound (not cumulative;
    # the last counts those above every bound) and the seconds summed.
    fsync_buckets: tuple[int, ...] = ()
    fsync_seconds: float = 0.0


# Upper bounds (seconds) of the fsync latency histogram: tmpfs to a slow disk.
FSYNC_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# --- encoding -----------------------------------------------------------------------------


def _check_key(key: object) -> Key:
    """The key itself if valid; TypeError/ValueError naming the problem otherwise."""
    if not isinstance(key, tuple):
        raise TypeError(f"key must be a tuple, got {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_PARTS:
        raise ValueError(f"key must have 1 to {MAX_KEY_PARTS} parts, got {len(key)}")
    for part in key:
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise TypeError(f"key part {part!r} is not a str or an int")
        if isinstance(part, int):
            if not 0 <= part <= MAX_UINT64:
                raise ValueError(f"key part {part} is outside 0 .. 2**64 - 1")
        else:
            try:
                encoded = part.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"key part {part!r} is not valid UTF-8: {error}") from None
            if len(encoded) > MAX_KEY_PART_BYTES:
                raise ValueError(
                    f"key part of {len(encoded)} bytes exceeds {MAX_KEY_PART_BYTES} bytes"
                )
    return key


def _check_value(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise TypeError(f"value must be bytes or None, got {type(value).__name__}")
    if len(value) > MAX_VALUE_BYTES:
        raise ValueError(f"value of {len(value)} bytes exceeds {MAX_VALUE_BYTES} bytes")
    return value


def _check_chunk_bytes(chunk_bytes: object) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise TypeError(f"chunk_bytes must be an int, got {type(chunk_bytes).__name__}")
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    return chunk_bytes


def _encode_record(
    op: int, key: list[Any], value: bytes | memoryview | None, chain: int
) -> tuple[bytes, int]:
    """(the record's bytes, its checksum) for a record following checksum `chain`."""
    payload = msgpack.packb([op, key, value], use_bin_type=True)
    if len(payload) > MAX_RECORD_BYTES:  # unreachable with checked keys and chunk sizes
        raise ValueError(f"record payload of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    checksum = zlib.crc32(payload, chain)
    return _RECORD_HEADER.pack(len(payload), checksum) + payload, checksum


def _value_records(
    key: Key, value: bytes | None, chain: int, chunk_bytes: int
) -> Iterator[tuple[bytes, int]]:
    """The records of one write, each with its checksum: a DELETE, or a PUT preceded by a
    PART per full chunk when the value is longer than `chunk_bytes` (generated one at a
    time, so a large value is never copied whole)."""
    parts = list(key)
    if value is None:
        yield _encode_record(OP_DELETE, parts, None, chain)
        return
    view = memoryview(value)
    start = 0
    while len(value) - start > chunk_bytes:
        record, chain = _encode_record(OP_PART, parts, view[start : start + chunk_bytes], chain)
        yield record, chain
        start += chunk_bytes
    yield _encode_record(OP_PUT, parts, view[start:], chain)


def _write_value(
    out: IO[bytes], key: Key, value: bytes | None, chain: int, chunk_bytes: int
) -> tuple[int, int]:
    """Write one write's records (`_value_records`) to `out`: (bytes written, new chain)."""
    written = 0
    for record, checksum in _value_records(key, value, chain, chunk_bytes):
        out.write(record)
        written += len(record)
        chain = checksum
    return written, chain


def _fixed_header() -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION)


def _counters(batches: int, committed_end: int) -> bytes:
    """Header bytes 12..32: the batch count and committed length, with their checksum."""
    counted = _COUNTERS.pack(batches, committed_end)
    return counted + struct.pack(">I", zlib.crc32(counted, zlib.crc32(_fixed_header())))


def _header(batches: int, committed_end: int) -> bytes:
    return _fixed_header() + _counters(batches, committed_end)


def _commit_record_size(count: int) -> int:
    return RECORD_HEADER_SIZE + len(msgpack.packb([OP_COMMIT, [count], None]))


class _Malformed(Exception):
    pass


def _decode_payload(payload: bytes, version: int) -> tuple[int, Any, bytes | None]:
    try:
        decoded = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as error:  # msgpack raises several types for bad input
        raise _Malformed(f"payload is not one msgpack object: {error!r}") from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise _Malformed("payload is not a msgpack array of 3 [op, key, value]")
    op, key, value = decoded
    ops = (OP_PUT, OP_DELETE, OP_COMMIT) if version == _LEGACY_VERSION else _OPS
    if isinstance(op, bool) or op not in ops:
        raise _Malformed(f"unknown op {op!r}")
    if not isinstance(key, list):
        raise _Malformed(f"key is {type(key).__name__}, not an array")
    if op == OP_COMMIT:
        if len(key) != 1 or isinstance(key[0], bool) or not isinstance(key[0], int):
            raise _Malformed(f"COMMIT must carry [record count], got {key!r}")
        if value is not None:
            raise _Malformed("COMMIT with a value")
        return op, key[0], None
    try:
        checked = _check_key(tuple(key))
    except (TypeError, ValueError) as error:
        raise _Malformed(f"invalid key: {error}") from None
    if op == OP_PUT and not isinstance(value, bytes):
        raise _Malformed(f"PUT value is {type(value).__name__}, not bin")
    if op == OP_PART and (not isinstance(value, bytes) or not value):
        raise _Malformed("PART value is not a non-empty bin")
    if op == OP_DELETE and value is not None:
        raise _Malformed("DELETE with a value")
    return op, checked, value


# --- reading the log ----------------------------------------------------------------------


@dataclass
class _Scan:
    state: dict[Key, bytes]
    record_sizes: dict[Key, int]  # bytes of each live key's PUT (and PART) records
    chain: int  # checksum of the last committed record
    end: int  # end of the last committed batch
    batches: int
    records: int
    torn: TornTail | None
    header_behind: bool  # the counter in the header missed the last batch; rewritten
    version: int  # the file's format version (_LEGACY_VERSION is migrated on open)


def _chained_record_after(data: bytes, bad_offset: int, chain: int, limit: int) -> int | None:
    """Offset of a checksum-valid record chained from `chain` after the bad record's header."""
    view = memoryview(data)
    start = bad_offset + RECORD_HEADER_SIZE  # a following record's header starts here or later
    found = data.find(_PAYLOAD_FIRST_BYTE, start + RECORD_HEADER_SIZE)
    while found != -1:
        offset = found - RECORD_HEADER_SIZE
        length, checksum = _RECORD_HEADER.unpack_from(data, offset)
        if (
            0 < length <= limit
            and found + length <= len(data)
            and zlib.crc32(view[found : found + length], chain) == checksum
        ):
            return offset
        found = data.find(_PAYLOAD_FIRST_BYTE, found + 1)
    return None


def _scan(path: str, data: bytes) -> _Scan:
    size = len(data)

    def corrupt(offset: int, problem: str) -> StorageCorruptError:
        return StorageCorruptError(path, offset, problem)

    if size < HEADER_SIZE:
        raise corrupt(0, f"file header is {size} bytes, expected {HEADER_SIZE}")
    magic, version = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise corrupt(0, f"bad magic {magic!r}, expected {MAGIC!r}: not a store log")
    if version not in (FORMAT_VERSION, _LEGACY_VERSION):
        raise corrupt(
            len(MAGIC),
            f"unsupported format version {version} (this store reads versions "
            f"{_LEGACY_VERSION} and {FORMAT_VERSION})",
        )
    limit = MAX_RECORD_BYTES if version == FORMAT_VERSION else _LEGACY_MAX_RECORD_BYTES
    header_batches, header_end, header_crc = _COUNTERS_CHECKED.unpack_from(data, _FIXED_HEADER_SIZE)
    if zlib.crc32(data[_FIXED_HEADER_SIZE : HEADER_SIZE - 4], zlib.crc32(data[:12])) != header_crc:
        raise corrupt(_FIXED_HEADER_SIZE, "the header's batch counter fails its checksum")

    state: dict[Key, bytes] = {}
    record_sizes: dict[Key, int] = {}
    pending: list[tuple[int, Key, bytes | None, int]] = []
    pending_records = 0  # of the uncommitted batch, PARTs included
    # The PARTs read so far of a chunked value: its key, pieces, total length, record bytes.
    part_key: Key | None = None
    part_pieces: list[bytes] = []
    part_length = part_record_bytes = 0
    chain = zlib.crc32(data[:_FIXED_HEADER_SIZE])
    committed_chain = chain
    position = committed_end = last_batch_start = HEADER_SIZE
    batches = records = 0
    bad: tuple[int, str] | None = None

    while position < size:
        remaining = size - position
        if remaining < RECORD_HEADER_SIZE:
            bad = (position, f"short record header: {remaining} of {RECORD_HEADER_SIZE} bytes")
            break
        length, stored = _RECORD_HEADER.unpack_from(data, position)
        if length > limit:
            raise corrupt(position, f"record length {length} exceeds {limit} bytes")
        end = position + RECORD_HEADER_SIZE + length
        problem = None
        if length == 0:
            problem = "record of length 0"
        elif end > size:
            problem = f"short payload: {remaining - RECORD_HEADER_SIZE} of {length} bytes"
        elif zlib.crc32(memoryview(data)[position + RECORD_HEADER_SIZE : end], chain) != stored:
            problem = "checksum mismatch (damaged, or a record moved or replayed from elsewhere)"
        if problem is not None:
            if end < size and data.count(0, end) != size - end:
                raise corrupt(
                    position,
                    f"{problem}, followed by {size - end} more bytes that are not all zero: "
                    "not a torn write",
                )
            follower = _chained_record_after(data, position, stored, limit)
            if follower is not None:
                raise corrupt(
                    position,
                    f"{problem}, but a valid record follows at byte {follower}: "
                    "the length field is damaged",
                )
            if end < size:
                problem += f"; the {size - end} bytes after it are all zero"
            bad = (position, problem)
            break
        try:
            op, key, value = _decode_payload(data[position + RECORD_HEADER_SIZE : end], version)
        except _Malformed as error:
            raise corrupt(position, f"checksum-valid record is malformed: {error}") from None
        if part_key is not None and op != OP_PART and (op != OP_PUT or key != part_key):
            raise corrupt(
                position, f"the PART records of key {part_key!r} are not followed by its PUT"
            )
        if op == OP_PART:
            if part_key is not None and key != part_key:
                raise corrupt(
                    position, f"a PART of key {key!r} interrupts the value of {part_key!r}"
                )
            if not isinstance(value, bytes):  # _decode_payload let no other PART through
                raise corrupt(position, "PART without a value")
            part_key = key
            part_pieces.append(value)
            part_length += len(value)
            part_record_bytes += end - position
            if part_length > MAX_VALUE_BYTES:
                raise corrupt(position, f"the value of key {key!r} exceeds {MAX_VALUE_BYTES} bytes")
            pending_records += 1
        elif op == OP_COMMIT:
            if key != len(pending):
                raise corrupt(
                    position, f"COMMIT counts {key} records, its batch has {len(pending)}"
                )
            for _, record_key, record_value, record_size in pending:
                if record_value is None:
                    state.pop(record_key, None)
                    record_sizes.pop(record_key, None)
                else:
                    state[record_key] = record_value
                    record_sizes[record_key] = record_size
            records += len(pending)
            batches += 1
            pending = []
            pending_records = 0
            last_batch_start = committed_end
            committed_end = end
            committed_chain = stored
        else:
            size_of_value = end - position
            if part_key is not None:
                if not isinstance(value, bytes):  # only the key's PUT may follow its PARTs
                    raise corrupt(position, f"the PART records of key {key!r} end in a DELETE")
                if part_length + len(value) > MAX_VALUE_BYTES:
                    raise corrupt(
                        position, f"the value of key {key!r} exceeds {MAX_VALUE_BYTES} bytes"
                    )
                part_pieces.append(value)
                value = b"".join(part_pieces)
                size_of_value += part_record_bytes
                part_key, part_pieces, part_length, part_record_bytes = None, [], 0, 0
            pending.append((position, key, value, size_of_value))
            pending_records += 1
        chain = stored
        position = end

    torn = None
    if bad is not None or pending_records:
        if bad is None:
            reason = f"incomplete batch: {pending_records} records without a COMMIT"
        else:
            reason = bad[1]
            if pending_records:
                reason += f" (after {pending_records} records of the same, uncommitted batch)"
        torn = TornTail(
            offset=committed_end,
            bad_record_offset=None if bad is None else bad[0],
            reason=reason,
            bytes_discarded=size - committed_end,
            records_discarded=pending_records,
        )

    # The header's counter says how many batches the log held when it was last fsynced;
    # only the batch being written at the crash may differ (see "Only the last batch").
    counted = f"the header counts {header_batches} committed batches ending at byte {header_end}"
    header_behind = False
    if batches == header_batches:
        if committed_end != header_end:
            raise corrupt(committed_end, f"{counted}, but the batches end at byte {committed_end}")
    elif batches == header_batches - 1:
        # The last counted batch did not (entirely) land: torn, or cut off whole.
        beyond = size - header_end
        if not committed_end < header_end or (beyond > 0 and data.count(0, header_end) != beyond):
            raise corrupt(
                committed_end,
                f"{counted}, the log holds {batches} ending at byte {committed_end} and data "
                f"runs on past byte {header_end}: not a torn last batch",
            )
        lost = f"the last batch (bytes {committed_end}..{header_end} per the header) is missing"
        torn = TornTail(
            offset=committed_end,
            bad_record_offset=None if torn is None else torn.bad_record_offset,
            reason=lost if torn is None else f"{torn.reason}; {lost}",
            bytes_discarded=size - committed_end,
            records_discarded=0 if torn is None else torn.records_discarded,
        )
    elif batches == header_batches + 1 and last_batch_start == header_end and torn is None:
        # The last batch landed but the counter update did not: nothing is lost.
        header_behind = True
    else:
        missing = header_batches - batches
        what = (
            f"{missing} batches are missing, more than the one a crash can tear"
            if missing > 0
            else "the log holds more than the one batch a crash can leave uncounted"
        )
        raise corrupt(
            committed_end,
            f"{counted}, the log holds {batches} ending at byte {committed_end}: {what}",
        )
    return _Scan(
        state,
        record_sizes,
        committed_chain,
        committed_end,
        batches,
        records,
        torn,
        header_behind,
        version,
    )


# --- file helpers -------------------------------------------------------------------------


def _temp_path(path: str) -> str:
    return path + ".compact"


def _private_opener(path: str, flags: int) -> int:
    # The log holds balances and votes: readable by the replica's user alone.
    return os.open(path, flags, FILE_MODE)


def _restrict(path: str) -> None:
    """Take group and other permissions away from an existing file, with a warning."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        logger.warning(
            "%s was mode %#o, readable by others; changed it to %#o", path, mode, mode & 0o700
        )


def _acquire_lock(path: str) -> int:
    lock_path = path + ".lock"
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StorageLockedError(
            f"{path} is already open in another DurableStore (lock {lock_path} is held)"
        ) from None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


# --- the store ----------------------------------------------------------------------------


class DurableStore:
    """A dict of `Key -> bytes` whose every `apply` is durable before it returns."""

    def __init__(
        self,
        path: str,
        lock: int,
        *,
        compact_ratio: float,
        compact_min_bytes: int,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        # Use DurableStore.open(); this only sets the fields.
        self._path = path
        self._chunk_bytes = chunk_bytes
        self._lock: int | None = lock
        self._file: IO[bytes] | None = None
        self._compact_ratio = compact_ratio
        self._compact_min_bytes = compact_min_bytes
        self._state: dict[Key, bytes] = {}
        self._record_sizes: dict[Key, int] = {}
        self._live_record_bytes = 0
        self._chain = 0
        self._file_size = 0
        self._batches = 0  # committed batches in the file, as its header counts them
        self._failed: str | None = None
        self._records_written = 0
        self._bytes_written = 0
        self._fsyncs = 0
        self._fsync_buckets = [0] * (len(FSYNC_BUCKETS_S) + 1)
        self._fsync_seconds = 0.0
        self._compactions = 0
        self.recovery_report: RecoveryReport

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        compact_ratio: float = COMPACT_RATIO,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> DurableStore:
        """Open (or create) the log at `path` and rebuild its state; see the module doc.

        `chunk_bytes` is the size of the pieces this store cuts large values into when it
        writes (1 .. MAX_CHUNK_BYTES; the default suits everyone, tests use small ones).
        """
        _check_chunk_bytes(chunk_bytes)
        absolute = os.path.abspath(os.fspath(path))
        try:
            lock = _acquire_lock(absolute)
        except OSError as error:
            raise StorageFailedError(
                f"{absolute}: cannot open the lock file: {error.strerror or error}"
            ) from error
        store = cls(
            absolute,
            lock,
            compact_ratio=compact_ratio,
            compact_min_bytes=compact_min_bytes,
            chunk_bytes=chunk_bytes,
        )
        try:
            store._recover()
        except OSError as error:
            store.close()
            raise StorageFailedError(
                f"{absolute}: cannot open the log: {error.strerror or error}"
            ) from error
        except BaseException:
            store.close()
            raise
        return store

    @property
    def path(self) -> str:
        return self._path

    # --- reading --------------------------------------------------------------------------

    def get(self, key: Key) -> bytes | None:
        self._check_open()
        return self._state.get(key)

    def records(self) -> dict[Key, bytes]:
        """A copy of the state: what `Replica(..., records=...)` takes."""
        self._check_open()
        return dict(self._state)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            records_written=self._records_written,
            bytes_written=self._bytes_written,
            fsyncs=self._fsyncs,
            compactions=self._compactions,
            live_keys=len(self._state),
            file_size_bytes=self._file_size,
            fsync_buckets=tuple(self._fsync_buckets),
            fsync_seconds=self._fsync_seconds,
        )

    @property
    def failed(self) -> bool:
        """Whether a write failed: every later one raises `StorageFailedError`."""
        return self._failed is not None

    # --- writing --------------------------------------------------------------------------

    def apply(self, records: Iterable[tuple[Key, bytes | None]]) -> None:
        """Write one atomic batch (None deletes), fsync once, then update the state."""
        self._check_usable()
        batch = [(_check_key(key), _check_value(value)) for key, value in records]
        if not batch:
            return
        sizes: list[int] = []
        chain = self._chain
        written = 0
        file = self._require_file()
        try:
            # One record at a time: a chunked value is never copied whole.
            for key, value in batch:
                size, chain = _write_value(file, key, value, chain, self._chunk_bytes)
                sizes.append(size)
                written += size
            commit, chain = _encode_record(OP_COMMIT, [len(batch)], None, chain)
            file.write(commit)
            written += len(commit)
            file.flush()
            # Same fsync: a crash leaves the counter and the batch each landed or not.
            counters = _counters(self._batches + 1, self._file_size + written)
            os.pwrite(file.fileno(), counters, _FIXED_HEADER_SIZE)
            self._fsync(file.fileno())
        except BaseException as error:
            self._poison(f"apply failed: {error!r}")
            if isinstance(error, OSError):
                raise StorageFailedError(
                    f"{self._path}: write or fsync failed, state on disk unknown: {error}"
                ) from error
            raise
        self._chain = chain
        self._batches += 1
        self._file_size += written
        self._bytes_written += written
        self._records_written += len(batch)
        for (key, value), size in zip(batch, sizes, strict=True):
            self._live_record_bytes -= self._record_sizes.pop(key, 0)
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = value
                self._record_sizes[key] = size
                self._live_record_bytes += size
        self._maybe_compact()

    def live_size(self) -> int:
        """The size of the log if it were compacted now."""
        if not self._state:
            return HEADER_SIZE
        return HEADER_SIZE + self._live_record_bytes + _commit_record_size(len(self._state))

    def compact(self) -> None:
        """Rewrite the log as one batch of the live keys; crash-safe at every step."""
        self._check_usable()
        temp = _temp_path(self._path)
        try:
            size, chain, record_sizes = self._write_snapshot(temp)
            os.replace(temp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        # The new file is in place. Failing from here on could leave us appending to the
        # replaced file, so any error poisons the store.
        try:
            self._fsync_directory()
            new_file = open(self._path, "r+b")
            new_file.seek(0, os.SEEK_END)
        except BaseException as error:
            self._poison(f"compaction failed after the replace: {error!r}")
            raise StorageFailedError(
                f"{self._path}: compaction failed after replacing the log: {error}"
            ) from error
        old = self._file
        self._file = new_file
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
        self._chain = chain
        self._batches = 1 if self._state else 0
        self._file_size = size
        # The same unless the log was written with another chunk size (or migrated).
        self._record_sizes = record_sizes
        self._live_record_bytes = sum(record_sizes.values())
        self._bytes_written += size
        self._compactions += 1

    def close(self) -> None:
        file, self._file = self._file, None
        lock, self._lock = self._lock, None
        try:
            if file is not None:
                file.close()
        finally:
            if lock is not None:
                os.close(lock)  # releases the flock

    def __enter__(self) -> DurableStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------

    def _recover(self) -> None:
        temp = _temp_path(self._path)
        removed_temp = False
        if os.path.lexists(temp):
            os.unlink(temp)  # a crash mid-compaction: the log itself is authoritative
            removed_temp = True
        created = False
        if not os.path.exists(self._path):
            # Created like a compaction of nothing, so a log on disk always has its header.
            self._write_snapshot(temp)
            os.replace(temp, self._path)
            self._fsync_directory()
            created = True
        _restrict(self._path)
        file = open(self._path, "r+b")
        self._file = file
        data = file.read()
        scan = _scan(self._path, data)
        file_size_before = len(data)
        migrate = scan.version != FORMAT_VERSION
        if scan.torn is not None:
            logger.warning(
                "%s: discarded a torn tail at byte %d (%d bytes, %d records): %s",
                self._path,
                scan.torn.offset,
                scan.torn.bytes_discarded,
                scan.torn.records_discarded,
                scan.torn.reason,
            )
        # An old-format log is repaired by the migration's compaction below instead: its
        # header must not be rewritten with this version's counter checksum.
        if (scan.torn is not None or scan.header_behind) and not migrate:
            file.truncate(scan.end)
            # A crash before the fsync may leave the file truncated and the counter
            # unchanged: the next open sees the same one-batch difference and repeats this.
            os.pwrite(file.fileno(), _counters(scan.batches, scan.end), _FIXED_HEADER_SIZE)
            file.flush()
            self._fsync(file.fileno())
        file.seek(scan.end)
        self._state = scan.state
        self._record_sizes = scan.record_sizes
        self._live_record_bytes = sum(scan.record_sizes.values())
        self._chain = scan.chain
        self._file_size = scan.end
        self._batches = scan.batches
        del data  # the state holds what it needs; the compaction below may want the memory
        if migrate:
            # Crash-safe like any compaction: until the rename, the old log is the log.
            self.compact()
            logger.warning(
                "%s: migrated from format version %d to %d",
                self._path,
                scan.version,
                FORMAT_VERSION,
            )
        self.recovery_report = RecoveryReport(
            path=self._path,
            created=created,
            removed_temp_file=removed_temp,
            file_size_before=file_size_before,
            file_size_after=self._file_size,
            batches_replayed=scan.batches,
            records_replayed=scan.records,
            torn_tail=scan.torn,
            header_rewritten=scan.header_behind,
            migrated_from_version=scan.version if migrate else None,
        )

    def _write_snapshot(self, temp: str) -> tuple[int, int, dict[Key, int]]:
        """Write the live state as a complete log to `temp` and fsync it: (size, chain, the
        record bytes of each key)."""
        chain = zlib.crc32(_fixed_header())
        size = HEADER_SIZE
        batches = 1 if self._state else 0
        record_sizes: dict[Key, int] = {}
        with open(temp, "wb", opener=_private_opener) as out:
            out.write(_header(0, HEADER_SIZE))  # the counter is filled in below
            for key, value in self._state.items():
                written, chain = _write_value(out, key, value, chain, self._chunk_bytes)
                record_sizes[key] = written
                size += written
            if self._state:
                record, chain = _encode_record(OP_COMMIT, [len(self._state)], None, chain)
                out.write(record)
                size += len(record)
            out.flush()
            os.pwrite(out.fileno(), _counters(batches, size), _FIXED_HEADER_SIZE)
            self._fsync(out.fileno())
        return size, chain, record_sizes

    def _maybe_compact(self) -> None:
        if self._file_size <= self._compact_min_bytes:
            return
        if self._file_size <= self._compact_ratio * self.live_size():
            return
        try:
            self.compact()
        except StorageFailedError:
            raise
        except OSError as error:
            # The batch is durable and the old log intact: keep going without compacting.
            logger.warning("%s: compaction failed, keeping the log as is: %s", self._path, error)

    def _fsync(self, descriptor: int) -> None:
        self._fsyncs += 1
        started = time.perf_counter()
        os.fsync(descriptor)
        took = time.perf_counter() - started
        self._fsync_seconds += took
        self._fsync_buckets[bisect.bisect_left(FSYNC_BUCKETS_S, took)] += 1

    def _fsync_directory(self) -> None:
        directory = os.path.dirname(self._path)
        descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            self._fsync(descriptor)
        finally:
            os.close(descriptor)

    def _poison(self, why: str) -> None:
        self._failed = why

    def _check_open(self) -> None:
        if self._lock is None:
            raise StorageError(f"{self._path}: the store is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise StorageFailedError(
                f"{self._path}: an earlier write failed ({self._failed}); reopen the store"
            )

    def _require_file(self) -> IO[bytes]:
        if self._file is None:
            raise StorageError(f"{self._path}: the store is closed")
        return self._file
