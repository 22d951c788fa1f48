"""The gateway when processes die: kill -9 of the gateway between submitting a payment and
answering it, SIGTERM with a request in flight, a cluster too slow to answer (504, then the
retry), a gateway hosting a replica (`--replica`), and a replica killed during a stream of
payments. Each test has its own cluster and gateway; the checks are the cluster's balances
(read directly, f + 1 replicas agree) against what the gateway answered: no payment lost,
none made twice.

"Between submit and answer" is made reliable by pausing two of the four replicas
(SIGSTOP): the request reaches the cluster but no quorum can decide it until they continue.
"""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import HTTP_TIMEOUT_S, GatewayHarness

A0, B0 = "acct-00000", "acct-00002"
PAUSED = (2, 3)  # with two of four replicas stopped no quorum forms (replica 0 is primary)
DEADLINE_S = 120.0


@contextmanager
def paused(harness: GatewayHarness, replicas: tuple[int, ...] = PAUSED) -> Iterator[None]:
    """Replicas stopped (SIGSTOP) for the block, continued (SIGCONT) whatever happens."""
    for replica in replicas:
        harness.local.processes[replica].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for replica in replicas:
            harness.local.processes[replica].send_signal(signal.SIGCONT)


def recorded(db: Path, client: int, key: str, timeout_s: float = 30.0) -> tuple[int, str]:
    """(request id, state) the gateway wrote for `key` before sending (polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        connection = sqlite3.connect(db, timeout=5)
        try:
            row = connection.execute(
                "SELECT request_id, state FROM idempotency WHERE client_id = ? AND key = ?",
                (client, key),
            ).fetchone()
        except sqlite3.OperationalError:  # the schema not created yet
            row = None
        finally:
            connection.close()
        if row is not None:
            return int(row[0]), str(row[1])
        time.sleep(0.05)
    raise AssertionError(f"no idempotency record for {key!r} within {timeout_s:g} s")


def post_payment(url: str, token: str, key: str, body: dict[str, Any]) -> httpx.Response:
    """One POST /v1/payments on its own connection (to run in a thread)."""
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        return http.post(
            "/v1/payments",
            json=body,
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        )


def pay_until_decided(
    url: str, token: str, key: str, body: dict[str, Any], deadline: float
) -> tuple[httpx.Response, int]:
    """POST with the same key until the gateway answers 200 (a 504, a refused connection or
    a 409 while the first attempt is still in flight: retry); the answer and the tries."""
    tries = 0
    while True:
        tries += 1
        try:
            response = post_payment(url, token, key, body)
            if response.status_code == 200:
                return response, tries
            assert response.status_code in (409, 504), response.text
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"payment {key} undecided after {tries} tries")
        time.sleep(0.2)


def restart_gateway(harness: GatewayHarness) -> None:
    harness.gateway.start()
    harness.wait_connected()


def test_a_gateway_killed_between_submit_and_answer_pays_exactly_once_on_retry(
    tmp_path: Path,
) -> None:
    extra = ("--cluster-timeout-s", "60")
    with GatewayHarness.start(tmp_path, clients=2, extra=extra) as harness:
        token = harness.create_key(0)
        before = harness.balances([A0, B0])
        key, body = uuid.uuid4().hex, {"from": A0, "to": B0, "amount": 777}
        with ThreadPoolExecutor(1) as pool, paused(harness):
            answer: Future[httpx.Response] = pool.submit(
                post_payment, harness.gateway.url, token, key, body
            )
            request_id, state = recorded(harness.gateway.db, 0, key)
            assert state == "in_flight"
            time.sleep(0.5)  # the request reaches the replicas that run
            harness.gateway.kill()
            with pytest.raises(httpx.TransportError):
                answer.result(timeout=HTTP_TIMEOUT_S)
        # The cluster may decide the request now, with no gateway to hear it; the retry
        # resubmits the same request id and gets that decision (or makes it), never a second.
        restart_gateway(harness)
        with harness.http(token) as http:
            retried = http.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
            assert retried.status_code == 200, retried.text
            payment = retried.json()
            assert (payment["id"], payment["status"]) == (f"pay_0_{request_id}", "confirmed")
            again = http.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
            assert again.content == retried.content
        after = harness.balances([A0, B0])
        assert after == {A0: before[A0] - 777, B0: before[B0] + 777}


def test_a_restarted_gateway_resumes_an_unanswered_payment_by_itself(tmp_path: Path) -> None:
    extra = ("--cluster-timeout-s", "60")
    with GatewayHarness.start(tmp_path, clients=2, extra=extra) as harness:
        token = harness.create_key(0)
        before = harness.balances([A0, B0])
        key, body = uuid.uuid4().hex, {"from": A0, "to": B0, "amount": 55}
        with ThreadPoolExecutor(1) as pool, paused(harness):
            answer = pool.submit(post_payment, harness.gateway.url, token, key, body)
            request_id, _state = recorded(harness.gateway.db, 0, key)
            harness.gateway.kill()
            with pytest.raises(httpx.TransportError):
                answer.result(timeout=HTTP_TIMEOUT_S)
        restart_gateway(harness)
        payment_id = f"pay_0_{request_id}"
        deadline = time.monotonic() + DEADLINE_S
        with harness.http(token) as http:
            while True:  # nobody retries: the gateway's resume task settles it
                got = http.get(f"/v1/payments/{payment_id}")
                assert got.status_code == 200, got.text
                if got.json()["status"] != "pending":
                    break
                assert time.monotonic() < deadline, got.text
                time.sleep(0.2)
            assert got.json()["status"] == "confirmed"
            replay = http.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
            assert replay.status_code == 200 and replay.json()["id"] == payment_id
        assert harness.balances([A0, B0]) == {A0: before[A0] - 55, B0: before[B0] + 55}


def test_a_slow_cluster_is_504_with_the_payment_id_and_a_second_try_meanwhile_is_409(
    tmp_path: Path,
) -> None:
    extra = ("--cluster-timeout-s", "2")
    with GatewayHarness.start(tmp_path, clients=2, extra=extra) as harness:
        token = harness.create_key(0)
        before = harness.balances([A0, B0])
        key, body = uuid.uuid4().hex, {"from": A0, "to": B0, "amount": 31}
        with ThreadPoolExecutor(1) as pool, paused(harness):
            answer = pool.submit(post_payment, harness.gateway.url, token, key, body)
            request_id, _state = recorded(harness.gateway.db, 0, key)
            second = post_payment(harness.gateway.url, token, key, body)
            first = answer.result(timeout=HTTP_TIMEOUT_S)
            with harness.http(token) as http:
                pending = http.get(f"/v1/payments/pay_0_{request_id}")
        assert second.status_code == 409, second.text
        assert second.json()["type"].endswith("/idempotency-key-in-flight")
        assert first.status_code == 504, first.text
        assert first.headers["content-type"] == "application/problem+json"
        assert first.json()["payment_id"] == f"pay_0_{request_id}"
        assert pending.status_code == 200 and pending.json()["status"] == "pending"
        retried, _tries = pay_until_decided(
            harness.gateway.url, token, key, body, time.monotonic() + DEADLINE_S
        )
        assert retried.json()["id"] == f"pay_0_{request_id}"
        assert retried.json()["status"] == "confirmed"
        assert harness.balances([A0, B0]) == {A0: before[A0] - 31, B0: before[B0] + 31}


def test_sigterm_answers_the_request_in_flight_then_exits_0(tmp_path: Path) -> None:
    extra = ("--cluster-timeout-s", "60", "--graceful-timeout-s", "60")
    with GatewayHarness.start(tmp_path, clients=2, extra=extra) as harness:
        token = harness.create_key(0)
        key, body = uuid.uuid4().hex, {"from": A0, "to": B0, "amount": 12}
        url = harness.gateway.url
        with ThreadPoolExecutor(1) as pool:
            with paused(harness):
                answer = pool.submit(post_payment, url, token, key, body)
                recorded(harness.gateway.db, 0, key)
                harness.gateway.terminate()
                deadline = time.monotonic() + 30
                while not any(r.get("event") == "draining" for r in harness.gateway.records()):
                    assert time.monotonic() < deadline, harness.gateway.log_tail()
                    time.sleep(0.05)
                # Draining: no new connection is accepted, the old request is still served.
                with pytest.raises(httpx.TransportError):
                    httpx.get(url + "/healthz", timeout=5)
                assert harness.gateway.process is not None
                assert harness.gateway.process.poll() is None
            response = answer.result(timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "confirmed"
        assert harness.gateway.wait() == 0
        events = [record.get("event") for record in harness.gateway.records()]
        assert events[-3:] == ["signal", "draining", "stopped"], events


def test_a_gateway_hosting_a_replica_serves_and_recovers_it_after_kill_9(
    tmp_path: Path,
) -> None:
    with GatewayHarness.start(tmp_path, clients=2, replica=3) as harness:
        token = harness.create_key(0)
        with harness.http(token) as http:
            health = http.get("/healthz").json()
            assert health["replica"]["id"] == 3 and health["replica"]["state"] == "running"
            seqs = [
                http.post(
                    "/v1/payments",
                    json={"from": A0, "to": B0, "amount": amount},
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                ).json()["seq"]
                for amount in (1, 2, 3)
            ]
            wait_replica_executed(http, max(seqs))
        before = harness.balances([A0, B0])
        harness.gateway.kill()  # the replica dies with it
        restart_gateway(harness)
        with harness.http(token) as http:
            paid = http.post(
                "/v1/payments",
                json={"from": A0, "to": B0, "amount": 4},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert paid.status_code == 200 and paid.json()["status"] == "confirmed"
            wait_replica_executed(http, paid.json()["seq"])
        assert harness.balances([A0, B0]) == {A0: before[A0] - 4, B0: before[B0] + 4}
        replica_log = [record for record in harness.gateway.records() if record.get("replica") == 3]
        assert any(record.get("event") == "start" for record in replica_log)


def wait_replica_executed(http: httpx.Client, seq: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        replica = http.get("/healthz").json().get("replica", {})
        if replica.get("last_executed", 0) >= seq:
            return
        assert time.monotonic() < deadline, replica
        time.sleep(0.1)


def test_a_replica_killed_during_a_stream_of_payments_loses_and_doubles_none(
    tmp_path: Path,
) -> None:
    extra = ("--cluster-timeout-s", "5")
    with GatewayHarness.start(tmp_path, clients=2, extra=extra) as harness:
        token = harness.create_key(0)
        before = harness.balances([A0, B0])
        amounts = list(range(1, 41))
        keys = {amount: uuid.uuid4().hex for amount in amounts}
        deadline = time.monotonic() + DEADLINE_S
        url = harness.gateway.url

        def one(amount: int) -> tuple[httpx.Response, int]:
            body = {"from": A0, "to": B0, "amount": amount}
            return pay_until_decided(url, token, keys[amount], body, deadline)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, amount) for amount in amounts]
            while sum(future.done() for future in futures) < 8:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            harness.local.kill(0)  # the primary of view 0, mid-stream
            results = [future.result(timeout=DEADLINE_S) for future in futures]
        harness.local.start(0)
        payments = [response.json() for response, _tries in results]
        assert all(payment["status"] == "confirmed" for payment in payments), payments
        assert len({payment["id"] for payment in payments}) == len(amounts)
        total = sum(amounts)
        after = harness.balances([A0, B0])
        assert after == {A0: before[A0] - total, B0: before[B0] + total}
        # The gateway's own records agree: one confirmed payment per key, none pending.
        with harness.http(token) as http:
            listed = http.get("/v1/payments", params={"account": A0, "limit": 100}).json()
        statuses = {payment["id"]: payment["status"] for payment in listed["data"]}
        assert {payment["id"] for payment in payments} <= set(statuses)
        assert set(statuses.values()) == {"confirmed"}
        assert sum(payment["amount"] for payment in listed["data"]) == total
