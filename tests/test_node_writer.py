"""runtime/node.py's writer: one task writes the store, in queue order; deferred batches
(pbft/host.py) wait for a waited-for batch to share its fsync, or at most the delay."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from pbft.events import Persist
from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.node import MAX_DEFERRED_BATCHES, ReplicaNode, _Writer
from runtime.ports import free_ports
from runtime.storage import DurableStore, StorageFailedError

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


def test_a_failed_write_stops_the_replica_with_the_storage_error_unwrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer has a task of its own; what it raises still leaves ReplicaNode.run as
    # itself, not in an exception group (cli/cluster.py maps it to its exit code).
    base = min(free_ports(1)[0], 60000)
    cluster = load_cluster(write_cluster(tmp_path, replicas=4, clients=1, base_port=base))

    def failing_apply(self: DurableStore, records: object) -> None:
        self._poison("test")
        raise StorageFailedError("disk gone")

    monkeypatch.setattr(DurableStore, "apply", failing_apply)
    log = open(tmp_path / "replica-0.log", "w")  # closed below

    async def scenario() -> None:
        node = ReplicaNode(cluster, 0, tmp_path / "data-0", log=log)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pay_once, PaymentClient(cluster, 0, timeout_s=30))
            with trio.fail_after(20), pytest.raises(StorageFailedError, match="disk gone"):
                await node.run()  # the primary persists its PRE-PREPARE: the write fails
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        log.close()


async def _pay_once(client: PaymentClient) -> None:
    async with client:
        await client.wait_connected(count=1)
        await client.pay("acct-00000", "acct-00001", 1)


def test_after_a_write_that_raised_the_stop_flush_writes_nothing_queued_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A value over MAX_VALUE_BYTES fails apply's checks (ValueError) before anything is
    # written, so the store is not marked failed; its batch is gone all the same, and a
    # flush of what was queued after it would leave a log that is not a prefix of the steps.
    monkeypatch.setattr("runtime.storage.MAX_VALUE_BYTES", 1000)
    with DurableStore.open(tmp_path / "log") as store:
        writer = _Writer(store, delay_s=60.0)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.defer(_deferred("checkpoint", b"x" * 1001))
                await writer.persist([Persist(("vote",), b"v")])

        with pytest.raises(ExceptionGroup) as raised:
            trio.run(main)
        assert raised.group_contains(ValueError, match="exceeds 1000")
        # What the core queued while that write was in its thread:
        writer.queue.append((_deferred("committed", b"c17"), None))
        assert not store.failed
        writer.flush()  # as ReplicaNode._drive's finally does when the store is not failed
        assert store.records() == {}
