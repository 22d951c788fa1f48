"""Resuming requests the cluster no longer remembers: a cluster whose dedup window is two
request ids per client, so a few newer requests push a gateway's unanswered one out of it.
Resubmitted, such a request is answered "unknown" (request_expired); the service then asks
the history (f + 1 replicas, PaymentClient.status) what became of it: executed -> its
original decision and receipt; never executed -> rejected, request_expired (it can no
longer be executed, so that is final)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_service_harness import running_cluster

from gateway.keys import Caller
from gateway.service import Gateway
from gateway.store import Database, GatewayStore
from pbft.operations import Operation
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster

ALICE = Caller(client_id=0, key_id=1)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(
        tmp_path_factory.mktemp("gw-dedup"), clients=2, protocol={"dedup_window": 2}
    )


def accounts(local: LocalCluster) -> tuple[str, str]:
    names = sorted(name for name, acct in local.cluster.accounts.items() if acct.owner == 0)
    return names[0], names[1]


async def push_out(local: LocalCluster, payer: str, payee: str) -> None:
    """Three newer requests of client 0: the dedup window (2) forgets older ids."""
    async with PaymentClient(local.cluster, 0, timeout_s=30) as client:
        for _ in range(3):
            decided = await client.pay(payer, payee, 1)
            assert decided.outcome == "confirmed"


async def die_after(gateway: Gateway, key: str, request: dict[str, Any], sent: bool) -> int:
    """Run create_payment until its request is recorded (and, if `sent`, with the cluster),
    then stop it as a killed gateway would stop; the recorded request id."""
    client = gateway.clients[0]
    if not sent:

        async def never(operation: Operation, request_id: int | None = None) -> Any:
            await trio.sleep_forever()

        client.submit = never  # type: ignore[method-assign]
    with trio.CancelScope() as scope:

        async def watch() -> None:
            while True:
                record = await gateway.store.idempotency(0, key)
                if record is not None and (not sent or client.core.outstanding):
                    scope.cancel()
                    return
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await gateway.service.create_payment(ALICE, key, request)
    record = await gateway.store.idempotency(0, key)
    assert record is not None and record.state == "in_flight"
    return record.request_id


def session(local: LocalCluster, db: Path, body: Any) -> Any:
    async def main() -> Any:
        store = GatewayStore(db)
        try:
            async with Gateway.open(local.cluster, (0,), store, timeout_s=30) as gateway:
                return await body(gateway)
        finally:
            store.close()

    return trio.run(main)


@pytest.mark.parametrize("sent", [True, False], ids=["executed", "never-sent"])
def test_a_forgotten_request_is_resolved_by_the_history(
    local: LocalCluster, tmp_path: Path, sent: bool
) -> None:
    db = tmp_path / "g.db"
    payer, payee = accounts(local)
    request = {"from": payer, "to": payee, "amount": 13, "capture": True}

    async def first(gateway: Gateway) -> tuple[int, int]:
        before = (await gateway.service.account(ALICE, payer))["available"]
        return await die_after(gateway, "k", request, sent), before

    request_id, before = session(local, db, first)
    if sent:
        # Let the cluster decide it before newer requests push it out of the window.
        async def wait_decided() -> None:
            async with PaymentClient(local.cluster, 1, timeout_s=30) as client:
                for _ in range(200):
                    if (await client.status(0, request_id)).state == "found":
                        return
                    await trio.sleep(0.05)
                raise AssertionError("the sent request was never decided")

        trio.run(wait_decided)
    trio.run(push_out, local, payer, payee)

    async def retry(gateway: Gateway) -> None:
        service = gateway.service
        stored = await service.create_payment(ALICE, "k", request)
        assert stored.status_code == 200, stored.body
        payment = stored.json()
        assert payment["id"] == f"pay_0_{request_id}"
        assert service.counts["resolved_by_lookup"] == 1
        if sent:
            assert (payment["status"], payment["reason"]) == ("confirmed", "none")
            receipt = payment["receipt"]
            assert receipt is not None and receipt["request_id"] == request_id
            assert service.verify_receipt(receipt["data"])["verdict"] == "valid"
        else:
            assert (payment["status"], payment["reason"]) == ("rejected", "request_expired")
            assert payment["receipt"] is None
        for _ in range(200):
            read = await service.account(ALICE, payer)
            if read["seq"] >= payment["seq"]:
                break
            await trio.sleep(0.05)
        # The three pushing payments moved 3; this one 13 once, or never.
        assert read["available"] == before - 3 - (13 if sent else 0)
        assert await service.create_payment(ALICE, "k", request) == stored

    session(local, db, retry)
    kinds = [body for _id, body in Database(db).events_after(0, 10)]
    assert len(kinds) == 1 and ("payment.confirmed" if sent else "payment.rejected") in kinds[0]
