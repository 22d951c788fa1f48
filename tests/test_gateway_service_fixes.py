"""The review's findings on the payment service (issue 12, /work/notes/s6/findings.md), each
against a real cluster (four replica processes on 127.0.0.1, small clock skew margin so an
expired hold is nudged within seconds):

- G7: an answered Idempotency-Key replays its stored bytes with no check and no cluster
  contact (the cluster's client is made to fail: the replay does not notice);
- G1: an account not known to be the caller's (opened outside this gateway) is 404 to read;
- G11: the payer's metadata is not shown to the payee's client;
- G4: rejected attempts stay out of the payment, operations per payment are capped, events
  carry the latest operation only;
- G5: a hold past its expiry on an idle cluster becomes expired (the gateway's void makes
  the cluster execute a batch, which releases it).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_service_harness import (
    events,
    ok,
    owned,
    problem,
    running_cluster,
    with_gateway,
)

from gateway import service as service_module
from gateway.keys import Caller
from gateway.service import Gateway, Stored, run
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster

SKEW_MS = 200
ALICE = Caller(client_id=0, key_id=1)
BOB = Caller(client_id=1, key_id=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(
        tmp_path_factory.mktemp("gwfix"), clients=2, protocol={"max_clock_skew_ms": SKEW_MS}
    )


async def open_elsewhere(local: LocalCluster, client_id: int, name: str) -> None:
    """An account opened by `client_id` without this gateway (its owner unknown here)."""
    async with PaymentClient(local.cluster, client_id) as client:
        decided = await client.open_account(name)
        assert decided.outcome == "confirmed", decided


class Unreachable:
    """Stands for a cluster that answers nothing: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the cluster was contacted ({name}) for a replay")


def test_g7_an_answered_key_replays_without_checks_or_the_cluster(
    local: LocalCluster, tmp_path: Path
) -> None:
    db = tmp_path / "g.db"
    payer = owned(local, 0)[0]
    trio.run(open_elsewhere, local, 1, "shop-g7")
    body = {"from": payer, "to": "shop-g7", "amount": 3, "capture": True}
    hold = {"from": payer, "to": "shop-g7", "amount": 2, "capture": False}

    async def first(gateway: Gateway) -> tuple[Stored, Stored, Stored]:
        service = gateway.service
        paid = await service.create_payment(ALICE, "k-pay", body)
        held = ok(await service.create_payment(ALICE, "k-hold", hold), "held")
        voided = await service.void(ALICE, "k-void", held["id"])
        ok(voided, "voided")
        return paid, voided, await service.create_payment(ALICE, "k-hold", hold)

    paid, voided, held = with_gateway(local, db, first)
    ok(paid, "confirmed")

    async def replay(gateway: Gateway) -> None:
        service = gateway.service
        gateway.clients = {0: Unreachable(), 1: Unreachable()}  # type: ignore[dict-item]
        assert await service.create_payment(ALICE, "k-pay", body) == paid
        assert await service.create_payment(ALICE, "k-hold", hold) == held
        # Not re-checked against today's state (the hold is voided now): the same answer.
        assert await service.void(ALICE, "k-void", held.json()["id"]) == voided
        reused = await problem(service.create_payment(ALICE, "k-pay", {**body, "amount": 4}))
        assert reused.status == 422

    with_gateway(local, db, replay)


def test_g1_an_account_opened_elsewhere_is_not_read_for_another_client(
    local: LocalCluster, tmp_path: Path
) -> None:
    trio.run(open_elsewhere, local, 1, "bob-private")

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        refused = await problem(service.account(ALICE, "bob-private"))
        assert refused.status == 404 and refused.type_slug == "unknown-account"
        missing = await problem(service.account(ALICE, "no-such-account"))
        assert missing.status == 404 and missing.type_slug == "unknown-account"
        mine = await service.account(ALICE, owned(local, 0)[0])
        assert mine["available"] > 0

    with_gateway(local, tmp_path / "g.db", body)


def test_g11_the_payers_metadata_is_not_shown_to_the_payee(
    local: LocalCluster, tmp_path: Path
) -> None:
    payer, payee = owned(local, 0)[0], owned(local, 1)[0]
    note = {"internal_note": "customer is VIP"}

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        paid = ok(
            await service.create_payment(
                ALICE, "k", {"from": payer, "to": payee, "amount": 1, "metadata": note}
            )
        )
        assert paid["metadata"] == note
        assert (await service.get_payment(ALICE, paid["id"]))["metadata"] == note
        assert (await service.get_payment(BOB, paid["id"]))["metadata"] == {}
        listed = await service.list_payments(BOB, None, 10, None)
        assert [p["metadata"] for p in listed["data"] if p["id"] == paid["id"]] == [{}]
        # The payee's refund answer is the payee's view too.
        refunded = ok(await service.refund(BOB, "r", paid["id"], 1), "refunded")
        assert refunded["metadata"] == {}

    with_gateway(local, tmp_path / "g.db", body)


def test_g4_rejected_attempts_stay_out_and_operations_are_capped(
    local: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)[0], owned(local, 0)[1]
    monkeypatch.setattr(service_module, "MAX_OPERATIONS", 6)

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        paid = ok(
            await service.create_payment(ALICE, "k", {"from": payer, "to": payee, "amount": 5})
        )
        for attempt in range(3):
            refused = await service.refund(ALICE, f"too-much-{attempt}", paid["id"], 50)
            assert refused.status_code == 409 and refused.json()["reason"] == "exceeds_refundable"
        ok(await service.refund(ALICE, "r1", paid["id"], 1), "confirmed")
        ok(await service.refund(ALICE, "r2", paid["id"], 1), "confirmed")
        shown = await service.get_payment(ALICE, paid["id"])
        assert [o["op"] for o in shown["operations"]] == ["transfer", "refund", "refund"]
        capped = await problem(service.refund(ALICE, "r3", paid["id"], 1))
        assert capped.status == 409 and capped.type_slug == "too-many-operations"
        # The answered keys still replay.
        assert (await service.refund(ALICE, "r2", paid["id"], 1)).status_code == 200

    with_gateway(local, db, body)
    for event in events(db):
        assert len(event["data"]["operations"]) == 1, event


def test_g5_an_expired_hold_becomes_expired_on_an_idle_cluster(
    local: LocalCluster, tmp_path: Path
) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 1)
    request = {"from": payer, "to": payee, "amount": 4, "capture": False, "expires_in_ms": 300}

    async def body(gateway: Gateway) -> dict[str, Any]:
        service = gateway.service
        held = ok(await service.create_payment(BOB, "short", request), "held")
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run, gateway, expiry_interval_s=0.05))
            # No other request: only the gateway's own void makes the cluster run a batch.
            for _ in range(300):
                if (await service.get_payment(BOB, held["id"]))["status"] != "held":
                    break
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert service.counts["expiry_void_409"] == 1, service.counts
        return await service.get_payment(BOB, held["id"])

    final = with_gateway(local, db, body)
    assert final["status"] == "expired" and final["reason"] == "hold_expired", final
    assert [event["type"] for event in events(db)] == ["payment.held", "payment.expired"]
