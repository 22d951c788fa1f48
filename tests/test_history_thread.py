"""The node's history, written off its step path (runtime/history_store.py's
ThreadedHistoryStore) and flushed before a stable checkpoint is written (runtime/node.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
from test_history_store import batch, request

from pbft.codec import pack
from pbft.events import Executed, Persist
from runtime.history_store import SqliteHistoryStore, ThreadedHistoryStore
from runtime.node import _Writer, checkpoint_seq

JOIN_S = 5.0


class GatedStore(SqliteHistoryStore):
    """Writes only once `gate` is set (a slow disk), or fails if told to."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.fail = False
        self.writes: list[tuple[list[int], bool]] = []  # (seqs, durable) of each write

    def record_all(self, batches: Iterable[Executed], *, durable: bool = False) -> None:
        self.writing.set()
        if not self.gate.wait(JOIN_S):
            raise AssertionError("gate never opened")
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        batches = list(batches)
        self.writes.append(([executed.seq for executed in batches], durable))
        super().record_all(batches, durable=durable)


def in_thread(work: object) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)  # type: ignore[operator]
    thread.start()
    return thread, result


def test_recording_does_not_wait_for_the_write_and_reads_see_it(tmp_path: Path) -> None:
    inner = GatedStore(tmp_path / "history.sqlite")
    store = ThreadedHistoryStore(inner)
    store.record_all([batch(1, request(1, 1))])  # returns with the write still blocked
    assert inner.writing.wait(JOIN_S)
    assert store.pending() == 1
    reader, found = in_thread(lambda: store.request(1, 1))
    reader.join(0.05)
    assert reader.is_alive(), "a read must wait for what is queued (read-your-writes)"
    inner.gate.set()
    reader.join(JOIN_S)
    assert found[0] is not None and found[0].seq == 1
    assert store.held_through() == 1 and store.pending() == 0
    store.close()


def test_the_queue_is_bounded(tmp_path: Path) -> None:
    inner = GatedStore(tmp_path / "history.sqlite")
    store = ThreadedHistoryStore(inner, max_pending=2)
    store.record(batch(1, request(1, 1)))
    assert inner.writing.wait(JOIN_S)  # seq 1 is being written, 2 and 3 wait
    store.record_all([batch(2, request(1, 2)), batch(3, request(1, 3))])
    waiter, _ = in_thread(store.wait_for_room)
    waiter.join(0.05)
    assert waiter.is_alive(), "two queued batches: no room until the thread takes them"
    inner.gate.set()
    waiter.join(JOIN_S)
    assert not waiter.is_alive()
    store.flush()
    assert (store.held_from(), store.held_through()) == (1, 3)
    assert store.batches_written == 3 and store.transactions == 2  # 2 and 3 in one
    store.close()


def test_a_failed_write_is_raised_by_the_next_call(tmp_path: Path) -> None:
    inner = GatedStore(tmp_path / "history.sqlite")
    inner.fail = True
    inner.gate.set()
    store = ThreadedHistoryStore(inner)
    store.record(batch(1, request(1, 1)))
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        store.flush()
    with pytest.raises(sqlite3.OperationalError):
        store.record(batch(2, request(1, 2)))
    store.close()  # at a stop: not raised again


def test_closing_writes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    store = ThreadedHistoryStore(SqliteHistoryStore(path))
    store.record_all([batch(seq, request(1, seq)) for seq in range(1, 11)])
    store.close()
    reopened = SqliteHistoryStore(path)
    assert (reopened.held_from(), reopened.held_through()) == (1, 10)
    assert reopened.request(1, 10) is not None
    reopened.close()


class FakeLog:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def apply(self, records: Sequence[object]) -> None:
        self.calls.append(f"apply {len(records)}")


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + JOIN_S
    while not condition():
        assert time.monotonic() < deadline, "the history thread did not get there"
        time.sleep(0.005)


def checkpoint_record(seq: int) -> bytes:
    # The shape pbft/checkpoints.py make_stable persists: seq, chain hash, ledger digest,
    # snapshot, proof.
    return pack([seq, bytes(32), bytes(32), b"s" * 100_000, [b"proof"]])


def test_the_writer_syncs_history_through_a_stable_checkpoint_before_writing_it() -> None:
    # Recovery does not re-execute what a durable checkpoint covers: its batches must be
    # in history, durably, first. Other writes do not wait for history.
    calls: list[str] = []
    writer = _Writer(FakeLog(calls), 0.001, lambda seq: calls.append(f"sync {seq}"))  # type: ignore[arg-type]
    writer._write([Persist(("vote", 1), b"x")])
    writer._write([Persist(("vote", 2), b"x"), Persist(("checkpoint",), checkpoint_record(48))])
    assert calls == ["apply 1", "sync 48", "apply 2"]


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 2**32, 2**62 - 1])
def test_a_checkpoint_records_seq_is_read_without_its_snapshot(seq: int) -> None:
    assert checkpoint_seq(checkpoint_record(seq)) == seq


def test_batches_are_grouped_and_a_checkpoints_batch_is_written_durably(tmp_path: Path) -> None:
    inner = GatedStore(tmp_path / "history.sqlite")
    inner.gate.set()
    store = ThreadedHistoryStore(inner, checkpoint_interval=4, group_delay_s=60.0)
    for seq in range(1, 4):
        store.record(batch(seq, request(1, seq)))
    time.sleep(0.05)
    assert inner.writes == [] and store.pending() == 3, "no transaction per batch"
    store.record(batch(4, request(1, 4)))  # a checkpoint's batch: written now, synced
    wait_for(lambda: len(inner.writes) == 1)
    assert inner.writes[0] == ([1, 2, 3, 4], True)
    store.record(batch(5, request(1, 5)))
    time.sleep(0.05)
    assert len(inner.writes) == 1
    # Seq 5 waits for the next group; a read has it written first (read-your-writes).
    assert store.request(1, 5) is not None
    assert inner.writes[1:] == [([5], False)]
    assert (store.transactions, store.syncs, store.batches_written) == (2, 1, 5)
    store.close()


def test_groups_end_at_the_delay_or_the_size_without_a_sync(tmp_path: Path) -> None:
    inner = GatedStore(tmp_path / "history.sqlite")
    inner.gate.set()
    store = ThreadedHistoryStore(inner, group_batches=3, group_delay_s=0.05)
    store.record_all([batch(seq, request(1, seq)) for seq in (1, 2, 3)])  # the size
    wait_for(lambda: len(inner.writes) == 1)
    store.record(batch(4, request(1, 4)))  # alone, after the delay
    wait_for(lambda: len(inner.writes) == 2)
    assert inner.writes == [([1, 2, 3], False), ([4], False)]
    store.close()


def test_sync_through_waits_only_for_what_it_covers(tmp_path: Path) -> None:
    inner = GatedStore(tmp_path / "history.sqlite")
    inner.gate.set()
    store = ThreadedHistoryStore(inner, group_delay_s=60.0)
    store.sync_through(100)  # nothing queued, nothing written: nothing to do
    assert inner.writes == []
    store.record_all([batch(seq, request(1, seq)) for seq in (1, 2, 3)])
    store.flush()  # written, not synced
    assert inner.writes == [([1, 2, 3], False)]
    store.record(batch(4, request(1, 4)))
    store.sync_through(2)  # 1..3 are not synced yet: one durable write, with 4 in it
    assert inner.writes[1:] == [([4], True)]
    store.sync_through(4)  # already synced
    store.record(batch(5, request(1, 5)))
    store.sync_through(4)  # 5 is after it: it may wait for its group
    assert len(inner.writes) == 2 and store.pending() == 1
    store.close()  # a stop writes what is queued, durably
    assert inner.writes[2:] == [([5], True)]


def test_a_durable_write_leaves_the_file_at_synchronous_normal(tmp_path: Path) -> None:
    store = SqliteHistoryStore(tmp_path / "history.sqlite")
    store.record_all([batch(1, request(1, 1))], durable=True)
    store.record_all([], durable=True)  # only the sync
    assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert (store.held_from(), store.held_through()) == (1, 1)
    store.close()
