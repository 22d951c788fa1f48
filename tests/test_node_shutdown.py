"""A replica stopped (SIGTERM, Ctrl-C: its nursery cancelled) while a durable write is in
flight stops cleanly. Found by the soak (runtime.soak): the write, in a worker thread, is
not cancellable, so the transport had already shut down when it returned, and sending that
event's messages raised RuntimeError, so the replica exited as an internal error."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio

from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.node import ReplicaNode
from runtime.ports import free_ports
from runtime.storage import DurableStore


def test_cancelled_during_a_durable_write_stops_without_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = min(free_ports(1)[0], 60000)
    cluster = load_cluster(write_cluster(tmp_path, replicas=4, clients=1, base_port=base))
    writing = threading.Event()
    apply = DurableStore.apply

    def slow_apply(self: DurableStore, records: object) -> None:
        apply(self, records)  # type: ignore[arg-type]
        writing.set()
        time.sleep(0.5)  # the node is cancelled meanwhile

    monkeypatch.setattr(DurableStore, "apply", slow_apply)
    log = open(tmp_path / "replica-0.log", "w")  # closed below

    async def scenario() -> None:
        node = ReplicaNode(cluster, 0, tmp_path / "data-0", log=log)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            client = PaymentClient(cluster, 0, timeout_s=30)
            nursery.start_soon(_pay_once, client)
            with trio.fail_after(20):
                while not writing.is_set():  # the primary persists its PRE-PREPARE
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)  # before the fix: RuntimeError, the Transport is not running
    finally:
        log.close()
    assert (tmp_path / "replica-0.log").read_text().splitlines()[-1].endswith('"stopped"}')


async def _pay_once(client: PaymentClient) -> None:
    async with client:
        await client.wait_connected(count=1)
        await client.pay("acct-00000", "acct-00001", 1)
