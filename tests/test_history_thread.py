"""The node's history, written off its step path (runtime/history_store.py's
ThreadedHistoryStore) and flushed before a stable checkpoint is written (runtime/node.py)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from test_history_store import batch, request

from pbft.events import Executed, Persist
from runtime.history_store import SqliteHistoryStore, ThreadedHistoryStore
from runtime.node import _Writer

JOIN_S = 5.0


class GatedStore(SqliteHistoryStore):
    """Writes only once `gate` is set (a slow disk), or fails if told to."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.fail = False

    def record_all(self, batches: Iterable[Executed]) -> None:
        self.writing.set()
        if not self.gate.wait(JOIN_S):
            raise AssertionError("gate never opened")
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        super().record_all(batches)


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


def test_the_writer_flushes_history_before_a_stable_checkpoint() -> None:
    # Recovery does not re-execute what a durable checkpoint covers: its batches must be
    # in history first. Other writes do not wait for history.
    calls: list[str] = []
    writer = _Writer(FakeLog(calls), 0.001, lambda: calls.append("flush"))  # type: ignore[arg-type]
    writer._write([Persist(("vote", 1), b"x")])
    writer._write([Persist(("vote", 2), b"x"), Persist(("checkpoint",), b"c", True)])
    assert calls == ["apply 1", "flush", "apply 2"]
