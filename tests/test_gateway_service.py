"""The gateway's payment service (gateway/service.py) against a real cluster: four replica
processes on 127.0.0.1, the service in-process on its own SQLite file (each test a new
one), called as the HTTP layer calls it.

Idempotency (replay of the exact bytes, also by a new Gateway on the same database; 422 for
a different body; 409 while the first is in flight; a request recorded by a gateway that
died after sending it, resumed with the same request id; a 504 retried with the same key),
holds captured, voided and expired, refunds partial and full, rejected operations with
their receipts, paging, ownership (403) and keys (401). The cluster's exactly-once is what
makes a resubmission safe: the balances show each payment moved money once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from gateway_service_harness import (
    TIMEOUT_S,
    events,
    ok,
    owned,
    problem,
    running_cluster,
    with_gateway,
)

from gateway.errors import Problem
from gateway.keys import Caller
from gateway.service import Gateway, PaymentService, Stored, run
from gateway.store import Database
from runtime.localcluster import LocalCluster

HOUR_MS = 3_600_000
ALICE = Caller(client_id=0, key_id=1)
BOB = Caller(client_id=1, key_id=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(tmp_path_factory.mktemp("gw"), clients=3)


async def settled(
    service: PaymentService, caller: Caller, account: str, seq: int
) -> dict[str, Any]:
    """The account's balance read once f + 1 agreeing replicas have executed `seq`."""
    for _ in range(200):
        read = await service.account(caller, account)
        if read["seq"] >= seq:
            return read
        await trio.sleep(0.05)
    raise AssertionError(f"no read of {account} as of seq {seq}")


def test_a_payment_replays_its_exact_bytes_also_after_a_restart(
    local: LocalCluster, tmp_path: Path
) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)[0], owned(local, 1)[0]
    body = {"from": payer, "to": payee, "amount": 7, "capture": True, "metadata": {"order": "1"}}

    async def first(gateway: Gateway) -> tuple[Stored, int]:
        service = gateway.service
        before = (await service.account(ALICE, payer))["available"]
        stored = await service.create_payment(ALICE, "key-1", body)
        payment = ok(stored, "confirmed")
        assert payment["id"].startswith("pay_0_") and payment["reason"] == "none"
        assert payment["metadata"] == {"order": "1"} and payment["amount"] == 7
        receipt = payment["receipt"]
        assert (receipt["op"], receipt["outcome"], receipt["client"]) == (
            "transfer",
            "confirmed",
            0,
        )
        assert len(receipt["signers"]) >= 2 and receipt["seq"] == payment["seq"] > 0
        verdict = service.verify_receipt(receipt["data"])
        assert verdict["verdict"] == "valid" and verdict["payment_id"] == payment["id"]
        assert (verdict["from"], verdict["to"], verdict["amount"]) == (payer, payee, 7)
        # The same key and body: the same bytes, without asking the cluster again.
        again = await service.create_payment(ALICE, "key-1", dict(body))
        assert again == stored and service.counts["replayed"] == 1
        assert service.counts["decided_confirmed"] == 1
        reused = await problem(service.create_payment(ALICE, "key-1", {**body, "amount": 8}))
        assert (reused.status, reused.type_slug, reused.field) == (
            422,
            "idempotency-key-reused",
            "Idempotency-Key",
        )
        # Another client's key of the same name is another key.
        other = await problem(service.create_payment(BOB, "key-1", body))
        assert other.status == 403
        assert await service.get_payment(ALICE, payment["id"]) == payment
        read = await settled(service, ALICE, payer, payment["seq"])
        assert read["available"] == before - 7
        return stored, before

    stored, before = with_gateway(local, db, first)

    async def restarted(gateway: Gateway) -> None:
        service = gateway.service
        again = await service.create_payment(ALICE, "key-1", body)
        assert again.status_code == stored.status_code and again.body == stored.body
        assert service.counts["replayed"] == 1 and service.counts["decided_confirmed"] == 0
        read = await settled(service, ALICE, payer, json.loads(stored.body)["seq"])
        assert read["available"] == before - 7  # moved once

    with_gateway(local, db, restarted)
    [event] = events(db)
    assert event["type"] == "payment.confirmed" and event["id"].startswith("evt_")
    assert event["data"] == json.loads(stored.body)


def test_a_key_whose_first_request_is_in_flight_is_409(local: LocalCluster, tmp_path: Path) -> None:
    payer, payee = owned(local, 0)

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        request = {"from": payer, "to": payee, "amount": 3, "capture": True}
        results: list[Stored] = []

        async def first() -> None:
            results.append(await service.create_payment(ALICE, "busy", request))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            while (0, "busy") not in service._active:
                await trio.sleep(0)
            busy = await problem(service.create_payment(ALICE, "busy", request))
            assert (busy.status, busy.type_slug) == (409, "idempotency-key-in-flight")
            # Different body, same key, still in flight: 409 too (it is not answered yet).
            busy = await problem(service.create_payment(ALICE, "busy", {**request, "amount": 4}))
            assert busy.status == 409
        ok(results[0], "confirmed")
        assert await service.create_payment(ALICE, "busy", request) == results[0]

    with_gateway(local, tmp_path / "g.db", body)


def test_a_request_left_by_a_killed_gateway_is_resumed_with_its_request_id(
    local: LocalCluster, tmp_path: Path
) -> None:
    """The gateway dies after sending: its record (written before the send) is resumed by
    the next gateway with the same request id, and the payment moves money once."""
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)[1], owned(local, 1)[1]
    request = {"from": payer, "to": payee, "amount": 11, "capture": True}

    async def killed(gateway: Gateway) -> tuple[int, int]:
        service = gateway.service
        client = gateway.clients[0]
        before = (await service.account(ALICE, payer))["available"]
        with trio.CancelScope() as scope:

            async def watch() -> None:
                while not client.core.outstanding:  # sent: the request is with the cluster
                    await trio.sleep(0)
                [request_id] = client.core.outstanding
                record = Database(db).idempotency(0, "order-77")
                assert record is not None and record.request_id == request_id  # written first
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await service.create_payment(ALICE, "order-77", request)
        record = Database(db).idempotency(0, "order-77")
        assert record is not None and record.state == "in_flight"
        return record.request_id, before

    request_id, before = with_gateway(local, db, killed)
    pid = f"pay_0_{request_id}"

    async def next_gateway(gateway: Gateway) -> None:
        service = gateway.service
        assert (await service.get_payment(ALICE, pid))["status"] == "pending"
        async with trio.open_nursery() as nursery:
            await nursery.start(run, gateway)
            for _ in range(600):
                if service.counts["resumed"]:
                    break
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        payment = await service.get_payment(ALICE, pid)
        assert payment["status"] == "confirmed" and payment["receipt"]["request_id"] == request_id
        stored = await service.create_payment(ALICE, "order-77", request)
        assert stored.json() == payment  # the key is answered with the resumed decision
        read = await settled(service, ALICE, payer, payment["seq"])
        assert read["available"] == before - 11

    with_gateway(local, db, next_gateway)
    assert [event["type"] for event in events(db)] == ["payment.confirmed"]


def test_a_cluster_timeout_is_504_then_the_retry_resubmits_the_same_request(
    local: LocalCluster, tmp_path: Path
) -> None:
    payer, payee = owned(local, 1)[0], owned(local, 0)[0]
    request = {"from": payer, "to": payee, "amount": 5, "capture": True}

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        before = (await service.account(BOB, payer))["available"]
        service.timeout_s = 0.001  # sent, but no decision can come that fast
        late = await problem(service.create_payment(BOB, "slow", request))
        assert (late.status, late.type_slug) == (504, "cluster-timeout")
        pid = late.extra["payment_id"]
        assert pid.startswith("pay_1_")
        pending = await service.get_payment(BOB, pid)
        assert pending["status"] == "pending" and pending["receipt"] is None
        assert pending["operations"][0]["outcome"] == "pending"
        # Nothing is done to a payment before its own decision is known.
        early = await problem(service.refund(ALICE, "early", pid, 1))
        assert (early.status, early.type_slug) == (409, "payment-pending")
        service.timeout_s = TIMEOUT_S
        payment = ok(await service.create_payment(BOB, "slow", request), "confirmed")
        assert payment["id"] == pid
        read = await settled(service, BOB, payer, payment["seq"])
        assert read["available"] == before - 5

    with_gateway(local, tmp_path / "g.db", body)


def test_holds_captured_voided_and_expired(local: LocalCluster, tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)

    def hold(amount: int, expires_in_ms: int = HOUR_MS) -> dict[str, Any]:
        return {
            "from": payer,
            "to": payee,
            "amount": amount,
            "capture": False,
            "expires_in_ms": expires_in_ms,
        }

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        held = ok(await service.create_payment(ALICE, "h1", hold(50)), "held")
        assert held["receipt"]["op"] == "authorize" and held["expires_in_ms"] == HOUR_MS
        read = await settled(service, ALICE, payer, held["seq"])
        assert read["held"] >= 50
        captured = ok(await service.capture(ALICE, "h1-capture", held["id"], 30), "captured")
        assert captured["captured_amount"] == 30 and captured["id"] == held["id"]
        assert [o["op"] for o in captured["operations"]] == ["authorize", "capture"]
        again = await service.capture(ALICE, "h1-capture-2", held["id"], None)
        assert again.status_code == 409
        rejected = again.json()
        assert rejected["type"].endswith("/operation-rejected")
        assert rejected["reason"] == "hold_already_captured"
        assert rejected["operation"]["receipt"]["outcome"] == "rejected"
        verdict = service.verify_receipt(rejected["operation"]["receipt"]["data"])
        assert (verdict["verdict"], verdict["op"], verdict["ref"]) == (
            "valid",
            "capture",
            held["id"],
        )
        assert (await service.get_payment(ALICE, held["id"]))["status"] == "captured"

        too_long = await problem(service.create_payment(ALICE, "h0", hold(5, HOUR_MS + 1)))
        assert (too_long.status, too_long.type_slug, too_long.field) == (
            422,
            "invalid-field",
            "expires_in_ms",
        )
        other = ok(await service.create_payment(ALICE, "h2", hold(20)), "held")
        ok(await service.void(ALICE, "h2-void", other["id"]), "voided")

        short = ok(await service.create_payment(ALICE, "h3", hold(9, 300)), "held")
        doomed = ok(await service.create_payment(ALICE, "h4", hold(8, 300)), "held")
        await trio.sleep(0.6)
        # The cluster releases an expired hold when it next executes a batch.
        ok(
            await service.create_payment(
                ALICE, "tick", {**hold(1), "capture": True, "expires_in_ms": None}
            )
        )
        late = await service.capture(ALICE, "h4-capture", doomed["id"], None)
        assert late.status_code == 409 and late.json()["reason"] == "hold_expired"
        assert (await service.get_payment(ALICE, doomed["id"]))["status"] == "expired"
        for _ in range(100):
            if await service.expiry_pass():
                break
            await trio.sleep(0.1)
        expired = await service.get_payment(ALICE, short["id"])
        assert (expired["status"], expired["reason"]) == ("expired", "hold_expired")
        assert await service.expiry_pass() == 0  # nothing left to watch

    with_gateway(local, db, body)
    kinds = [(event["type"], event["data"]["amount"]) for event in events(db)]
    assert kinds == [
        ("payment.held", 50),
        ("payment.captured", 50),
        ("payment.held", 20),
        ("payment.voided", 20),
        ("payment.held", 9),
        ("payment.held", 8),
        ("payment.confirmed", 1),
        ("payment.expired", 8),
        ("payment.expired", 9),
    ]


def test_refunds_in_parts_then_in_full_then_refused(local: LocalCluster, tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        paid = ok(
            await service.create_payment(
                ALICE, "p", {"from": payer, "to": payee, "amount": 100, "capture": True}
            ),
            "confirmed",
        )
        part = ok(await service.refund(ALICE, "r1", paid["id"], 30), "confirmed")
        assert part["refunded_amount"] == 30
        full = ok(await service.refund(ALICE, "r2", paid["id"], 70), "refunded")
        assert full["refunded_amount"] == 100 and full["reason"] == "none"
        more = await service.refund(ALICE, "r3", paid["id"], 1)
        assert more.status_code == 409 and more.json()["reason"] == "exceeds_refundable"
        assert (await service.refund(ALICE, "r3", paid["id"], 1)) == more  # replayed too
        bad = await problem(service.refund(ALICE, "r4", paid["id"], 0))
        assert (bad.status, bad.type_slug, bad.field) == (422, "invalid-field", "amount")
        not_a_hold = await problem(service.capture(ALICE, "c", paid["id"], None))
        assert (not_a_hold.status, not_a_hold.type_slug) == (409, "not-a-hold")
        malformed = await problem(service.void(ALICE, "v", "pay_zero"))
        assert (malformed.status, malformed.field) == (400, "payment_id")
        with pytest.raises(Problem) as unknown:
            await service.refund(ALICE, "r5", "pay_0_1", 1)
        assert unknown.value.status == 404
        # Two refunds of one payment decided at once: neither change is lost.
        second = ok(
            await service.create_payment(
                ALICE, "p2", {"from": payer, "to": payee, "amount": 10, "capture": True}
            ),
            "confirmed",
        )
        async with trio.open_nursery() as nursery:
            for index, amount in enumerate((4, 6)):
                nursery.start_soon(service.refund, ALICE, f"both-{index}", second["id"], amount)
        both = await service.get_payment(ALICE, second["id"])
        assert (both["status"], both["refunded_amount"]) == ("refunded", 10)
        assert [o["outcome"] for o in both["operations"]] == ["confirmed"] * 3

    with_gateway(local, db, body)
    assert [event["type"] for event in events(db)] == [
        "payment.confirmed",
        "payment.refunded",
        "payment.refunded",
        "payment.confirmed",
        "payment.refunded",
        "payment.refunded",
    ]
    assert events(db)[2]["data"]["status"] == "refunded"
    assert events(db)[-1]["data"]["refunded_amount"] == 10


def test_a_rejected_payment_is_answered_with_its_receipt(
    local: LocalCluster, tmp_path: Path
) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        request = {"from": payer, "to": payee, "amount": 10**15, "capture": True}
        payment = ok(await service.create_payment(ALICE, "big", request), "rejected")
        assert payment["reason"] == "insufficient_funds"
        verdict = service.verify_receipt(payment["receipt"]["data"])
        assert (verdict["outcome"], verdict["outcome_reason"]) == ("rejected", "insufficient_funds")

    with_gateway(local, db, body)
    assert [event["type"] for event in events(db)] == ["payment.rejected"]


def test_other_clients_accounts_are_403_and_bad_keys_401(
    local: LocalCluster, tmp_path: Path
) -> None:
    db = tmp_path / "g.db"
    alices, bobs = owned(local, 0), owned(local, 1)
    database = Database(db)
    _key, alice_token = database.create_key(0)
    revoked, revoked_token = database.create_key(0)
    database.revoke_key(revoked.key_id)
    _key, carol_token = database.create_key(2)  # client 2: not served by this gateway
    database.close()

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        caller = await gateway.authenticate(f"Bearer {alice_token}")
        assert caller.client_id == 0
        for header in (None, "", "Bearer nope", f"Basic {alice_token}", f"Bearer {revoked_token}"):
            refused = await problem(gateway.authenticate(header))
            assert (refused.status, refused.field) == (401, "Authorization")
        carol = await problem(gateway.authenticate(f"Bearer {carol_token}"))
        assert carol.status == 403 and carol.extra["client"] == 2

        theft = {"from": alices[0], "to": bobs[0], "amount": 1, "capture": True}
        refused = await problem(service.create_payment(BOB, "steal", theft))
        assert (refused.status, refused.field) == (403, "from")
        assert Database(db).idempotency(1, "steal") is None  # nothing kept
        refused = await problem(service.account(BOB, alices[0]))
        assert (refused.status, refused.field) == (403, "name")
        missing = await problem(service.account(BOB, "no-such-account"))
        assert (missing.status, missing.type_slug, missing.field) == (
            404,
            "unknown-account",
            "name",
        )
        for field in ("from", "to"):
            typo = {"from": bobs[0], "to": bobs[1], "amount": 1, field: "no-such-account"}
            missing = await problem(service.create_payment(BOB, f"typo-{field}", typo))
            assert (missing.status, missing.type_slug, missing.field) == (
                422,
                "unknown-account",
                field,
            )
            assert Database(db).idempotency(1, f"typo-{field}") is None

        held = ok(
            await service.create_payment(
                caller,
                "hold",
                {"from": alices[0], "to": alices[1], "amount": 2, "capture": False},
            ),
            "held",
        )
        # Bob owns neither side: he cannot even see it.
        hidden = await problem(service.capture(BOB, "c", held["id"], None))
        assert hidden.status == 404
        # A hold for Bob's account: Bob (the payee's owner) captures, Alice may not.
        for_bob = ok(
            await service.create_payment(
                caller, "hold-2", {"from": alices[0], "to": bobs[0], "amount": 2, "capture": False}
            ),
            "held",
        )
        refused = await problem(service.capture(ALICE, "c2", for_bob["id"], None))
        assert refused.status == 403
        ok(await service.capture(BOB, "c3", for_bob["id"], 1), "captured")
        assert (await service.get_payment(BOB, for_bob["id"]))["captured_amount"] == 1

    with_gateway(local, db, body)


def test_listing_pages_newest_first(local: LocalCluster, tmp_path: Path) -> None:
    payer, payee = owned(local, 0)
    other = owned(local, 1)[0]

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        made = []
        for index in range(5):
            to = payee if index % 2 == 0 else other
            request = {"from": payer, "to": to, "amount": 1, "capture": True}
            made.append(ok(await service.create_payment(ALICE, f"l{index}", request))["id"])
        seen: list[str] = []
        after: str | None = None
        while True:
            page = await service.list_payments(ALICE, None, 2, after)
            assert page["object"] == "list" and len(page["data"]) <= 2
            seen += [payment["id"] for payment in page["data"]]
            if not page["has_more"]:
                break
            after = seen[-1]
        assert seen == made[::-1]
        only = await service.list_payments(ALICE, other, 100, None)
        assert [payment["id"] for payment in only["data"]] == [made[3], made[1]]
        # Bob owns `other`: he sees the payments to it, and only those.
        bobs = await service.list_payments(BOB, None, 100, None)
        assert [payment["id"] for payment in bobs["data"]] == [made[3], made[1]]
        for limit in (0, 101):
            bad = await problem(service.list_payments(ALICE, None, limit, None))
            assert (bad.status, bad.type_slug, bad.field) == (400, "invalid-parameter", "limit")
        bad = await problem(service.list_payments(ALICE, None, 10, "pay_9_9"))
        assert (bad.status, bad.field) == (404, "starting_after")
        bad = await problem(service.list_payments(BOB, None, 10, made[0]))
        assert bad.status == 404  # not one of Bob's

    with_gateway(local, tmp_path / "g.db", body)


def test_opened_accounts_belong_to_their_opener(local: LocalCluster, tmp_path: Path) -> None:
    name = f"shop-{tmp_path.name[-8:]}"

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        opened = await service.open_account(ALICE, "open-1", name)
        assert opened.status_code == 200, opened.body
        account = opened.json()
        assert (account["status"], account["owner"], account["name"]) == ("open", 0, name)
        assert service.verify_receipt(account["receipt"]["data"])["op"] == "open_account"
        assert await gateway.owner(name) == 0
        twice = await service.open_account(ALICE, "open-2", name)
        assert twice.status_code == 409 and twice.json()["reason"] == "account_exists"
        read = await settled(service, ALICE, name, account["seq"])
        assert (read["available"], read["held"]) == (0, 0)
        refused = await problem(service.account(BOB, name))
        assert refused.status == 403
        payee = owned(local, 0)[0]
        refused = await problem(
            service.create_payment(BOB, "x", {"from": name, "to": payee, "amount": 1})
        )
        assert refused.status == 403

    with_gateway(local, tmp_path / "g.db", body)


def test_receipt_verification_never_fails_on_garbage(local: LocalCluster, tmp_path: Path) -> None:
    payer, payee = owned(local, 0)

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        payment = ok(
            await service.create_payment(
                ALICE, "v", {"from": payer, "to": payee, "amount": 1, "capture": True}
            )
        )
        data = payment["receipt"]["data"]
        assert service.verify_receipt(data)["valid"] is True
        import base64

        raw = bytearray(base64.b64decode(data))
        raw[-5] ^= 0x01
        tampered = service.verify_receipt(base64.b64encode(bytes(raw)).decode())
        assert tampered["valid"] is False and tampered["verdict"] in ("invalid", "unreadable")
        for garbage in ("", "!!!", "AAAA", base64.b64encode(b"\x93\x01\x02").decode(), "A" * 10**7):
            verdict = service.verify_receipt(garbage)
            assert verdict["valid"] is False and verdict["verdict"] == "unreadable", verdict

    with_gateway(local, tmp_path / "g.db", body)


def test_the_background_task_marks_an_expired_hold(local: LocalCluster, tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    payer, payee = owned(local, 0)

    async def body(gateway: Gateway) -> None:
        service = gateway.service
        request = {"from": payer, "to": payee, "amount": 4, "capture": False}
        held = ok(await service.create_payment(ALICE, "short", {**request, "expires_in_ms": 200}))
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run, gateway, expiry_interval_s=0.05))
            await trio.sleep(0.4)
            # A batch after the expiry: the cluster releases the hold at its start.
            ok(await service.create_payment(ALICE, "tick", {**request, "capture": True}))
            for _ in range(200):
                if (await service.get_payment(ALICE, held["id"]))["status"] == "expired":
                    break
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert (await service.get_payment(ALICE, held["id"]))["status"] == "expired"
        assert service.counts["expired"] == 1

    with_gateway(local, db, body)
    assert [event["type"] for event in events(db)] == [
        "payment.held",
        "payment.confirmed",
        "payment.expired",
    ]
