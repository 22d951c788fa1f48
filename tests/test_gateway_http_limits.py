"""The HTTP layer's bounds on what an unauthenticated peer can make the gateway hold or
keep (review findings G2, G6, G8, G9 of issue 12): a body deadline (408) and hypercorn's
read timeout, a cap on requests in flight (503), a bounded cost for wrong tokens, refused
duplicate JSON keys, amounts within JavaScript's safe integers, and metric labels from
closed sets. In process (httpx's ASGI transport) where that is enough; through a real
hypercorn on 127.0.0.1 for what only the server does (closing a stalled connection).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve

from gateway import metrics
from gateway.app import MAX_API_AMOUNT, create_app
from gateway.auth_http import MAX_CONCURRENT_LOOKUPS
from gateway.errors import unauthorized
from gateway.keys import Caller
from gateway.server import hypercorn_config, read_timeout_for

TOKEN = "gk_" + "t" * 43
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k1"}
PAYMENT = {"from": "a", "to": "b", "amount": 1}


class _Service:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.release = trio.Event()
        self.block = False

    async def create_payment(self, caller: Caller, key: str, body: dict[str, Any]) -> Any:
        self.calls.append(body)
        if self.block:
            await self.release.wait()
        return SimpleNamespace(status_code=200, body=b'{"object":"payment"}')


class _Gateway:
    """What the app reads of a Gateway; `authenticate` counts its store lookups."""

    def __init__(self) -> None:
        self.service = _Service()
        self.clients: dict[int, Any] = {0: None}
        self.node = None
        self.lookups = 0
        self.concurrent = 0
        self.most_concurrent = 0
        self.lookup_s = 0.0

    async def authenticate(self, authorization: str | None) -> Caller:
        self.lookups += 1
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await trio.sleep(self.lookup_s)
        finally:
            self.concurrent -= 1
        if authorization != f"Bearer {TOKEN}":
            raise unauthorized("unknown or revoked API key")
        return Caller(client_id=0, key_id=1)


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


# --- G2: stalled bodies, requests in flight, wrong tokens ----------------------------------


def test_a_body_that_stalls_is_408_after_the_deadline_and_never_reaches_the_service() -> None:
    gateway = _Gateway()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"from": "a", '
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    async def main() -> httpx.Response:
        async with _client(create_app(gateway, body_timeout_s=0.3)) as http:
            with trio.fail_after(10):  # without the deadline: no answer at all
                return await http.post(
                    "/v1/payments",
                    content=stalled(),
                    headers={**HEADERS, "Content-Type": "application/json"},
                )

    response = trio.run(main)
    assert response.status_code == 408, response.text
    assert response.json()["type"].endswith("/body-timeout")
    assert response.headers["connection"] == "close"
    assert gateway.service.calls == [] and gateway.lookups == 0


async def _raw_exchange(url: str, payload: bytes, limit_s: float) -> tuple[bytes, float]:
    """Send `payload`, then read until the server closes: what it answered and how long
    it took. Fails (TooSlowError) if it is still open after `limit_s`."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    started = trio.current_time()
    answer = b""
    async with stream:
        await stream.send_all(payload)
        with trio.fail_after(limit_s):
            while data := await stream.receive_some(4096):
                answer += data
    return answer, trio.current_time() - started


async def _served(app: Any, read_timeout_s: int, run: Any) -> Any:
    config = hypercorn_config("127.0.0.1", 0, 1.0, read_timeout_s)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: hypercorn_serve(
                app, config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        try:
            return await run(binds[0])
        finally:
            stop.set()


STALLED = (
    b"POST /v1/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Idempotency-Key: k\r\nContent-Length: 100\r\n\r\n{"
)


def test_hypercorn_answers_a_stalled_body_408_and_closes_the_connection() -> None:
    """The review's slowloris through the real server, with no Authorization at all."""
    gateway = _Gateway()
    app = create_app(gateway, body_timeout_s=0.5)
    answer, took = trio.run(_served, app, 60, lambda url: _raw_exchange(url, STALLED, 10))
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 0.4 <= took < 10
    assert gateway.service.calls == [] and gateway.lookups == 0


def test_hypercorn_closes_a_connection_silent_past_its_read_timeout() -> None:
    """The backstop behind the body deadline: with the app's deadline out of reach,
    hypercorn's read timeout still drops the silent peer."""
    app = create_app(_Gateway(), body_timeout_s=3600)
    answer, took = trio.run(_served, app, 1, lambda url: _raw_exchange(url, STALLED, 10))
    assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]
    assert 0.9 <= took < 10


def test_the_read_timeout_is_set_and_outlasts_the_cluster_calls_of_a_request() -> None:
    assert hypercorn_config("127.0.0.1", 0, 1.0).read_timeout == read_timeout_for(10.0) == 60
    assert read_timeout_for(100.0) > 3 * 100.0


def test_requests_past_the_cap_are_503_at_once_and_the_cap_frees_up() -> None:
    gateway = _Gateway()
    gateway.service.block = True
    app = create_app(gateway, max_requests=2)
    answers: list[int] = []

    async def pay(http: httpx.AsyncClient) -> None:
        response = await http.post("/v1/payments", json=PAYMENT, headers=HEADERS)
        answers.append(response.status_code)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as http:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pay, http)
                    nursery.start_soon(pay, http)
                    while len(gateway.service.calls) < 2:
                        await trio.sleep(0.01)
                    refused = await http.post("/v1/payments", json=PAYMENT, headers=HEADERS)
                    gateway.service.release.set()
                after = await http.post("/v1/payments", json=PAYMENT, headers=HEADERS)
        return refused, after

    refused, after = trio.run(main)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["type"].endswith("/overloaded")
    assert answers == [200, 200]
    assert after.status_code == 200
    assert len(gateway.service.calls) == 3  # the refused one never reached the service


def test_a_wrong_token_is_looked_up_once_then_refused_from_memory() -> None:
    gateway = _Gateway()
    app = create_app(gateway)
    wrong = {"Authorization": "Bearer gk_" + "w" * 43, "Idempotency-Key": "k"}

    async def main() -> list[int]:
        async with _client(app) as http:
            codes = []
            for _ in range(20):
                response = await http.post("/v1/payments", json=PAYMENT, headers=wrong)
                codes.append(response.status_code)
            codes.append(
                (await http.post("/v1/payments", json=PAYMENT, headers=HEADERS)).status_code
            )
            return codes

    codes = trio.run(main)
    assert codes == [401] * 20 + [200]
    assert gateway.lookups == 2  # the wrong token once, the right one once
    assert app.state.token_guard.refused_from_memory == 19


def test_fresh_wrong_tokens_wait_for_a_bounded_number_of_lookup_slots() -> None:
    gateway = _Gateway()
    gateway.lookup_s = 0.02
    app = create_app(gateway)

    async def main() -> list[int]:
        codes: list[int] = []

        async def one(i: int) -> None:
            headers = {"Authorization": f"Bearer gk_{i:043d}", "Idempotency-Key": "k"}
            response = await http.post("/v1/payments", json=PAYMENT, headers=headers)
            codes.append(response.status_code)

        async with _client(app) as http:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(40):
                        nursery.start_soon(one, i)
        return codes

    codes = trio.run(main)
    assert codes == [401] * 40
    assert gateway.lookups == 40
    assert gateway.most_concurrent == MAX_CONCURRENT_LOOKUPS


# --- G6: duplicate JSON keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"from": "a", "to": "b", "amount": 1, "amount": 2}', "amount"),
        (b'{"from": "a", "to": "b", "amount": 1, "metadata": {"k": "1", "k": "2"}}', "k"),
    ],
)
def test_a_duplicate_json_key_is_400_naming_the_key(raw: bytes, key: str) -> None:
    gateway = _Gateway()

    async def main() -> httpx.Response:
        async with _client(create_app(gateway)) as http:
            return await http.post(
                "/v1/payments",
                content=raw,
                headers={**HEADERS, "Content-Type": "application/json"},
            )

    response = trio.run(main)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["type"].endswith("/malformed-json")
    assert problem["key"] == key and repr(key) in problem["detail"]
    assert gateway.service.calls == []


# --- G8: amounts within JavaScript's safe integers ------------------------------------------


def test_amounts_past_javascripts_safe_integers_are_422_and_the_schema_says_so() -> None:
    gateway = _Gateway()

    async def main() -> list[httpx.Response]:
        async with _client(create_app(gateway)) as http:
            return [
                await http.post("/v1/payments", json={**PAYMENT, "amount": amount}, headers=HEADERS)
                for amount in (2**53 + 1, 2**53, 2**53 - 1)
            ] + [await http.get("/openapi.json")]

    too_big, too_big_even, largest, openapi = trio.run(main)
    for response in (too_big, too_big_even):
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "amount"
    assert largest.status_code == 200, largest.text
    assert [call["amount"] for call in gateway.service.calls] == [2**53 - 1]
    assert MAX_API_AMOUNT == 2**53 - 1
    schemas = openapi.json()["components"]["schemas"]
    assert schemas["PaymentCreate"]["properties"]["amount"]["maximum"] == 2**53 - 1
    assert schemas["RefundBody"]["properties"]["amount"]["maximum"] == 2**53 - 1


# --- G9: metric labels from closed sets ------------------------------------------------------


def _method_labels() -> set[str]:
    return {
        sample.labels["method"]
        for family in metrics.http_requests.collect()
        for sample in family.samples
    }


def test_unknown_request_methods_are_counted_as_other() -> None:
    async def main() -> list[int]:
        async with _client(create_app(_Gateway())) as http:
            return [(await http.request(f"XAB{i}", "/healthz")).status_code for i in range(50)]

    codes = trio.run(main)
    assert set(codes) == {405}
    labels = _method_labels()
    assert not any(label.startswith("XAB") for label in labels), sorted(labels)
    assert "other" in labels
    assert labels <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
