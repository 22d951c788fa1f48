"""GET /v1/cluster and the dashboard's files, from a gateway process that hosts replica 3
itself (`pbft gateway --replica 3`), with three more replica processes: every replica
answers for itself, the embedded one included; no key is 401; concurrent requests share
one status query; the page and its script and style are served
with no build step."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from gateway_harness import GatewayHarness

from gateway.routes_cluster import CACHE_S, ClusterStatus
from pbft.client import ReplicaStatus
from runtime.client import PaymentClient


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHarness]:
    root = tmp_path_factory.mktemp("dashboard-embedded")
    with GatewayHarness.start(root, clients=1, replica=3) as started:
        yield started


def test_the_cluster_with_an_embedded_replica(harness: GatewayHarness) -> None:
    token = harness.create_key(0)
    with harness.http(token) as http:
        paid = http.post(
            "/v1/payments",
            json={"from": "acct-00000", "to": "acct-00001", "amount": 4},
            headers={"Idempotency-Key": "embedded-1"},
        )
        assert paid.status_code == 200, paid.text
        seq = paid.json()["seq"]
        answer = http.get("/v1/cluster")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    cluster = harness.local.cluster
    assert body["cluster"] == cluster.cluster_id.hex()[:16]
    assert (body["n"], body["f"], body["embedded_replica"]) == (4, 1, 3)
    replicas = body["replicas"]
    assert [replica["id"] for replica in replicas] == [0, 1, 2, 3]
    for replica, address in zip(replicas, cluster.replicas, strict=True):
        assert set(replica) == {
            "id",
            "address",
            "connected",
            "answered",
            "view",
            "view_status",
            "last_executed",
            "stable_checkpoint",
        }
        assert replica["address"] == f"{address.host}:{address.port}"
        assert replica["connected"] is True and replica["answered"] is True, replica
        assert replica["view"] >= 0 and replica["view_status"] == "normal"
        assert replica["stable_checkpoint"] <= replica["last_executed"]
    # One view (it was decided in it; a slow start may have cost a view change).
    assert len({replica["view"] for replica in replicas}) == 1
    # f + 1 replicas at least had executed the payment when it was decided.
    assert sum(replica["last_executed"] >= seq for replica in replicas) >= 2


def test_the_cluster_needs_a_key(harness: GatewayHarness) -> None:
    with harness.http() as http:
        answer = http.get("/v1/cluster")
    assert answer.status_code == 401
    assert answer.headers["content-type"].startswith("application/problem+json")
    with harness.http("gk_wrong") as http:
        assert http.get("/v1/cluster").status_code == 401


def test_concurrent_requests_share_one_status_query(harness: GatewayHarness) -> None:
    """However many dashboards poll at once, the replicas see one status query per client
    per CACHE_S: concurrent askers wait for the query in flight and take its answer."""
    asked: list[float] = []

    async def scenario() -> None:
        async with PaymentClient(harness.local.cluster, 0, timeout_s=30) as client:
            await client.wait_connected(timeout_s=60)
            real = client.replica_status

            async def counted(timeout_s: float = 1.0) -> dict[int, ReplicaStatus | None]:
                asked.append(trio.current_time())
                return await real(timeout_s)

            client.replica_status = counted  # type: ignore[method-assign]
            shared = ClusterStatus()
            answers: list[dict[int, ReplicaStatus | None]] = []

            async def ask() -> None:
                answers.append(await shared.statuses(client))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(ask)
            assert len(asked) == 1 and len(answers) == 5
            assert all(answer is answers[0] for answer in answers)
            assert all(status is not None for status in answers[0].values())
            await trio.sleep(CACHE_S)
            later = await shared.statuses(client)
            assert len(asked) == 2 and later is not answers[0]

    trio.run(scenario)


def test_the_page_and_its_files_are_served(harness: GatewayHarness) -> None:
    with harness.http() as http:
        page = http.get("/")
        script = http.get("/dashboard.js")
        style = http.get("/dashboard.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/dashboard.js"' in page.text and "Content-Security-Policy" in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    # Markup is never built from strings (the browser test checks what it renders).
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script.text, sink
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")


def test_the_openapi_document_describes_the_cluster_route(harness: GatewayHarness) -> None:
    with harness.http() as http:
        document = http.get("/openapi.json").json()
    operation = document["paths"]["/v1/cluster"]["get"]
    schema_ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert schema_ref.endswith("/ClusterView")
    replica = document["components"]["schemas"]["ReplicaView"]["properties"]
    assert {"connected", "answered", "view", "last_executed", "stable_checkpoint"} <= set(replica)
