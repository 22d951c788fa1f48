"""PaymentClient.wait_connected: woken by the handshakes themselves (no polling), bounded by
its timeout, and counting replicas, not connections."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.node import ReplicaNode
from runtime.ports import free_ports


def test_wait_connected_returns_as_replicas_come_up_and_times_out_without_them(
    tmp_path: Path,
) -> None:
    base = min(free_ports(1)[0], 60000)
    cluster = load_cluster(write_cluster(tmp_path, replicas=4, clients=1, base_port=base))
    log = open(tmp_path / "replicas.log", "w")  # closed below

    async def scenario() -> None:
        async with PaymentClient(cluster, 0, timeout_s=30) as client:
            await client.wait_connected(count=0, timeout_s=0.01)  # nothing to wait for
            with pytest.raises(trio.TooSlowError):  # no replica runs yet
                await client.wait_connected(count=1, timeout_s=0.3)
            async with trio.open_nursery() as nursery:
                for replica in (0, 1):
                    node = ReplicaNode(cluster, replica, tmp_path / f"data-{replica}", log=log)
                    await nursery.start(node.run)
                with trio.fail_after(20):
                    await client.wait_connected(count=2)
                connected = [
                    client._transport.is_connected(("replica", replica)) for replica in range(4)
                ]
                assert connected == [True, True, False, False]
                with pytest.raises(trio.TooSlowError):  # two of the four are not running
                    await client.wait_connected(timeout_s=0.3)
                nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        log.close()
