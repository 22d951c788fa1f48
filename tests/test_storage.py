"""runtime.storage: the durable record store behind the core's Persist actions.

The rule under test: what `apply` accepted is on disk (fsynced) before it returns, a
crash mid-write loses at most the unfinished batch (never part of one), and any other
damage makes `open` refuse with the file, the offset and the problem.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbft.codec import MAX_LOCAL_RECORD_BYTES
from runtime.storage import (
    CHUNK_BYTES,
    MAX_KEY_PART_BYTES,
    MAX_KEY_PARTS,
    MAX_RECORD_BYTES,
    MAX_VALUE_BYTES,
    DurableStore,
    StorageCorruptError,
    StorageError,
    StorageFailedError,
    StorageLockedError,
)

Key = tuple[str | int, ...]
Batch = list[tuple[Key, bytes | None]]

# --- the documented format, written out independently of the module -----------------------

DOC_FIXED = b"\x89PBFTKV\n" + struct.pack(">I", 3)
DOC_HEADER_SIZE = 32
PUT, DELETE, COMMIT, PART = 1, 2, 3, 4


def doc_header(batches: int, committed_end: int, version: int = 3) -> bytes:
    fixed = b"\x89PBFTKV\n" + struct.pack(">I", version)
    counters = struct.pack(">QQ", batches, committed_end)
    return fixed + counters + struct.pack(">I", zlib.crc32(fixed + counters))


def doc_record(op: int, key: list[object], value: bytes | None, chain: int) -> tuple[bytes, int]:
    payload = msgpack.packb([op, key, value], use_bin_type=True)
    checksum = zlib.crc32(payload, chain)
    return struct.pack(">II", len(payload), checksum) + payload, checksum


def doc_log(batches: list[Batch], chunk: int = CHUNK_BYTES, version: int = 3) -> bytes:
    """The bytes the documentation says a fresh store holds after applying `batches`
    (writing values longer than `chunk` as PARTs of `chunk` bytes and a PUT of the rest)."""
    out = bytearray(bytes(DOC_HEADER_SIZE))
    chain = zlib.crc32(b"\x89PBFTKV\n" + struct.pack(">I", version))
    for batch in batches:
        for key, value in batch:
            if value is None:
                record, chain = doc_record(DELETE, list(key), None, chain)
                out += record
                continue
            start = 0
            while len(value) - start > chunk:
                record, chain = doc_record(PART, list(key), value[start : start + chunk], chain)
                out += record
                start += chunk
            record, chain = doc_record(PUT, list(key), value[start:], chain)
            out += record
        record, chain = doc_record(COMMIT, [len(batch)], None, chain)
        out += record
    out[:DOC_HEADER_SIZE] = doc_header(len(batches), len(out), version)
    return bytes(out)


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(offset, end) of every complete record, by the length fields alone."""
    spans = []
    position = DOC_HEADER_SIZE
    while position + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        end = position + 8 + length
        if end > len(data):
            break
        spans.append((position, end))
        position = end
    return spans


# --- helpers --------------------------------------------------------------------------------

BATCHES: list[Batch] = [
    [(("view",), b"\x00\x01"), (("vote", "prepare", 0, 1), b"p01"), (("checkpoint",), b"c0")],
    [(("vote", "commit", 0, 1), b"c01"), (("view",), b"\x00\x02")],
    [(("prepared", 1), b"cert-1"), (("vote", "prepare", 0, 1), None)],
    [(("committed", 1), b"entry-1"), (("vote", "commit", 0, 1), None), (("view",), b"\x01")],
]


def build(
    path: Path, batches: list[Batch], chunk_bytes: int = CHUNK_BYTES
) -> tuple[list[int], list[dict[Key, bytes]]]:
    """Apply the batches; the file size and the state before and after each batch."""
    with DurableStore.open(path, chunk_bytes=chunk_bytes) as store:
        sizes = [path.stat().st_size]
        states: list[dict[Key, bytes]] = [{}]
        for batch in batches:
            store.apply(batch)
            sizes.append(path.stat().st_size)
            states.append(store.records())
    return sizes, states


def model_after(batches: list[Batch]) -> dict[Key, bytes]:
    state: dict[Key, bytes] = {}
    for batch in batches:
        for key, value in batch:
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
    return state


def reopen(path: Path) -> tuple[dict[Key, bytes], DurableStore]:
    store = DurableStore.open(path)
    records = store.records()
    store.close()
    return records, store


def repaired_to(data: bytes, sizes: list[int], batches: int) -> bytes:
    """The log cut back to its first `batches` batches, the header counting them."""
    return doc_header(batches, sizes[batches]) + data[DOC_HEADER_SIZE : sizes[batches]]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "replica.log"


# --- round trip and the format ----------------------------------------------------------------


def test_puts_overwrites_and_deletes_survive_reopen(log: Path) -> None:
    build(log, BATCHES)
    records, store = reopen(log)
    assert records == model_after(BATCHES)
    assert records == {
        ("view",): b"\x01",
        ("checkpoint",): b"c0",
        ("prepared", 1): b"cert-1",
        ("committed", 1): b"entry-1",
    }
    assert store.recovery_report.clean
    assert store.recovery_report.batches_replayed == len(BATCHES)
    assert store.recovery_report.records_replayed == sum(len(batch) for batch in BATCHES)
    # Appending after a reopen continues the checksum chain.
    with DurableStore.open(log) as again:
        again.apply([(("view",), b"\x02")])
    assert reopen(log)[0][("view",)] == b"\x02"


def test_log_bytes_are_exactly_the_documented_format(log: Path) -> None:
    build(log, BATCHES)
    assert log.read_bytes() == doc_log(BATCHES)


def test_new_store_is_the_header_alone(log: Path) -> None:
    with DurableStore.open(log) as store:
        assert store.records() == {}
        assert store.recovery_report.created
    assert log.read_bytes() == doc_header(0, DOC_HEADER_SIZE)


def test_get_returns_the_value_or_none(log: Path) -> None:
    with DurableStore.open(log) as store:
        store.apply([(("view",), b"v")])
        assert store.get(("view",)) == b"v"
        assert store.get(("checkpoint",)) is None


def test_records_returns_a_copy(log: Path) -> None:
    with DurableStore.open(log) as store:
        store.apply([(("view",), b"v")])
        copy = store.records()
        copy[("view",)] = b"changed"
        assert store.get(("view",)) == b"v"


def test_edge_keys_and_values_round_trip(log: Path) -> None:
    batch: Batch = [
        ((0,), b""),
        ((2**64 - 1,), b"max"),
        (("x" * MAX_KEY_PART_BYTES,), b"long"),
        (tuple(range(MAX_KEY_PARTS)), b"parts"),
        (("ünïcode", 5), b"\x00" * 1000),
    ]
    with DurableStore.open(log) as store:
        store.apply(batch)
    assert reopen(log)[0] == dict(batch)


# --- group commit -------------------------------------------------------------------------------


def test_apply_is_one_fsync_after_the_write_and_before_the_state_changes(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DurableStore.open(log)
    seen: list[tuple[int, bytes | None]] = []
    real_fsync = os.fsync

    def counting_fsync(descriptor: int) -> None:
        # At fsync time the whole batch must be in the file and not yet in memory.
        seen.append((os.fstat(descriptor).st_size, store.get(("view",))))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    for index, batch in enumerate(BATCHES):
        before = store.get(("view",))
        seen.clear()
        store.apply(batch)
        assert len(seen) == 1, f"batch {index}: {len(seen)} fsyncs"
        size_at_fsync, view_at_fsync = seen[0]
        assert size_at_fsync == log.stat().st_size == len(doc_log(BATCHES[: index + 1]))
        assert view_at_fsync == before
    store.close()


def test_empty_batch_writes_and_fsyncs_nothing(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with DurableStore.open(log) as store:
        calls: list[int] = []
        monkeypatch.setattr(os, "fsync", calls.append)
        store.apply([])
        assert calls == []
    assert log.read_bytes() == doc_header(0, DOC_HEADER_SIZE)


def test_failed_fsync_poisons_the_store(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DurableStore.open(log)
    store.apply([(("view",), b"1")])

    def failing_fsync(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(StorageFailedError, match="fsync failed"):
            store.apply([(("view",), b"2")])
    assert store.get(("view",)) == b"1"  # memory never runs ahead of the disk
    with pytest.raises(StorageFailedError, match="reopen"):
        store.apply([(("view",), b"3")])
    with pytest.raises(StorageFailedError):
        store.compact()
    store.close()


# --- torn tails ---------------------------------------------------------------------------------


def test_every_cut_inside_the_last_batch_recovers_the_earlier_batches(log: Path) -> None:
    sizes, states = build(log, BATCHES)
    data = log.read_bytes()
    boundary = sizes[-2]
    assert sum(offset >= boundary for offset, _ in record_spans(data)) >= 3  # records to cut into
    for cut in range(boundary + 1, len(data)):
        log.write_bytes(data[:cut])
        with DurableStore.open(log) as store:
            assert store.records() == states[-2], f"cut at {cut}"
            torn = store.recovery_report.torn_tail
            assert torn is not None, f"cut at {cut}"
            assert torn.offset == boundary
            assert torn.bytes_discarded == cut - boundary
        assert log.stat().st_size == boundary, f"cut at {cut}: file not truncated"
        with DurableStore.open(log) as store:
            assert store.recovery_report.clean, f"cut at {cut}: second open not clean"
    # Cut exactly at the boundary, the whole last batch is gone: still the one batch a
    # crash can lose (its data did not land, its counter did), so repaired and reported.
    log.write_bytes(data[:boundary])
    with DurableStore.open(log) as store:
        assert store.records() == states[-2]
        torn = store.recovery_report.torn_tail
        assert torn is not None and "missing" in torn.reason
        assert store.recovery_report.repaired
    assert log.read_bytes() == repaired_to(data, sizes, len(sizes) - 2)


def test_torn_tail_report_names_offset_and_records_discarded(
    log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sizes, states = build(log, BATCHES)
    data = log.read_bytes()
    commit_offset = record_spans(data)[-1][0]
    log.write_bytes(data[:commit_offset])  # every record of the last batch but its COMMIT
    with caplog.at_level(logging.WARNING, logger="runtime.storage"):
        with DurableStore.open(log) as store:
            torn = store.recovery_report.torn_tail
            assert store.records() == states[-2]
    assert torn is not None
    assert torn.offset == sizes[-2]
    assert torn.bad_record_offset is None
    assert torn.records_discarded == len(BATCHES[-1])
    assert "COMMIT" in torn.reason
    assert f"at byte {sizes[-2]}" in caplog.text


def test_short_payload_report_names_the_bad_record(log: Path) -> None:
    sizes, states = build(log, BATCHES)
    data = log.read_bytes()
    last_offset, last_end = record_spans(data)[-1]
    log.write_bytes(data[: last_end - 1])
    with DurableStore.open(log) as store:
        torn = store.recovery_report.torn_tail
    assert torn is not None
    assert torn.bad_record_offset == last_offset
    assert "short payload" in torn.reason
    assert torn.records_discarded == len(BATCHES[-1])


@pytest.mark.parametrize("where", ["payload", "checksum"])
def test_bad_checksum_on_the_final_record_is_a_torn_tail(log: Path, where: str) -> None:
    sizes, states = build(log, BATCHES)
    offset, end = record_spans(log.read_bytes())[-1]
    flip(log, end - 1 if where == "payload" else offset + 5)
    with DurableStore.open(log) as store:
        assert store.records() == states[-2]
        torn = store.recovery_report.torn_tail
        assert torn is not None and torn.bad_record_offset == offset
        assert "checksum" in torn.reason
    assert log.stat().st_size == sizes[-2]


@pytest.mark.parametrize("landed", ["nothing", "part of the first record", "all but the end"])
def test_zero_filled_tail_is_a_torn_tail(log: Path, landed: str) -> None:
    # The file grew but only part of the last batch's data landed; the rest reads as zeros.
    sizes, states = build(log, BATCHES)
    data = log.read_bytes()
    first_record_end = next(end for offset, end in record_spans(data) if offset == sizes[-2])
    kept = {
        "nothing": sizes[-2],
        "part of the first record": sizes[-2] + 10,
        "all but the end": len(data) - 3,
    }[landed]
    assert sizes[-2] + 10 < first_record_end
    log.write_bytes(data[:kept] + bytes(len(data) - kept) + bytes(4096))
    with DurableStore.open(log) as store:
        assert store.records() == states[-2]
        torn = store.recovery_report.torn_tail
        assert torn is not None and "all zero" in torn.reason
    assert log.read_bytes() == repaired_to(data, sizes, len(sizes) - 2)


def test_zero_bytes_after_a_bad_record_in_the_middle_do_not_hide_later_data(log: Path) -> None:
    build(log, BATCHES)
    data = bytearray(log.read_bytes())
    offset, end = record_spans(bytes(data))[1]
    data[end - 4 : end + 20] = bytes(24)  # zeros inside the log, valid records after them
    log.write_bytes(bytes(data))
    with pytest.raises(StorageCorruptError) as caught:
        DurableStore.open(log)
    assert caught.value.offset == offset


# --- corruption ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["length", "checksum", "payload"])
def test_flipped_byte_in_an_early_record_is_corruption_naming_file_and_offset(
    log: Path, where: str
) -> None:
    build(log, BATCHES)
    offset, end = record_spans(log.read_bytes())[1]
    flip(log, {"length": offset + 3, "checksum": offset + 6, "payload": end - 1}[where])
    damaged = log.read_bytes()
    with pytest.raises(StorageCorruptError) as caught:
        DurableStore.open(log)
    assert caught.value.offset == offset
    assert str(log) in str(caught.value)
    assert f"byte {offset}" in str(caught.value)
    assert log.read_bytes() == damaged, "a corrupt log must not be truncated"


def test_length_pointing_past_the_end_in_the_middle_is_corruption(log: Path) -> None:
    # It looks like a short final payload, but valid records follow the damaged header.
    build(log, BATCHES)
    data = bytearray(log.read_bytes())
    offset, _ = record_spans(bytes(data))[1]
    struct.pack_into(">I", data, offset, len(data) - offset)
    log.write_bytes(bytes(data))
    with pytest.raises(StorageCorruptError, match="valid record follows") as caught:
        DurableStore.open(log)
    assert caught.value.offset == offset


def test_record_length_above_the_limit_is_corruption_even_at_the_end(log: Path) -> None:
    build(log, BATCHES)
    size = log.stat().st_size
    with log.open("ab") as out:
        out.write(struct.pack(">II", MAX_RECORD_BYTES + 1, 0))
    with pytest.raises(StorageCorruptError, match="exceeds") as caught:
        DurableStore.open(log)
    assert caught.value.offset == size


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "header is 0 bytes"),
        (DOC_FIXED[:5], "header is 5 bytes"),
        (b"SQLite format 3\x00" + bytes(16), "bad magic"),
        (b"\x89PBFTKV\n" + struct.pack(">I", 1) + bytes(20), "unsupported format version 1"),
    ],
)
def test_bad_header_is_corruption(log: Path, content: bytes, problem: str) -> None:
    log.write_bytes(content)
    with pytest.raises(StorageCorruptError, match=problem) as caught:
        DurableStore.open(log)
    assert str(log) in str(caught.value)
    assert log.read_bytes() == content


def test_a_record_copied_to_the_end_is_discarded_as_a_torn_write(log: Path) -> None:
    # Decided: a final record with a bad chained checksum is indistinguishable from a
    # torn write, so it is discarded, not applied.
    sizes, states = build(log, BATCHES)
    data = log.read_bytes()
    offset, end = record_spans(data)[0]
    log.write_bytes(data + data[offset:end])
    with DurableStore.open(log) as store:
        assert store.records() == states[-1]
        torn = store.recovery_report.torn_tail
        assert torn is not None and torn.bad_record_offset == len(data)
    assert log.read_bytes() == data


def test_an_earlier_batch_replayed_at_the_end_is_corruption_not_a_rollback(log: Path) -> None:
    # Each record checks out on its own (its unchained CRC is fine); only the chain shows
    # that it does not belong here. Accepting it would roll ("view",) back to b"\x00\x01".
    sizes, states = build(log, BATCHES)
    data = log.read_bytes()
    first_batch = data[sizes[0] : sizes[1]]
    offset, end = record_spans(data)[0]
    (stored,) = struct.unpack_from(">I", data, offset + 4)
    assert stored == zlib.crc32(data[offset + 8 : end], zlib.crc32(DOC_FIXED))
    log.write_bytes(data + first_batch)
    with pytest.raises(StorageCorruptError, match="checksum mismatch") as caught:
        DurableStore.open(log)
    assert caught.value.offset == len(data)


def test_a_record_duplicated_in_the_middle_is_corruption(log: Path) -> None:
    build(log, BATCHES)
    data = log.read_bytes()
    offset, end = record_spans(data)[0]
    log.write_bytes(data[:end] + data[offset:end] + data[end:])
    with pytest.raises(StorageCorruptError) as caught:
        DurableStore.open(log)
    assert caught.value.offset == end


def test_records_swapped_in_the_middle_are_corruption(log: Path) -> None:
    build(log, BATCHES)
    data = log.read_bytes()
    (a, a_end), (b, b_end) = record_spans(data)[:2]
    log.write_bytes(data[:a] + data[b:b_end] + data[a:a_end] + data[b_end:])
    with pytest.raises(StorageCorruptError) as caught:
        DurableStore.open(log)
    assert caught.value.offset == a


def test_commit_count_not_matching_its_batch_is_corruption(log: Path) -> None:
    chain = zlib.crc32(DOC_FIXED)
    put_a, chain = doc_record(PUT, ["a"], b"1", chain)
    put_b, chain = doc_record(PUT, ["b"], b"2", chain)
    commit, chain = doc_record(COMMIT, [1], None, chain)
    log.write_bytes(
        doc_header(1, DOC_HEADER_SIZE + len(put_a + put_b + commit)) + put_a + put_b + commit
    )
    with pytest.raises(StorageCorruptError, match="COMMIT counts 1 records") as caught:
        DurableStore.open(log)
    assert caught.value.offset == DOC_HEADER_SIZE + len(put_a) + len(put_b)


@pytest.mark.parametrize(
    ("op", "key", "value"),
    [
        (9, ["a"], b"1"),
        (PUT, ["a"], None),
        (DELETE, ["a"], b"1"),
        (PUT, [True], b"1"),
        (PUT, [-1], b"1"),
        (PUT, [], b"1"),
        (PUT, [1.5], b"1"),
        (PUT, ["a"], "text, not bin"),
    ],
)
def test_checksum_valid_but_malformed_record_is_corruption_even_at_the_end(
    log: Path, op: int, key: list[object], value: object
) -> None:
    # A valid checksum means the bytes are what was written: no torn write explains it.
    chain = zlib.crc32(DOC_FIXED)
    good, chain = doc_record(PUT, ["ok"], b"1", chain)
    commit, chain = doc_record(COMMIT, [1], None, chain)
    bad, _ = doc_record(op, key, value, chain)  # type: ignore[arg-type]
    log.write_bytes(doc_header(1, DOC_HEADER_SIZE + len(good + commit)) + good + commit + bad)
    with pytest.raises(StorageCorruptError, match="malformed") as caught:
        DurableStore.open(log)
    assert caught.value.offset == DOC_HEADER_SIZE + len(good) + len(commit)


# --- compaction ---------------------------------------------------------------------------------


def churn(store: DurableStore, rounds: int, value_size: int = 1000) -> None:
    for index in range(rounds):
        store.apply(
            [
                (("vote", "prepare", 0, index % 5), bytes([index % 256]) * value_size),
                (("view",), index.to_bytes(4, "big")),
                (("vote", "commit", 0, index), b"c"),
                (("vote", "commit", 0, index), None),
            ]
        )


def test_compaction_keeps_the_state_and_shrinks_the_file(log: Path) -> None:
    with DurableStore.open(log) as store:
        churn(store, 200)
        before = store.records()
        size_before = log.stat().st_size
        store.compact()
        assert store.records() == before
        assert log.stat().st_size == store.live_size() < size_before / 10
        assert store.statistics().compactions == 1
        store.apply([(("view",), b"after")])  # appends continue the new file's chain
    records, reopened = reopen(log)
    assert records == {**before, ("view",): b"after"}
    assert reopened.recovery_report.clean


def test_log_compacts_itself_when_garbage_dominates(log: Path) -> None:
    with DurableStore.open(log) as store:
        for index in range(100):  # 100 overwrites of 64 KiB: 6.4 MiB written, 64 KiB live
            store.apply([(("checkpoint",), bytes([index]) * 65536), (("view",), b"v")])
            size = log.stat().st_size
            assert size <= max(4 * store.live_size(), 1024 * 1024) + 70_000
        assert store.statistics().compactions >= 3
        final = store.records()
    assert reopen(log)[0] == final


def test_crash_before_replace_leaves_the_old_log_usable(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DurableStore.open(log) as store:
        churn(store, 50)
        before = store.records()
        old_bytes = log.read_bytes()

        def crash(source: str, destination: str) -> None:
            raise OSError("simulated crash between the temp file and the replace")

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", crash)
            with pytest.raises(OSError, match="simulated crash"):
                store.compact()
        assert log.read_bytes() == old_bytes
        assert not Path(f"{log}.compact").exists()
        store.apply([(("view",), b"still writable")])
    records, reopened = reopen(log)
    assert records == {**before, ("view",): b"still writable"}
    assert reopened.recovery_report.clean


def test_failed_automatic_compaction_keeps_apply_working(
    log: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(source: str, destination: str) -> None:
        raise OSError("no space left")

    with caplog.at_level(logging.WARNING, logger="runtime.storage"):
        with DurableStore.open(log, compact_min_bytes=10_000) as store:
            monkeypatch.setattr(os, "replace", crash)
            churn(store, 40)
            final = store.records()
            assert store.statistics().compactions == 0
    assert "compaction failed" in caplog.text
    monkeypatch.undo()
    assert reopen(log)[0] == final


def test_temp_file_left_by_a_crash_mid_compaction_is_ignored_and_removed(log: Path) -> None:
    build(log, BATCHES)
    temp = Path(f"{log}.compact")
    temp.write_bytes(doc_log([[(("view",), b"from an unfinished compaction")]])[:-3])
    with DurableStore.open(log) as store:
        assert store.records() == model_after(BATCHES)
        assert store.recovery_report.removed_temp_file
    assert not temp.exists()


def test_compaction_fsyncs_the_new_file_before_replace_and_the_directory_after(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DurableStore.open(log)
    churn(store, 20)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor: int) -> None:
        mode = os.fstat(descriptor).st_mode
        events.append("fsync directory" if stat.S_ISDIR(mode) else "fsync file")
        real_fsync(descriptor)

    def recording_replace(source: str, destination: str) -> None:
        assert Path(source).read_bytes()[:12] == DOC_FIXED
        events.append("replace")
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    store.compact()
    store.close()
    assert events == ["fsync file", "replace", "fsync directory"]


# --- limits and validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (["view"], b"v", TypeError),
        ((), b"v", ValueError),
        (tuple(range(MAX_KEY_PARTS + 1)), b"v", ValueError),
        (("x" * (MAX_KEY_PART_BYTES + 1),), b"v", ValueError),
        (("\ud800",), b"v", ValueError),
        ((True,), b"v", TypeError),
        ((-1,), b"v", ValueError),
        ((2**64,), b"v", ValueError),
        ((1.5,), b"v", TypeError),
        ((b"bytes",), b"v", TypeError),
        (("view",), "text", TypeError),
        (("view",), bytearray(b"v"), TypeError),
    ],
)
def test_invalid_keys_and_values_are_refused_before_anything_is_written(
    log: Path, monkeypatch: pytest.MonkeyPatch, key: object, value: object, error: type
) -> None:
    with DurableStore.open(log) as store:
        store.apply([(("view",), b"old")])
        size = log.stat().st_size
        calls: list[int] = []
        monkeypatch.setattr(os, "fsync", calls.append)
        with pytest.raises(error):
            store.apply([(("view",), b"new"), (key, value)])  # type: ignore[list-item]
        assert calls == []
        assert log.stat().st_size == size
        assert store.get(("view",)) == b"old"


def test_a_value_above_the_limit_is_refused_before_anything_is_written(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit (1 GiB) is too much memory for a test; the check is the same.
    monkeypatch.setattr("runtime.storage.MAX_VALUE_BYTES", 1000)
    with DurableStore.open(log, chunk_bytes=64) as store:
        store.apply([(("checkpoint",), b"\x01" * 1000)])
        size = log.stat().st_size
        with pytest.raises(ValueError, match="1001 bytes exceeds 1000"):
            store.apply([(("view",), b"new"), (("checkpoint",), b"\x02" * 1001)])
        assert log.stat().st_size == size
    assert reopen(log)[0] == {("checkpoint",): b"\x01" * 1000}


def test_the_store_takes_the_largest_record_the_replica_writes() -> None:
    assert MAX_VALUE_BYTES >= MAX_LOCAL_RECORD_BYTES
    assert MAX_RECORD_BYTES < CHUNK_BYTES + 16 * 1024  # a record is a chunk and its key


def test_a_value_above_the_old_single_record_limit_round_trips(log: Path) -> None:
    """Real size: 72 MiB, past the 64 MiB a version 2 record could hold (issue 8, point 7)."""
    value = bytes(range(256)) * (72 * 4096)
    with DurableStore.open(log) as store:
        store.apply([(("checkpoint",), value), (("view",), b"v")])
    records, store = reopen(log)
    assert records == {("checkpoint",): value, ("view",): b"v"}
    assert store.recovery_report.clean
    data = log.read_bytes()
    assert data == doc_log([[(("checkpoint",), value), (("view",), b"v")]])
    assert len(record_spans(data)) == 18 + 1 + 1  # 17 PARTs of 4 MiB and a PUT; PUT; COMMIT


# --- lifecycle ----------------------------------------------------------------------------------


def test_second_open_is_refused_while_the_store_is_open(log: Path) -> None:
    with DurableStore.open(log):
        with pytest.raises(StorageLockedError, match="already open"):
            DurableStore.open(log)
    with DurableStore.open(log):  # released on close
        pass


def test_closed_store_refuses_calls(log: Path) -> None:
    with DurableStore.open(log) as store:
        store.apply([(("view",), b"v")])
    for call in (
        lambda: store.apply([(("view",), b"w")]),
        lambda: store.get(("view",)),
        store.records,
        store.compact,
    ):
        with pytest.raises(StorageError, match="closed"):
            call()
    store.close()  # idempotent


def test_statistics_count_records_bytes_fsyncs_and_compactions(log: Path) -> None:
    with DurableStore.open(log) as store:
        opened = store.statistics()
        for batch in BATCHES:
            store.apply(batch)
        stats = store.statistics()
        assert stats.records_written == sum(len(batch) for batch in BATCHES)
        assert stats.bytes_written - opened.bytes_written == len(doc_log(BATCHES)) - DOC_HEADER_SIZE
        assert stats.fsyncs - opened.fsyncs == len(BATCHES)
        assert stats.compactions == 0
        assert stats.live_keys == len(model_after(BATCHES))
        assert stats.file_size_bytes == log.stat().st_size
        store.compact()
        after = store.statistics()
        assert after.compactions == 1
        assert after.fsyncs == stats.fsyncs + 2  # the new file and the directory
        assert after.file_size_bytes == log.stat().st_size == store.live_size()
        assert after.bytes_written == stats.bytes_written + after.file_size_bytes


# --- properties ---------------------------------------------------------------------------------

keys = st.one_of(
    st.just(("view",)),
    st.just(("checkpoint",)),
    st.tuples(st.just("prepared"), st.integers(0, 4)),
    st.tuples(
        st.just("vote"), st.sampled_from(["prepare", "commit"]), st.just(0), st.integers(0, 4)
    ),
)
values = st.one_of(st.none(), st.binary(max_size=24))
# Small chunk sizes turn most values into several PART records.
chunk_sizes = st.sampled_from([CHUNK_BYTES, 1, 5])
batches_strategy = st.lists(st.lists(st.tuples(keys, values), max_size=5), max_size=8)

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def fast_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    # The properties are about what is in the file, not about the disk: skip the flush.
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)


@PROPERTY_SETTINGS
@given(batches=batches_strategy, chunk_bytes=chunk_sizes)
def test_random_batches_read_back_like_a_dict_model(
    fast_fsync: None, batches: list[Batch], chunk_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "replica.log"
        with DurableStore.open(log, chunk_bytes=chunk_bytes) as store:
            for batch in batches:
                store.apply(batch)
            assert store.records() == model_after(batches)
        records, reopened = reopen(log)
        assert records == model_after(batches)
        assert reopened.recovery_report.clean


@PROPERTY_SETTINGS
@given(batches=batches_strategy, data=st.data(), chunk_bytes=chunk_sizes)
def test_any_truncation_recovers_exactly_a_prefix_of_whole_batches(
    fast_fsync: None, batches: list[Batch], data: st.DataObject, chunk_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "replica.log"
        sizes, states = build(log, batches, chunk_bytes)
        content = log.read_bytes()
        cut = data.draw(st.integers(DOC_HEADER_SIZE, len(content)), label="cut")
        log.write_bytes(content[:cut])
        # An empty batch writes nothing: the distinct sizes are the batch boundaries.
        boundaries = sorted(set(sizes))
        if len(boundaries) >= 2 and cut < boundaries[-2]:
            # More than the last batch is gone: refused, never a shorter history.
            with pytest.raises(StorageCorruptError, match="batches are missing"):
                reopen(log)
            return
        kept = max(index for index, size in enumerate(sizes) if size <= cut)
        records, store = reopen(log)
        assert records == states[kept]  # all of a batch or none of it
        assert log.stat().st_size == sizes[kept]
        assert store.recovery_report.repaired == (cut != len(content))


@PROPERTY_SETTINGS
@given(batches=batches_strategy.filter(lambda b: any(b)), data=st.data(), chunk_bytes=chunk_sizes)
def test_a_flipped_byte_gives_an_error_or_a_prefix_never_other_state(
    fast_fsync: None, batches: list[Batch], data: st.DataObject, chunk_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "replica.log"
        sizes, states = build(log, batches, chunk_bytes)
        content = bytearray(log.read_bytes())
        offset = data.draw(st.integers(0, len(content) - 1), label="offset")
        content[offset] ^= data.draw(st.integers(1, 255), label="mask")
        log.write_bytes(bytes(content))
        last_batch_start = max(size for size in sizes if size < len(content))
        try:
            records, _ = reopen(log)
        except StorageCorruptError:
            return
        # Only damage inside the last batch may be taken for a torn write.
        assert offset >= last_batch_start
        assert records == states[sizes.index(last_batch_start)]


# --- only the last batch may be lost (issue 8, point 6) -------------------------------------

TEN_BATCHES: list[Batch] = [
    [(("vote", "prepare", 0, index), b"p%d" % index), (("view",), b"%d" % index)]
    for index in range(1, 11)
]


def test_a_log_cut_at_an_earlier_batch_boundary_is_refused_naming_file_and_offset(
    log: Path,
) -> None:
    # Cut at the end of batch 4 of 10: a valid, shorter log by its checksums alone. Six
    # fsynced batches of votes are gone; no crash does that.
    sizes, _ = build(log, TEN_BATCHES)
    log.write_bytes(log.read_bytes()[: sizes[4]])
    with pytest.raises(StorageCorruptError, match="6 batches are missing") as caught:
        DurableStore.open(log)
    assert caught.value.offset == sizes[4]
    assert caught.value.path == str(log)
    assert "counts 10 committed batches" in str(caught.value)


def test_a_log_cut_inside_an_earlier_batch_is_refused(log: Path) -> None:
    sizes, _ = build(log, TEN_BATCHES)
    log.write_bytes(log.read_bytes()[: sizes[4] + 5])
    with pytest.raises(StorageCorruptError, match="6 batches are missing") as caught:
        DurableStore.open(log)
    assert caught.value.offset == sizes[4]


def test_zeros_over_several_last_batches_are_refused_not_taken_for_a_torn_tail(
    log: Path,
) -> None:
    # Batches 8 to 10 read as zeros: before the counter this was "an ordinary torn tail".
    sizes, _ = build(log, TEN_BATCHES)
    data = log.read_bytes()
    log.write_bytes(data[: sizes[7]] + bytes(len(data) - sizes[7]))
    with pytest.raises(StorageCorruptError, match="3 batches are missing") as caught:
        DurableStore.open(log)
    assert caught.value.offset == sizes[7]
    assert log.read_bytes()[sizes[7] :] == bytes(len(data) - sizes[7])  # nothing repaired


def test_a_torn_last_batch_is_repaired_and_reported(log: Path) -> None:
    sizes, states = build(log, TEN_BATCHES)
    data = log.read_bytes()
    log.write_bytes(data[: sizes[9] + 7] + bytes(len(data) - sizes[9] - 7))
    with DurableStore.open(log) as store:
        report = store.recovery_report
        assert report.repaired and not report.clean
        assert report.torn_tail is not None and report.torn_tail.offset == sizes[9]
        assert store.records() == states[9]
    assert log.read_bytes() == repaired_to(data, sizes, 9)
    with DurableStore.open(log) as store:
        assert store.recovery_report.clean and not store.recovery_report.repaired


def test_a_last_batch_whose_counter_update_did_not_land_is_kept(log: Path) -> None:
    # The crash hit between the append and the fsync, and only the append reached the disk.
    sizes, states = build(log, TEN_BATCHES)
    data = log.read_bytes()
    log.write_bytes(doc_header(9, sizes[9]) + data[DOC_HEADER_SIZE:])
    with DurableStore.open(log) as store:
        report = store.recovery_report
        assert store.records() == states[10]
        assert report.header_rewritten and not report.repaired and not report.clean
    assert log.read_bytes() == data


def test_a_counter_two_batches_behind_is_refused(log: Path) -> None:
    sizes, _ = build(log, TEN_BATCHES)
    data = log.read_bytes()
    log.write_bytes(doc_header(8, sizes[8]) + data[DOC_HEADER_SIZE:])
    with pytest.raises(StorageCorruptError, match="more than the one batch"):
        DurableStore.open(log)


def test_data_past_the_counted_end_is_refused(log: Path) -> None:
    # The counter says the lost batch ended at L; records beyond it are not a torn write.
    sizes, _ = build(log, TEN_BATCHES)
    data = log.read_bytes()
    log.write_bytes(data[: sizes[9]] + bytes(len(data) - sizes[9]) + b"\x01")
    with pytest.raises(StorageCorruptError):
        DurableStore.open(log)


def test_a_damaged_counter_is_refused(log: Path) -> None:
    build(log, TEN_BATCHES)
    flip(log, 19)
    with pytest.raises(StorageCorruptError, match="counter fails its checksum") as caught:
        DurableStore.open(log)
    assert caught.value.offset == 12


def test_compaction_resets_the_counter_to_one_batch(log: Path) -> None:
    build(log, TEN_BATCHES)
    with DurableStore.open(log) as store:
        store.compact()
        store.apply([(("view",), b"after")])
        size = log.stat().st_size
    assert log.read_bytes()[:DOC_HEADER_SIZE] == doc_header(2, size)
    with DurableStore.open(log) as store:
        assert store.recovery_report.clean


# --- permissions -----------------------------------------------------------------------------


def test_log_lock_and_compaction_files_are_private(log: Path) -> None:
    with DurableStore.open(log) as store:
        store.apply([(("view",), b"1")])
        store.compact()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(str(log) + ".lock").stat().st_mode) == 0o600


def test_an_existing_log_readable_by_others_is_made_private_with_a_warning(
    log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build(log, BATCHES)
    log.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="runtime.storage"):
        DurableStore.open(log).close()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "readable by others" in caplog.text


# --- large values in chunks (issue 8, point 7) --------------------------------------------------

CHUNK = 64
OLD_VALUE = bytes(range(7, 7 + 150))  # 3 records at CHUNK
NEW_VALUE = bytes(range(256)) * 2  # 512 bytes: 8 records, the last one full
CHUNKED_BATCHES: list[Batch] = [
    [(("checkpoint",), OLD_VALUE), (("view",), b"\x00")],
    [(("vote", "prepare", 0, 1), b"p1"), (("checkpoint",), NEW_VALUE), (("view",), b"\x01")],
]


def test_a_value_longer_than_a_chunk_is_parts_then_a_put_exactly_as_documented(log: Path) -> None:
    build(log, CHUNKED_BATCHES, chunk_bytes=CHUNK)
    data = log.read_bytes()
    assert data == doc_log(CHUNKED_BATCHES, chunk=CHUNK)
    ops = [msgpack.unpackb(data[start + 8 : end])[0] for start, end in record_spans(data)]
    assert ops == [PART, PART, PUT, PUT, COMMIT, PUT, *[PART] * 7, PUT, PUT, COMMIT]
    records, store = reopen(log)
    assert records == model_after(CHUNKED_BATCHES)
    assert store.recovery_report.clean


@pytest.mark.parametrize("counter_landed", [True, False])
def test_a_chunked_value_cut_anywhere_gives_the_old_or_the_new_state_never_part_of_it(
    log: Path, counter_landed: bool
) -> None:
    """A crash while the batch holding a value of 8 chunks is written: the file cut at every
    record boundary of that batch and in the middle of every record, with the header's
    counter updated (it shares the batch's fsync, so it may land first) or not."""
    sizes, states = build(log, CHUNKED_BATCHES, chunk_bytes=CHUNK)
    content = log.read_bytes()
    if not counter_landed:
        content = doc_header(1, sizes[1]) + content[DOC_HEADER_SIZE:]
    last_batch = [(start, end) for start, end in record_spans(content) if start >= sizes[1]]
    assert len(last_batch) == 1 + 8 + 1 + 1
    cuts = sorted(
        {start for start, _ in last_batch}
        | {(start + end) // 2 for start, end in last_batch}
        | {start + 3 for start, _ in last_batch}  # inside a record header
    )
    for cut in cuts:
        log.write_bytes(content[:cut])
        records, store = reopen(log)
        report = store.recovery_report
        assert records == states[1], cut  # the whole previous value, not a prefix of the new
        assert log.read_bytes() == repaired_to(content, sizes, 1)
        if cut == sizes[1] and not counter_landed:
            assert report.clean  # nothing of the batch was written: nothing to repair
            continue
        assert report.repaired and report.torn_tail is not None, cut
        assert report.torn_tail.offset == sizes[1]
        assert report.torn_tail.bytes_discarded == cut - sizes[1]
        discarded = sum(1 for _, end in last_batch if end <= cut)
        assert report.torn_tail.records_discarded == discarded, cut
    log.write_bytes(content)
    records, store = reopen(log)
    assert records == states[2]  # the whole file: all of the new value
    assert store.recovery_report.header_rewritten == (not counter_landed)
    assert not store.recovery_report.repaired


def test_a_chunked_value_zeroed_from_a_chunk_on_is_a_torn_tail(log: Path) -> None:
    sizes, states = build(log, CHUNKED_BATCHES, chunk_bytes=CHUNK)
    content = log.read_bytes()
    spans = [span for span in record_spans(content) if span[0] >= sizes[1]]
    start = spans[4][0]  # the 4th PART of the new value and everything after it
    log.write_bytes(content[:start] + bytes(len(content) - start))
    records, store = reopen(log)
    assert records == states[1]
    assert store.recovery_report.torn_tail is not None
    assert store.recovery_report.torn_tail.records_discarded == 4


def test_a_damaged_chunk_in_an_earlier_batch_is_corruption(log: Path) -> None:
    sizes, _ = build(log, CHUNKED_BATCHES, chunk_bytes=CHUNK)
    flip(log, DOC_HEADER_SIZE + 8 + 20)  # inside the first PART of the old value
    with pytest.raises(StorageCorruptError, match=f"corrupt at byte {DOC_HEADER_SIZE}:"):
        DurableStore.open(log)


def _hand_written(log: Path, records: list[tuple[int, list[object], bytes | None]]) -> None:
    """One batch of exactly these records (checksums valid), counted in the header."""
    out = bytearray(bytes(DOC_HEADER_SIZE))
    chain = zlib.crc32(DOC_FIXED)
    for op, key, value in records:
        record, chain = doc_record(op, key, value, chain)
        out += record
    out[:DOC_HEADER_SIZE] = doc_header(1, len(out))
    log.write_bytes(bytes(out))


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        (
            [(PART, ["checkpoint"], b"ab"), (PUT, ["view"], b"v"), (COMMIT, [1], None)],
            "PART records of key ('checkpoint',) are not followed by its PUT",
        ),
        (
            [(PART, ["checkpoint"], b"ab"), (PART, ["view"], b"v"), (COMMIT, [1], None)],
            "a PART of key ('view',) interrupts the value of ('checkpoint',)",
        ),
        (
            [(PART, ["checkpoint"], b"ab"), (DELETE, ["checkpoint"], None), (COMMIT, [1], None)],
            "not followed by its PUT",
        ),
        (
            [(PART, ["checkpoint"], b"ab"), (COMMIT, [0], None)],
            "not followed by its PUT",
        ),
        ([(PART, ["checkpoint"], b""), (PUT, ["checkpoint"], b"a")], "PART value"),
    ],
)
def test_parts_not_ending_in_their_keys_put_are_corruption_even_at_the_end(
    log: Path, records: list[tuple[int, list[object], bytes | None]], problem: str
) -> None:
    _hand_written(log, records)
    with pytest.raises(StorageCorruptError, match=re.escape(problem)):
        DurableStore.open(log)


def test_parts_left_open_at_the_end_of_the_file_are_a_torn_tail(log: Path) -> None:
    sizes, states = build(log, CHUNKED_BATCHES[:1], chunk_bytes=CHUNK)
    content = log.read_bytes()
    # Append, as a crash would leave them, the first two PARTs of the next batch.
    build_dir = log.parent / "full"
    build_dir.mkdir()
    full = build_dir / "replica.log"
    build(full, CHUNKED_BATCHES, chunk_bytes=CHUNK)
    spans = [span for span in record_spans(full.read_bytes()) if span[0] >= sizes[1]]
    cut = spans[2][1]  # the PUT of the vote and two PARTs
    log.write_bytes(content + full.read_bytes()[sizes[1] : cut])
    records, store = reopen(log)
    assert records == states[1]
    assert store.recovery_report.torn_tail is not None
    assert store.recovery_report.torn_tail.reason == "incomplete batch: 3 records without a COMMIT"


def test_a_log_written_with_one_chunk_size_reads_back_with_another(log: Path) -> None:
    build(log, CHUNKED_BATCHES, chunk_bytes=CHUNK)
    with DurableStore.open(log, chunk_bytes=100) as store:
        assert store.records() == model_after(CHUNKED_BATCHES)
        store.compact()  # rewritten in chunks of 100
        assert store.live_size() == log.stat().st_size
    assert log.read_bytes() == doc_log([list(model_after(CHUNKED_BATCHES).items())], chunk=100)


@pytest.mark.parametrize("chunk_bytes", [0, -1, CHUNK_BYTES + 1])
def test_a_chunk_size_out_of_range_is_refused(log: Path, chunk_bytes: int) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        DurableStore.open(log, chunk_bytes=chunk_bytes)
    assert not log.exists()


def test_compaction_writes_large_values_in_chunks_and_reads_them_back(log: Path) -> None:
    with DurableStore.open(log, chunk_bytes=CHUNK) as store:
        for batch in CHUNKED_BATCHES:
            store.apply(batch)
        store.compact()
        assert store.live_size() == log.stat().st_size
    assert log.read_bytes() == doc_log([list(model_after(CHUNKED_BATCHES).items())], chunk=CHUNK)
    records, store = reopen(log)
    assert records == model_after(CHUNKED_BATCHES) and store.recovery_report.clean


# --- format version 2 is migrated -----------------------------------------------------------------


def test_a_version_2_log_is_migrated_to_version_3_on_open(
    log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = b"\x5a" * (CHUNK_BYTES + 100)  # one record in version 2, two in version 3
    batches = [*BATCHES, [(("checkpoint",), big)]]
    log.write_bytes(doc_log(batches, chunk=2**40, version=2))
    with caplog.at_level(logging.WARNING, logger="runtime.storage"):
        records, store = reopen(log)
    assert records == model_after(batches)
    assert store.recovery_report.migrated_from_version == 2
    assert "migrated from format version 2 to 3" in caplog.text
    assert log.read_bytes() == doc_log([list(model_after(batches).items())])
    records, store = reopen(log)
    assert records == model_after(batches) and store.recovery_report.clean


def test_a_version_2_log_with_a_torn_tail_is_repaired_by_the_migration(log: Path) -> None:
    content = doc_log(BATCHES, version=2)
    log.write_bytes(content[:-5])  # the last batch's COMMIT torn; the counter counts it
    records, store = reopen(log)
    assert records == model_after(BATCHES[:-1])
    assert store.recovery_report.repaired and store.recovery_report.migrated_from_version == 2
    assert log.read_bytes() == doc_log([list(model_after(BATCHES[:-1]).items())])


def test_a_crash_during_migration_leaves_the_version_2_log(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = doc_log(BATCHES, version=2)
    log.write_bytes(content)

    def crash(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(StorageFailedError):
            DurableStore.open(log)
    assert log.read_bytes() == content
    assert reopen(log)[0] == model_after(BATCHES)
