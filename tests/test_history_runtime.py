"""History through the real runtime: each replica node keeps it in SQLite (in its data
directory), lookups travel over TCP, and a restarted node keeps what it held."""

from __future__ import annotations

from pathlib import Path

import trio

from pbft.messages import FOUND, NOT_FOUND
from pbft.receipt import verify_receipt
from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.node import ReplicaNode
from runtime.ports import free_ports


def test_lookups_through_real_replicas_and_a_restart(tmp_path: Path) -> None:
    base = min(free_ports(1)[0], 60000)
    cluster = load_cluster(write_cluster(tmp_path, replicas=4, clients=2, base_port=base))
    logs = [open(tmp_path / f"replica-{i}.log", "w") for i in range(4)]  # closed below
    found: dict[str, object] = {}

    async def scenario() -> None:
        nodes = [ReplicaNode(cluster, i, tmp_path / f"data-{i}", log=logs[i]) for i in range(4)]
        async with trio.open_nursery() as nursery:
            scopes = [trio.CancelScope() for _ in nodes]
            stopped = [trio.Event() for _ in nodes]
            for node, scope, done in zip(nodes, scopes, stopped, strict=True):
                nursery.start_soon(_run, node, scope, done)
            with trio.fail_after(60):
                async with PaymentClient(cluster, 0, timeout_s=20) as client:
                    await client.wait_connected()
                    decided = [
                        await client.pay("acct-00000", "acct-00001", amount, request_id=amount)
                        for amount in (1, 2, 3)
                    ]
                    status = await client.lookup(
                        lambda query_id: client.core.lookups.status(query_id, 0, 2)
                    )
                    page = await client.lookup(
                        lambda query_id: client.core.lookups.history(query_id, "acct-00001")
                    )
                    missing = await client.lookup(
                        lambda query_id: client.core.lookups.status(query_id, 0, 99)
                    )
                    found.update(decided=decided, status=status, page=page, missing=missing)
                    held = nodes[3].history
                    assert held is not None
                    found["before"] = held.request(0, 3)
                    # Restart replica 3 on its data directory: its history is still there.
                    scopes[3].cancel()
                    await stopped[3].wait()
                    nodes[3] = ReplicaNode(cluster, 3, tmp_path / "data-3", log=logs[3])
                    nursery.start_soon(_run, nodes[3], trio.CancelScope(), trio.Event())
                    with trio.fail_after(10):
                        while nodes[3].core is None:
                            await trio.sleep(0.01)
                    again = nodes[3].history
                    assert again is not None
                    found["after"] = again.request(0, 3)
                    found["range"] = (again.held_from(), again.held_through())
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        for log in logs:
            log.close()
    status = found["status"]
    assert status.state == FOUND and status.record.amount == 2  # type: ignore[attr-defined]
    verified = verify_receipt(status.receipt, cluster.keyring(), cluster.cluster_id)  # type: ignore[attr-defined]
    assert (verified.request_id, verified.outcome) == (2, "confirmed")
    page = found["page"]
    assert [e.available_delta for e in page.entries] == [1, 2, 3]  # type: ignore[attr-defined]
    assert found["missing"].state == NOT_FOUND  # type: ignore[attr-defined]
    assert found["before"] is not None and found["after"] == found["before"]
    assert found["range"][0] == 1 and found["range"][1] >= 3  # type: ignore[index]


async def _run(node: ReplicaNode, scope: trio.CancelScope, done: trio.Event) -> None:
    with scope:
        await node.run()
    done.set()
