"""runtime/node.py's writer: one task writes the store, in queue order, whatever queued
during a write in the next one; deferred batches (pbft/host.py) are written at once,
without the step waiting for them."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

from pbft.events import Persist
from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.node import MAX_DEFERRED_BATCHES, ReplicaNode, _Writer
from runtime.ports import free_ports
from runtime.storage import DurableStore, Key, StorageFailedError


def _deferred(key: str, value: bytes | None) -> list[Persist]:
    return [Persist((key,), value, deferrable=True)]


def _gate(store: DurableStore) -> tuple[threading.Event, list[int]]:
    """Hold the store's next write in its thread until the returned event is set; the
    sizes of the batches written are listed."""
    opened = threading.Event()
    sizes: list[int] = []
    apply = store.apply

    def gated(records: Iterable[tuple[Key, bytes | None]]) -> None:
        opened.wait(10)
        batch = list(records)
        sizes.append(len(batch))
        apply(batch)

    store.apply = gated  # type: ignore[method-assign]
    return opened, sizes


def test_a_deferred_batch_is_written_at_once_and_the_step_does_not_wait(tmp_path: Path) -> None:
    with DurableStore.open(tmp_path / "log") as store:
        opened, sizes = _gate(store)
        writer = _Writer(store)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                with trio.fail_after(5):
                    await writer.defer(_deferred("committed", b"c1"))  # returns, disk held
                    await trio.testing.wait_all_tasks_blocked()
                    assert writer.queue == []  # taken: the write is under way
                    opened.set()
                    await writer.written.wait()
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert sizes == [1] and store.records() == {("committed",): b"c1"}


def test_what_queues_during_a_write_shares_the_next_one_in_order(tmp_path: Path) -> None:
    with DurableStore.open(tmp_path / "log") as store:
        opened, sizes = _gate(store)
        writer = _Writer(store)
        before = store.statistics().fsyncs

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                with trio.fail_after(5):
                    await writer.defer(_deferred("committed", b"c1"))
                    await trio.testing.wait_all_tasks_blocked()  # in its thread, held
                    await writer.defer(_deferred("committed", None))  # its order is kept
                    await writer.defer(_deferred("checkpoint", b"s"))
                    opened.set()
                    await writer.persist([Persist(("vote",), b"v")])
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert sizes == [1, 3]  # the vote carried the two deferred batches queued before it
        assert store.records() == {("checkpoint",): b"s", ("vote",): b"v"}
        assert store.statistics().fsyncs - before == 2
        assert writer.deferred == 0


def test_a_stop_flushes_what_is_still_queued(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with DurableStore.open(path) as store:
        writer = _Writer(store)  # its task never ran: everything is still queued

        async def main() -> None:
            await writer.defer(_deferred("committed", b"c1"))

        trio.run(main)
        assert store.records() == {}
        writer.flush()
    with DurableStore.open(path) as reopened:
        assert reopened.records() == {("committed",): b"c1"}


def test_a_full_queue_of_deferred_batches_makes_the_next_one_wait(tmp_path: Path) -> None:
    with DurableStore.open(tmp_path / "log") as store:
        writer = _Writer(store)

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
                nursery.start_soon(writer.run)  # the disk catches up: the queue drains
                with trio.fail_after(5):
                    await writer.written.wait()
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
