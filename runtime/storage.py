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

On-disk format (version 2)
--------------------------
All integers are big-endian. The file is a header followed by records::

    header  = magic (8 bytes: 89 50 42 46 54 4B 56 0A, i.e. b"\\x89PBFTKV\\n")
              | format version (u32, = 2)                                  -- 12 bytes
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

Every payload therefore starts with the byte 0x93 (a fixarray of 3). The checksum is
`zlib.crc32` (CRC-32/ISO-HDLC, the zip/PNG polynomial; not CRC-32C, which the standard
library lacks) of the payload, *chained*: `checksum = zlib.crc32(payload, previous)`,
where `previous` is the previous record's checksum and, for the first record,
`zlib.crc32` of the header's first 12 bytes (magic and version). A record is thus
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
  key, wrong value type) or a COMMIT whose count does not match its batch. The store
  never returns damaged state.
- Consequence of chaining: a record copied to the very end of the file is
  indistinguishable from a torn write (a bad checksum on the final record), so it is
  discarded; a record moved or duplicated anywhere else is corruption.

The whole log is read into memory on open; compaction keeps it within COMPACT_RATIO
times the live data (or COMPACT_MIN_BYTES).

Writing (`DurableStore.apply`)
------------------------------
Keys and values are checked first (nothing is written for an invalid batch). Then the
batch's records and its COMMIT are written with one `write`, then one `flush`, the
header's counter with one `pwrite`, one `os.fsync`, and only then is the in-memory dict
updated. An empty batch writes nothing.
If the write or the fsync fails, the file's contents are unknown (after a failed fsync
Linux may drop the dirty pages and report success next time), so the store is poisoned:
every later call raises `StorageFailedError`. The driver should treat any exception from
`apply` as fatal: crash, restart, and let `open` read what actually reached the disk.

Compaction
----------
When the file is larger than `compact_ratio` (4) times the live data and larger than
`compact_min_bytes` (1 MiB), `apply` compacts after its batch is durable; `compact()`
does it on demand. Steps: write header + one PUT per live key + COMMIT to
`<log>.compact` in the same directory, fsync it, `os.replace` it over the log, fsync the
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
bytes of at most MAX_VALUE_BYTES (64 MiB); a payload is at most MAX_RECORD_BYTES.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import msgpack

__all__ = [
    "COMPACT_MIN_BYTES",
    "COMPACT_RATIO",
    "FORMAT_VERSION",
    "MAGIC",
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
FORMAT_VERSION = 2
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

MAX_KEY_PARTS = 16
MAX_KEY_PART_BYTES = 256
MAX_UINT64 = 2**64 - 1
MAX_VALUE_BYTES = 64 * 1024 * 1024
# A PUT payload: array and op (2) + key (at most 3 + 16 * (3 + 256)) + bin32 header (5)
# + the value; 8 KiB covers the key with room to spare.
MAX_RECORD_BYTES = MAX_VALUE_BYTES + 8 * 1024

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


def _encode_record(op: int, key: list[Any], value: bytes | None, chain: int) -> tuple[bytes, int]:
    """(the record's bytes, its checksum) for a record following checksum `chain`."""
    payload = msgpack.packb([op, key, value], use_bin_type=True)
    if len(payload) > MAX_RECORD_BYTES:  # unreachable with checked keys and values
        raise ValueError(f"record payload of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    checksum = zlib.crc32(payload, chain)
    return _RECORD_HEADER.pack(len(payload), checksum) + payload, checksum


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


def _decode_payload(payload: bytes) -> tuple[int, Any, bytes | None]:
    try:
        decoded = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as error:  # msgpack raises several types for bad input
        raise _Malformed(f"payload is not one msgpack object: {error!r}") from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise _Malformed("payload is not a msgpack array of 3 [op, key, value]")
    op, key, value = decoded
    if isinstance(op, bool) or op not in (OP_PUT, OP_DELETE, OP_COMMIT):
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
    if op == OP_DELETE and value is not None:
        raise _Malformed("DELETE with a value")
    return op, checked, value


# --- reading the log ----------------------------------------------------------------------


@dataclass
class _Scan:
    state: dict[Key, bytes]
    record_sizes: dict[Key, int]  # size of each live key's PUT record, for compaction
    chain: int  # checksum of the last committed record
    end: int  # end of the last committed batch
    batches: int
    records: int
    torn: TornTail | None
    header_behind: bool  # the counter in the header missed the last batch; rewritten


def _chained_record_after(data: bytes, bad_offset: int, chain: int) -> int | None:
    """Offset of a checksum-valid record chained from `chain` after the bad record's header."""
    view = memoryview(data)
    start = bad_offset + RECORD_HEADER_SIZE  # a following record's header starts here or later
    found = data.find(_PAYLOAD_FIRST_BYTE, start + RECORD_HEADER_SIZE)
    while found != -1:
        offset = found - RECORD_HEADER_SIZE
        length, checksum = _RECORD_HEADER.unpack_from(data, offset)
        if (
            0 < length <= MAX_RECORD_BYTES
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
    if version != FORMAT_VERSION:
        raise corrupt(len(MAGIC), f"unsupported format version {version}")
    header_batches, header_end, header_crc = _COUNTERS_CHECKED.unpack_from(data, _FIXED_HEADER_SIZE)
    if zlib.crc32(data[_FIXED_HEADER_SIZE : HEADER_SIZE - 4], zlib.crc32(data[:12])) != header_crc:
        raise corrupt(_FIXED_HEADER_SIZE, "the header's batch counter fails its checksum")

    state: dict[Key, bytes] = {}
    record_sizes: dict[Key, int] = {}
    pending: list[tuple[int, Key, bytes | None, int]] = []
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
        if length > MAX_RECORD_BYTES:
            raise corrupt(position, f"record length {length} exceeds {MAX_RECORD_BYTES} bytes")
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
            follower = _chained_record_after(data, position, stored)
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
            op, key, value = _decode_payload(data[position + RECORD_HEADER_SIZE : end])
        except _Malformed as error:
            raise corrupt(position, f"checksum-valid record is malformed: {error}") from None
        if op == OP_COMMIT:
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
            last_batch_start = committed_end
            committed_end = end
            committed_chain = stored
        else:
            pending.append((position, key, value, end - position))
        chain = stored
        position = end

    torn = None
    if bad is not None or pending:
        if bad is None:
            reason = f"incomplete batch: {len(pending)} records without a COMMIT"
        else:
            reason = bad[1]
            if pending:
                reason += f" (after {len(pending)} records of the same, uncommitted batch)"
        torn = TornTail(
            offset=committed_end,
            bad_record_offset=None if bad is None else bad[0],
            reason=reason,
            bytes_discarded=size - committed_end,
            records_discarded=len(pending),
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
        self, path: str, lock: int, *, compact_ratio: float, compact_min_bytes: int
    ) -> None:
        # Use DurableStore.open(); this only sets the fields.
        self._path = path
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
        self._compactions = 0
        self.recovery_report: RecoveryReport

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        compact_ratio: float = COMPACT_RATIO,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> DurableStore:
        """Open (or create) the log at `path` and rebuild its state; see the module doc."""
        absolute = os.path.abspath(os.fspath(path))
        try:
            lock = _acquire_lock(absolute)
        except OSError as error:
            raise StorageFailedError(
                f"{absolute}: cannot open the lock file: {error.strerror or error}"
            ) from error
        store = cls(
            absolute, lock, compact_ratio=compact_ratio, compact_min_bytes=compact_min_bytes
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
        )

    # --- writing --------------------------------------------------------------------------

    def apply(self, records: Iterable[tuple[Key, bytes | None]]) -> None:
        """Write one atomic batch (None deletes), fsync once, then update the state."""
        self._check_usable()
        batch = [(_check_key(key), _check_value(value)) for key, value in records]
        if not batch:
            return
        chunks: list[bytes] = []
        sizes: list[int] = []
        chain = self._chain
        for key, value in batch:
            op = OP_DELETE if value is None else OP_PUT
            record, chain = _encode_record(op, list(key), value, chain)
            chunks.append(record)
            sizes.append(len(record))
        commit, chain = _encode_record(OP_COMMIT, [len(batch)], None, chain)
        chunks.append(commit)
        blob = b"".join(chunks)
        file = self._require_file()
        try:
            file.write(blob)
            file.flush()
            # Same fsync: a crash leaves the counter and the batch each landed or not.
            counters = _counters(self._batches + 1, self._file_size + len(blob))
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
        self._file_size += len(blob)
        self._bytes_written += len(blob)
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
            size, chain = self._write_snapshot(temp)
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
        if scan.torn is not None:
            logger.warning(
                "%s: discarded a torn tail at byte %d (%d bytes, %d records): %s",
                self._path,
                scan.torn.offset,
                scan.torn.bytes_discarded,
                scan.torn.records_discarded,
                scan.torn.reason,
            )
            file.truncate(scan.end)
        if scan.torn is not None or scan.header_behind:
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
        self.recovery_report = RecoveryReport(
            path=self._path,
            created=created,
            removed_temp_file=removed_temp,
            file_size_before=len(data),
            file_size_after=scan.end,
            batches_replayed=scan.batches,
            records_replayed=scan.records,
            torn_tail=scan.torn,
            header_rewritten=scan.header_behind,
        )

    def _write_snapshot(self, temp: str) -> tuple[int, int]:
        """Write the live state as a complete log to `temp` and fsync it: (size, chain)."""
        chain = zlib.crc32(_fixed_header())
        size = HEADER_SIZE
        batches = 1 if self._state else 0
        with open(temp, "wb", opener=_private_opener) as out:
            out.write(_header(0, HEADER_SIZE))  # the counter is filled in below
            for key, value in self._state.items():
                record, chain = _encode_record(OP_PUT, list(key), value, chain)
                out.write(record)
                size += len(record)
            if self._state:
                record, chain = _encode_record(OP_COMMIT, [len(self._state)], None, chain)
                out.write(record)
                size += len(record)
            out.flush()
            os.pwrite(out.fileno(), _counters(batches, size), _FIXED_HEADER_SIZE)
            self._fsync(out.fileno())
        return size, chain

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
        os.fsync(descriptor)

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
