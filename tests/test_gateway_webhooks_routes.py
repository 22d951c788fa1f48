"""The webhook routes through the gateway's real app (gateway/app.py's create_app), in process:
auth, per-client isolation, idempotent creation, bad input as problem+json naming the field,
and the events list with delivery states. No cluster: events are written as the payment
service writes them; the dispatcher runs against a real receiver on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from test_gateway_webhooks import FAST, add_event
from webhook_receiver import Receiver, fail_first

from gateway import metrics
from gateway.app import create_app
from gateway.service import Gateway
from gateway.store import GatewayStore
from gateway.webhooks import DELIVERED, verify_signature, webhooks_of


class FakeGateway:
    """What the webhook routes and the `caller` dependency use of a Gateway: its store, the
    clients it serves and the real authenticate (no cluster needed here)."""

    authenticate = Gateway.authenticate

    def __init__(self, store: GatewayStore, clients: list[int]) -> None:
        self.store = store
        self.clients: dict[int, Any] = dict.fromkeys(clients)
        self.node = None


@dataclass
class Http:
    mine: httpx.AsyncClient  # client 0's key
    theirs: httpx.AsyncClient  # client 1's key
    unserved: httpx.AsyncClient  # client 2's key: a client this gateway does not serve
    anonymous: httpx.AsyncClient  # no key
    gateway: FakeGateway


def run_app(tmp_path: Path, session: Callable[[Http], Awaitable[None]]) -> None:
    """`session` against an app over a fake gateway serving clients 0 and 1."""
    store = GatewayStore(tmp_path / "gateway.sqlite")
    tokens = [store.database.create_key(client)[1] for client in (0, 1, 2)]
    gateway = FakeGateway(store, [0, 1])
    app = create_app(gateway)

    def client(token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers=headers
        )

    async def main() -> None:
        http = Http(*[client(token) for token in [*tokens, None]], gateway)
        with trio.fail_after(30):
            await session(http)
        for each in (http.mine, http.theirs, http.unserved, http.anonymous):
            await each.aclose()

    try:
        trio.run(main)
    finally:
        store.close()


def problem(response: httpx.Response, status: int, field: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["type"].startswith("https://")
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_endpoints_are_per_client_and_the_secret_is_shown_once(tmp_path: Path) -> None:
    async def session(http: Http) -> None:
        mine, theirs = http.mine, http.theirs
        created = await mine.post(
            "/v1/webhook_endpoints", json={"url": "https://shop.example/hooks", "description": "d"}
        )
        assert created.status_code == 200 and created.headers["content-type"] == "application/json"
        endpoint = created.json()
        assert endpoint["secret"].startswith("whsec_") and endpoint["url"].endswith("/hooks")
        listed = (await mine.get("/v1/webhook_endpoints")).json()
        assert [e["id"] for e in listed["data"]] == [endpoint["id"]]
        assert "secret" not in listed["data"][0]
        assert (await theirs.get("/v1/webhook_endpoints")).json()["data"] == []
        problem(await theirs.delete(f"/v1/webhook_endpoints/{endpoint['id']}"), 404, "endpoint_id")
        problem(await http.unserved.get("/v1/webhook_endpoints"), 403, "Authorization")
        problem(await http.anonymous.get("/v1/events"), 401, "Authorization")
        anonymous_post = await http.anonymous.post(
            "/v1/webhook_endpoints", json={"url": "https://a.b/"}
        )
        problem(anonymous_post, 401, "Authorization")
        deleted = await mine.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
        assert deleted.json() == {
            "object": "webhook_endpoint",
            "id": endpoint["id"],
            "deleted": True,
        }
        problem(await mine.delete(f"/v1/webhook_endpoints/{endpoint['id']}"), 404, "endpoint_id")

    run_app(tmp_path, session)


def test_creation_with_an_idempotency_key_replays_the_same_bytes(tmp_path: Path) -> None:
    async def session(http: Http) -> None:
        mine = http.mine
        body = {"url": "https://shop.example/hooks"}
        first = await mine.post(
            "/v1/webhook_endpoints", json=body, headers={"Idempotency-Key": "a"}
        )
        again = await mine.post(
            "/v1/webhook_endpoints", json=body, headers={"Idempotency-Key": "a"}
        )
        assert first.status_code == again.status_code == 200
        assert first.content == again.content
        other = await mine.post(
            "/v1/webhook_endpoints",
            json={"url": "https://shop.example/other"},
            headers={"Idempotency-Key": "a"},
        )
        problem(other, 422, "Idempotency-Key")
        assert len((await mine.get("/v1/webhook_endpoints")).json()["data"]) == 1

    run_app(tmp_path, session)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://shop.example/"}, "url"),
        ({"url": "shop.example"}, "url"),
        ({"url": "https://u:p@shop.example/"}, "url"),
        ({"url": "https://shop.example/" + "x" * 3000}, "url"),
        ({"url": 5}, "url"),
        ({}, "url"),
        ({"url": "https://shop.example/", "description": 3}, "description"),
        ({"url": "https://shop.example/", "description": "d" * 501}, "description"),
        ({"url": "https://shop.example/", "events": ["*"]}, "events"),
    ],
)
def test_bad_endpoint_bodies_are_problems_naming_the_field(
    tmp_path: Path, body: dict, field: str
) -> None:
    async def session(http: Http) -> None:
        response = await http.mine.post("/v1/webhook_endpoints", json=body)
        problem(response, 422, field)  # a bad body field, as gateway/app.py answers it

    run_app(tmp_path, session)


def test_too_many_endpoints_and_bad_queries(tmp_path: Path) -> None:
    async def session(http: Http) -> None:
        mine = http.mine
        for number in range(16):
            created = await mine.post(
                "/v1/webhook_endpoints", json={"url": f"https://shop.example/{number}"}
            )
            assert created.status_code == 200
        refused = await mine.post("/v1/webhook_endpoints", json={"url": "https://shop.example/x"})
        problem(refused, 409, None)
        for query, field in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("limit=ten", "limit"),
            ("type=payment.nope", "type"),
            ("starting_after=pay_0_1", "starting_after"),
        ]:
            problem(await mine.get(f"/v1/events?{query}"), 400, field)
        problem(await mine.delete("/v1/webhook_endpoints/nope"), 400, "endpoint_id")

    run_app(tmp_path, session)


def test_events_are_listed_per_client_with_their_delivery_state(tmp_path: Path) -> None:
    async def session(http: Http) -> None:
        mine, theirs, gateway = http.mine, http.theirs, http.gateway
        # FAST retries (the gateway's own default waits a second and more between them).
        hooks = await webhooks_of(gateway, FAST)
        before = metrics.webhook_deliveries.labels(result="delivered")._value.get()
        async with trio.open_nursery() as nursery:
            receiver = Receiver(answer=fail_first(1))
            await nursery.start(receiver.serve)
            created = await mine.post("/v1/webhook_endpoints", json={"url": receiver.url})
            secret = created.json()["secret"]
            conn = hooks.store.conn
            mine_ids = [add_event(conn, 0, kind) for kind in ("payment.held", "payment.captured")]
            add_event(conn, 1)
            await nursery.start(hooks.dispatch)
            await receiver.wait_for(lambda requests: len(requests) >= 3)

            async def delivered() -> bool:
                events = (await mine.get("/v1/events")).json()["data"]
                return all(e["deliveries"][0]["state"] == DELIVERED for e in events)

            await until_async(delivered)
            nursery.cancel_scope.cancel()
        for request in receiver.requests:
            assert verify_signature(secret, request.headers["pbft-signature"], request.body)
        assert {r.event_id for r in receiver.requests} == {f"evt_{i}" for i in mine_ids}
        listed = (await mine.get("/v1/events")).json()
        assert [e["id"] for e in listed["data"]] == [f"evt_{i}" for i in reversed(mine_ids)]
        retried = [e for e in listed["data"] if e["deliveries"][0]["attempts"] == 2]
        assert len(retried) == 1 and retried[0]["deliveries"][0]["last_status"] == 200
        held = (await mine.get("/v1/events?type=payment.held")).json()["data"]
        assert [e["id"] for e in held] == [f"evt_{mine_ids[0]}"]
        page = (await mine.get("/v1/events?limit=1")).json()
        assert page["has_more"] is True
        rest = (await mine.get(f"/v1/events?starting_after={page['data'][0]['id']}")).json()
        assert [e["id"] for e in rest["data"]] == [f"evt_{mine_ids[0]}"]
        theirs_events = (await theirs.get("/v1/events")).json()["data"]
        assert [e["type"] for e in theirs_events] == ["payment.confirmed"]
        assert theirs_events[0]["deliveries"] == []  # client 1 has no endpoint
        after = metrics.webhook_deliveries.labels(result="delivered")._value.get()
        assert after - before == 2

    run_app(tmp_path, session)


async def until_async(predicate: Callable[[], Awaitable[bool]]) -> None:
    while not await predicate():
        await trio.sleep(0.02)


def test_the_openapi_document_describes_the_webhook_routes(tmp_path: Path) -> None:
    async def session(http: Http) -> None:
        document = (await http.anonymous.get("/openapi.json")).json()
        paths = document["paths"]
        assert set(paths["/v1/webhook_endpoints"]) == {"get", "post"}
        assert set(paths["/v1/webhook_endpoints/{endpoint_id}"]) == {"delete"}
        parameters = {p["name"] for p in paths["/v1/events"]["get"]["parameters"]}
        assert {"type", "limit", "starting_after"} <= parameters

    run_app(tmp_path, session)
