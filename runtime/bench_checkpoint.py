"""Storing and reloading a large stable checkpoint: the chunked store against one record.

    python -m runtime.bench_checkpoint [--accounts 1000000] [--repeat 3]

Builds a ledger of `--accounts` generated accounts twice, with the default names (its
checkpoint fits in one 64 MiB record, the old limit) and with 64-character names (it does
not), makes the replica's ("checkpoint",) record of each, and times:

- store: `DurableStore.apply` of the record (write and fsync) to an open, empty log, as a
  replica persists it;
- reload: `DurableStore.open` of the log and `records()`, as a restarted replica reads it.

Next to it, in the same run, the baseline: the same record written and read back as one
record the way format version 2 did (one msgpack payload, one write, one fsync; read
whole, one checksum, one unpack), where it fits in a version 2 record. The ledger's own
costs (snapshot, digest, restore) are printed once for scale: they do not depend on the
store. Best of `--repeat` runs; figures only, nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import msgpack

from pbft.codec import pack
from pbft.genesis import ACCOUNT_PREFIX
from pbft.ledger import GeneratedAccounts, Ledger
from runtime.storage import CHUNK_BYTES, DurableStore

# What a version 2 record could hold (runtime/storage.py kept this as MAX_VALUE_BYTES).
OLD_VALUE_LIMIT = 64 * 1024 * 1024
OLD_FIXED_HEADER = b"\x89PBFTKV\n" + struct.pack(">I", 2)


def _best(repeat: int, run: Callable[[], float | None]) -> float:
    """The shortest of `repeat` runs; a run may time itself (and return it) to leave out
    its set-up."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        timed = run()
        times.append(time.perf_counter() - started if timed is None else timed)
    return min(times)


def _record(accounts: GeneratedAccounts) -> tuple[bytes, dict[str, float]]:
    """The ("checkpoint",) record a replica would persist, and the ledger's costs."""
    costs = {}
    started = time.perf_counter()
    ledger = Ledger(accounts, 4096)
    costs["genesis"] = time.perf_counter() - started
    started = time.perf_counter()
    snapshot = ledger.snapshot()
    costs["snapshot"] = time.perf_counter() - started
    started = time.perf_counter()
    digest = ledger.digest()
    costs["digest"] = time.perf_counter() - started
    started = time.perf_counter()
    Ledger.restore(snapshot)
    costs["restore"] = time.perf_counter() - started
    proof = [bytes(178)] * 3  # three signed CHECKPOINT messages' worth
    return pack([16, bytes(32), digest, snapshot, proof]), costs


def _single_record_store(path: Path, value: bytes) -> None:
    """Format version 2's apply of one PUT: one payload, one write, one fsync."""
    payload = msgpack.packb([1, ["checkpoint"], value], use_bin_type=True)
    checksum = zlib.crc32(payload, zlib.crc32(OLD_FIXED_HEADER))
    commit = msgpack.packb([3, [1], None])
    blob = b"".join(
        [
            struct.pack(">II", len(payload), checksum),
            payload,
            struct.pack(">II", len(commit), zlib.crc32(commit, checksum)),
            commit,
        ]
    )
    with open(path, "wb") as out:
        out.write(OLD_FIXED_HEADER + bytes(20))  # the counter, filled in below
        out.write(blob)
        out.flush()
        os.pwrite(out.fileno(), bytes(20), 12)
        os.fsync(out.fileno())


def _single_record_reload(path: Path) -> bytes:
    """Format version 2's open of that log: read whole, check, unpack the one payload."""
    data = path.read_bytes()
    length, checksum = struct.unpack_from(">II", data, 32)
    payload = data[40 : 40 + length]
    if zlib.crc32(payload, zlib.crc32(data[:12])) != checksum:
        raise RuntimeError("the single record did not read back")
    value: bytes = msgpack.unpackb(payload, raw=False)[2]
    return value


def _chunked(directory: Path, value: bytes, repeat: int) -> tuple[float, float, int]:
    log = directory / "chunked.log"

    def store() -> float:
        for leftover in directory.glob("chunked.log*"):
            leftover.unlink()
        with DurableStore.open(log) as opened:  # creating the empty log is not timed
            started = time.perf_counter()
            opened.apply([(("checkpoint",), value)])
            return time.perf_counter() - started

    def reload() -> None:
        with DurableStore.open(log) as opened:
            if opened.records()[("checkpoint",)] != value:
                raise RuntimeError("the checkpoint did not read back")

    stored = _best(repeat, store)
    return stored, _best(repeat, reload), log.stat().st_size


def _single(directory: Path, value: bytes, repeat: int) -> tuple[float, float]:
    log = directory / "single.log"

    def reload() -> None:
        if _single_record_reload(log) != value:
            raise RuntimeError("the single record did not read back")

    return _best(repeat, lambda: _single_record_store(log, value)), _best(repeat, reload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.accounts <= 10_000_000 or not 1 <= arguments.repeat <= 100:
        parser.error("--accounts must be in 1..10000000 and --repeat in 1..100")
    count = arguments.accounts
    width = len(str(count - 1))
    cases = [
        ("default names", GeneratedAccounts(count, 1000, ACCOUNT_PREFIX, [0, 1])),
        ("64-char names", GeneratedAccounts(count, 1000, "x" * (64 - width), [0, 1])),
    ]
    print(f"chunk size {CHUNK_BYTES:,} bytes; best of {arguments.repeat}; times in seconds")
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as temporary:
        directory = Path(temporary)
        for label, accounts in cases:
            record, costs = _record(accounts)
            print(
                f"\n{count:,} accounts, {label}: checkpoint record {len(record):,} bytes "
                f"({-(-len(record) // CHUNK_BYTES)} chunks)"
            )
            print(
                "  ledger (for scale): "
                + ", ".join(f"{name} {seconds:.2f}" for name, seconds in costs.items())
            )
            stored, reloaded, size = _chunked(directory, record, arguments.repeat)
            print(f"  chunked store:       store {stored:.3f}  reload {reloaded:.3f}  log {size:,}")
            if len(record) > OLD_VALUE_LIMIT:
                print(f"  one record (v2):     refused, above {OLD_VALUE_LIMIT:,} bytes")
                continue
            stored, reloaded = _single(directory, record, arguments.repeat)
            print(f"  one record (v2):     store {stored:.3f}  reload {reloaded:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
