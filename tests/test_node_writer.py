"""runtime/node.py's writer: one task writes the store, in queue order; deferred batches
(pbft/host.py) wait for a waited-for batch to share its fsync, or at most the delay."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from pbft.events import Persist
from runtime.node import MAX_DEFERRED_BATCHES, _Writer
from runtime.storage import DurableStore

DELAY_S = 0.05


def _deferred(key: str, value: bytes | None) -> list[Persist]:
    return [Persist((key,), value, deferrable=True)]


def test_a_vote_carries_the_deferred_records_queued_before_it_in_one_fsync(
    tmp_path: Path,
) -> None:
    with DurableStore.open(tmp_path / "log") as store:
        writer = _Writer(store, delay_s=60.0)  # never by the delay: only with the vote
        before = store.statistics().fsyncs

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.defer(_deferred("committed", b"c1"))
                await writer.defer(_deferred("committed", None))  # its order is kept
                await writer.defer(_deferred("checkpoint", b"s"))
                await trio.testing.wait_all_tasks_blocked()
                assert store.records() == {}  # queued, not written: nothing waits for them
                await writer.persist([Persist(("vote",), b"v")])
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert store.records() == {("checkpoint",): b"s", ("vote",): b"v"}
        assert store.statistics().fsyncs - before == 1
        assert writer.deferred == 0


def test_deferred_records_alone_are_written_after_the_delay(tmp_path: Path) -> None:
    with DurableStore.open(tmp_path / "log") as store:
        writer = _Writer(store, delay_s=DELAY_S)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.defer(_deferred("committed", b"c1"))
                with trio.fail_after(5):
                    await writer.written.wait()
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert store.records() == {("committed",): b"c1"}


def test_a_stop_flushes_what_is_still_queued(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with DurableStore.open(path) as store:
        writer = _Writer(store, delay_s=60.0)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.defer(_deferred("committed", b"c1"))
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert store.records() == {}
        writer.flush()
    with DurableStore.open(path) as reopened:
        assert reopened.records() == {("committed",): b"c1"}


def test_a_full_queue_of_deferred_batches_makes_the_next_one_wait(tmp_path: Path) -> None:
    with DurableStore.open(tmp_path / "log") as store:
        writer = _Writer(store, delay_s=60.0)

        async def main() -> None:
            for index in range(MAX_DEFERRED_BATCHES):
                await writer.defer(_deferred(f"k{index}", b"v"))
            blocked = True

            async def one_more() -> None:
                nonlocal blocked
                await writer.defer(_deferred("last", b"v"))
                blocked = False

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one_more)
                await trio.testing.wait_all_tasks_blocked()
                assert blocked and store.records() == {}
                nursery.start_soon(writer.run)
                await writer.persist([])  # a waited-for write lets the queue drain
                nursery.cancel_scope.cancel()
            assert not blocked

        trio.run(main)
        assert len(store.records()) == MAX_DEFERRED_BATCHES
