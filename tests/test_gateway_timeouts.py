"""Review finding G13: one owner per timeout, and nothing left behind by a read that ends
early. The cluster here is down (its replicas never started), as in an outage.

PaymentClient.balance/lookup forget their query in the core however they end (their own
timeout, or a cancellation from outside: the service's deadline used to fire first and
leave it, retransmitted forever, until the core refused every read); more reads than the
core's limit wait for a slot within their timeout instead of failing; the service answers
504 for every read of an unreachable cluster, never 500; a background pass that fails on
a cluster error is counted and backs off, never ends the gateway."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.errors import Problem
from gateway.keys import Caller
from gateway.service import Gateway, _every
from gateway.store import GatewayStore
from pbft.client import ClientError
from runtime.client import PaymentClient, PaymentTimeout
from runtime.cluster import Cluster, load_cluster, write_cluster
from runtime.ports import consecutive_free_ports

ALICE = Caller(client_id=0, key_id=1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("down")
    yield load_cluster(
        write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])
    )


def empty(client: PaymentClient) -> None:
    assert client.core.queries == {}
    assert client.core.lookups.pending == {}
    assert client._waiting_reads == {} and client._waiting_lookups == {}
    assert client._reads == {} and client._lookups == {}


def test_reads_and_lookups_cancelled_from_outside_leave_nothing_behind(cluster: Cluster) -> None:
    limit = cluster.config.client_pending_limit

    async def main() -> None:
        async with PaymentClient(cluster, 0, timeout_s=30.0) as client:
            with trio.move_on_after(0.5):
                async with trio.open_nursery() as nursery:
                    for _ in range(limit + 12):
                        nursery.start_soon(client.balance, "acct-00000")
                        nursery.start_soon(client.hold, (0, 1))
            empty(client)

    trio.run(main)


def test_an_outer_deadline_of_the_same_length_leaks_nothing(cluster: Cluster) -> None:
    """The old expiry pass: client.hold inside fail_after(the client's timeout), once a
    pass, more passes than the core's limit; each ended by the outer deadline."""
    limit = cluster.config.client_pending_limit

    async def main() -> None:
        async with PaymentClient(cluster, 0, timeout_s=0.02) as client:
            for _ in range(limit + 5):
                with pytest.raises((trio.TooSlowError, PaymentTimeout)):
                    with trio.fail_after(client.timeout_s):
                        await client.hold((0, 1))
            empty(client)

    trio.run(main)


def test_more_reads_than_the_limit_wait_then_time_out(cluster: Cluster) -> None:
    limit = cluster.config.client_pending_limit
    outcomes: Counter[str] = Counter()

    async def main() -> None:
        async with PaymentClient(cluster, 0, timeout_s=0.5) as client:

            async def one() -> None:
                try:
                    await client.balance("acct-00000")
                except PaymentTimeout:
                    outcomes["timeout"] += 1

            async with trio.open_nursery() as nursery:
                for _ in range(limit + 12):
                    nursery.start_soon(one)
            empty(client)

    trio.run(main)
    assert outcomes == {"timeout": limit + 12}


def test_reads_during_an_outage_are_504_never_500(cluster: Cluster, tmp_path: Path) -> None:
    limit = cluster.config.client_pending_limit
    codes: Counter[int] = Counter()

    async def main() -> None:
        store = GatewayStore(tmp_path / "g.db")
        try:
            async with Gateway.open(cluster, (0,), store, timeout_s=0.5) as gateway:

                async def one() -> None:
                    try:
                        await gateway.service.account(ALICE, "acct-00000")
                    except Problem as problem:
                        codes[problem.status] += 1

                for burst in (limit + 12, 5):
                    async with trio.open_nursery() as nursery:
                        for _ in range(burst):
                            nursery.start_soon(one)
                empty(gateway.clients[0])
        finally:
            store.close()

    trio.run(main)
    assert codes == {504: limit + 17}


def test_a_background_pass_failing_on_the_cluster_is_counted_and_backs_off() -> None:
    counts: Counter[str] = Counter()
    passes = 0

    async def failing() -> None:
        nonlocal passes
        passes += 1
        raise ClientError("128 lookups already in flight")

    async def main() -> None:
        with trio.move_on_after(1.0):
            await _every(0.01, failing, counts)

    trio.run(main)
    assert counts["background_pass_failed"] == passes >= 2
    # Doubling from 10 ms: 20 + 40 + ... + 640 ms fill the second; 100 without backing off.
    assert passes <= 8
