"""What the payment service's in-process tests share (tests/test_gateway_service*.py): a
real cluster of four replica processes on 127.0.0.1, a fresh Gateway over a test's own
SQLite file, and the small readers of the service's answers."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from gateway.errors import Problem
from gateway.service import Gateway, Stored
from gateway.store import Database, GatewayStore
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster

T = TypeVar("T")
STARTUP_S = 60.0
TIMEOUT_S = 30.0


def running_cluster(root: Path, **create: Any) -> Iterator[LocalCluster]:
    """A started 4-replica LocalCluster (`create`: LocalCluster.create's keywords), once a
    client has connected to every replica; stopped at the end, with each replica's exit
    report on stderr. For a module-scoped fixture to `yield from`."""
    cluster = LocalCluster.create(root, replicas=4, **create)
    cluster.start_all()
    try:

        async def connected() -> None:
            async with PaymentClient(cluster.cluster, 0) as client:
                await client.wait_connected(timeout_s=STARTUP_S)

        trio.run(connected)
        yield cluster
    finally:
        for replica, code in sorted(cluster.exited().items()):
            print(cluster.exit_report(replica, code), file=sys.stderr)
        cluster.stop_all()


def owned(local: LocalCluster, client: int) -> list[str]:
    return sorted(name for name, acct in local.cluster.accounts.items() if acct.owner == client)


def with_gateway(
    local: LocalCluster,
    db: Path,
    body: Callable[[Gateway], Awaitable[T]],
    timeout_s: float = TIMEOUT_S,
) -> T:
    """`body(gateway)` on a fresh Gateway (clients 0 and 1) over the database `db`."""

    async def main() -> T:
        store = GatewayStore(db)
        try:
            async with Gateway.open(local.cluster, (0, 1), store, timeout_s=timeout_s) as gateway:
                return await body(gateway)
        finally:
            store.close()

    return trio.run(main)


async def problem(call: Awaitable[object]) -> Problem:
    with pytest.raises(Problem) as raised:
        await call
    return raised.value


def ok(stored: Stored, status: str | None = None) -> dict[str, Any]:
    assert stored.status_code == 200, stored.body
    payment = stored.json()
    if status is not None:
        assert payment["status"] == status, payment
    return payment


def events(db: Path) -> list[dict[str, Any]]:
    return [json.loads(body) for _id, body in Database(db).events_after(0, 1000)]
