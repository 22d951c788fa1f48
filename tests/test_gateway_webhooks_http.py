"""Webhooks through a real gateway process and a real 4-replica cluster: payments made over HTTP
reach a test receiver on 127.0.0.1 as signed events (checked with verify_signature), a
refused delivery is retried, GET /v1/events shows them delivered, /metrics counts them, and a
gateway killed with SIGKILL while a delivery is refused delivers exactly that one after its
restart.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio
from gateway_harness import HTTP_TIMEOUT_S, GatewayHarness
from webhook_receiver import Received, Receiver

from gateway.webhooks import DELIVERED, verify_signature


def test_payments_reach_a_receiver_as_signed_events_also_across_a_gateway_kill(
    tmp_path: Path,
) -> None:
    # The test receiver listens on 127.0.0.1: the operator's opt-in.
    with GatewayHarness.start(
        tmp_path, clients=2, extra=("--webhook-allow-private",)
    ) as harness:
        tokens = [harness.create_key(0), harness.create_key(1)]
        accounts = harness.local.cluster.accounts
        mine = sorted(name for name, account in accounts.items() if account.owner == 0)
        assert len(mine) >= 2
        payer, payee = mine[0], mine[1]
        balance = accounts[payer].balance
        refusing = [False]
        answered: list[Received] = []  # requests answered 200

        def answer(request: Received, number: int) -> int:
            # The very first request is refused (a retry follows); later, while `refusing`.
            if number == 0 or refusing[0]:
                return 500
            answered.append(request)
            return 200

        async def main() -> None:
            with trio.fail_after(240):
                async with trio.open_nursery() as nursery:
                    receiver = Receiver(answer=answer)
                    other = Receiver()  # client 1's endpoint: sees none of client 0's events
                    await nursery.start(receiver.serve)
                    await nursery.start(other.serve)
                    await session(receiver, other)
                    nursery.cancel_scope.cancel()

        def client(token: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=harness.gateway.url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=HTTP_TIMEOUT_S,
            )

        async def pay(http: httpx.AsyncClient, key: str, body: dict) -> dict:
            response = await http.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
            assert response.status_code == 200, response.text
            return response.json()

        async def session(receiver: Receiver, other: Receiver) -> None:
            async with client(tokens[0]) as http, client(tokens[1]) as theirs:
                created = await http.post("/v1/webhook_endpoints", json={"url": receiver.url})
                assert created.status_code == 200, created.text
                secret = created.json()["secret"]
                other_created = await theirs.post("/v1/webhook_endpoints", json={"url": other.url})
                assert other_created.status_code == 200, other_created.text

                paid = await pay(http, "p1", {"from": payer, "to": payee, "amount": 5})
                held = await pay(
                    http, "p2", {"from": payer, "to": payee, "amount": 7, "capture": False}
                )
                too_much = {"from": payer, "to": payee, "amount": balance * 10}
                rejected = await pay(http, "p3", too_much)
                assert (paid["status"], held["status"], rejected["status"]) == (
                    "confirmed",
                    "held",
                    "rejected",
                )
                voided = await http.post(
                    f"/v1/payments/{held['id']}/void", headers={"Idempotency-Key": "p4"}
                )
                assert voided.status_code == 200 and voided.json()["status"] == "voided"

                kinds = {"payment.confirmed", "payment.held", "payment.rejected", "payment.voided"}
                await receiver.wait_for(lambda _: {event_type(r) for r in answered} == kinds)
                for request in receiver.requests:
                    header = request.headers["pbft-signature"]
                    assert verify_signature(secret, header, request.body)
                    assert not verify_signature(secret, header, request.body + b"x")
                refused = receiver.requests[0].event_id  # retried later, then answered
                assert [r.event_id for r in receiver.requests].count(refused) == 2

                events = await until_delivered(http, 4)
                assert {e["type"] for e in events} == kinds
                assert {e["data"]["id"] for e in events} == {paid["id"], held["id"], rejected["id"]}
                listed = (await http.get("/v1/events?type=payment.voided")).json()["data"]
                assert [e["data"]["status"] for e in listed] == ["voided"]

                text = (await http.get("/metrics")).text
                assert counter(text, "delivered") >= 4 and counter(text, "retry") >= 1

                # Killed while a delivery is being refused: after the restart, exactly that
                # event is delivered, and none of the four already delivered again.
                refusing[0] = True
                fifth = await pay(http, "p5", {"from": payer, "to": payee, "amount": 3})
                await receiver.wait_for(
                    lambda requests: any(r.body.find(fifth["id"].encode()) > 0 for r in requests)
                )
                before = len(receiver.requests)
                await trio.to_thread.run_sync(harness.gateway.kill)
                refusing[0] = False
                await trio.to_thread.run_sync(harness.gateway.start)
            async with client(tokens[0]) as http:
                await receiver.wait_for(lambda _: len(answered) == 5)
                after = receiver.requests[before:]
                assert len({r.event_id for r in after}) == 1
                assert fifth["id"].encode() in after[-1].body
                assert verify_signature(secret, after[-1].headers["pbft-signature"], after[-1].body)
                await until_delivered(http, 5)
            assert other.requests == []

        trio.run(main)
        # The cluster agrees: 5 + 3 moved once each, the hold released, the rejection nothing.
        moved = harness.balances([payer, payee])
        assert moved == {payer: balance - 8, payee: accounts[payee].balance + 8}


def event_type(request: Received) -> str:
    return str(json.loads(request.body)["type"])


def counter(metrics_text: str, result: str) -> float:
    """gateway_webhook_deliveries_total{result="..."} in the Prometheus text."""
    prefix = f'gateway_webhook_deliveries_total{{result="{result}"}} '
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


async def until_delivered(http: httpx.AsyncClient, count: int) -> list[dict]:
    """GET /v1/events until `count` events are listed, each delivered to its one endpoint
    (the caller bounds the wait)."""
    while True:
        events = (await http.get("/v1/events?limit=100")).json()["data"]
        if len(events) == count and all(
            [d["state"] for d in e["deliveries"]] == [DELIVERED] for e in events
        ):
            return events
        await trio.sleep(0.1)
