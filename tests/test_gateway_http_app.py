"""The HTTP layer's own defences, in process (httpx's ASGI transport, no sockets), for what a
real server and cluster cannot be made to produce on demand: a service that raises what
nobody expected (500 problem, nothing of the internals, logged), a body streamed in chunks
past the limit, a Content-Length that is not a number (hypercorn's parser would refuse it
before the app). The Gateway here is a stand-in with the attributes the app reads; the
real one is in the process tests (test_gateway_http*.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio

from gateway import metrics
from gateway.app import MAX_BODY_BYTES, BodyLimit, create_app
from gateway.errors import unauthorized
from gateway.keys import Caller

TOKEN = "gk_" + "t" * 43
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k1"}
SECRET = "connection string postgres://admin:hunter2@db"


class _Service:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def create_payment(self, caller: Caller, key: str, body: dict[str, Any]) -> Any:
        self.calls.append(("create_payment", body))
        if body["amount"] == 13:
            raise RuntimeError(SECRET)
        return SimpleNamespace(status_code=200, body=b'{"object":"payment"}')


class _Gateway:
    def __init__(self) -> None:
        self.service = _Service()
        self.clients: dict[int, Any] = {0: None}
        self.node = None

    async def authenticate(self, authorization: str | None) -> Caller:
        if authorization != f"Bearer {TOKEN}":
            raise unauthorized("no")
        return Caller(client_id=0, key_id=1)


def _client(gateway: _Gateway) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(gateway), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


def test_an_unexpected_exception_is_a_500_problem_that_says_nothing_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = _Gateway()

    async def main() -> httpx.Response:
        async with _client(gateway) as http:
            return await http.post(
                "/v1/payments", json={"from": "a", "to": "b", "amount": 13}, headers=HEADERS
            )

    with caplog.at_level(logging.ERROR, logger="gateway.app"):
        response = trio.run(main)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "https://pbft-payments.dev/problems/internal-error"
    assert SECRET not in response.text and "RuntimeError" not in response.text
    assert any(SECRET in record.exc_text for record in caplog.records if record.exc_text)
    assert (
        metrics.http_requests.labels(method="POST", route="/v1/payments", status="500")._value.get()
        >= 1
    )


def test_a_chunked_body_past_the_limit_is_413_and_never_reaches_the_service() -> None:
    gateway = _Gateway()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"from": "a", "to": "b", "amount": 1, "pad": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    async def main() -> httpx.Response:
        async with _client(gateway) as http:
            return await http.post(
                "/v1/payments",
                content=chunks(),
                headers={**HEADERS, "Content-Type": "application/json"},
            )

    response = trio.run(main)
    assert response.status_code == 413, response.text
    assert response.json()["field"] == "body"
    assert gateway.service.calls == []


def test_a_chunked_body_within_the_limit_gets_through() -> None:
    gateway = _Gateway()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"from": "a", '
        yield b'"to": "b", "amount": 1}'

    async def main() -> httpx.Response:
        async with _client(gateway) as http:
            return await http.post(
                "/v1/payments",
                content=chunks(),
                headers={**HEADERS, "Content-Type": "application/json"},
            )

    response = trio.run(main)
    assert response.status_code == 200, response.text
    assert gateway.service.calls == [
        (
            "create_payment",
            {
                "from": "a",
                "to": "b",
                "amount": 1,
                "capture": True,
                "expires_in_ms": None,
                "metadata": {},
            },
        )
    ]


@pytest.mark.parametrize("declared", [b"12x", b"-1", b"9" * 30])
def test_a_content_length_that_is_not_a_number_is_400(declared: bytes) -> None:
    sent: list[dict[str, Any]] = []
    reached: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", declared)],
    }
    trio.run(BodyLimit(app), scope, receive, send)
    assert reached == []
    assert sent[0]["status"] == 400
    assert b"Content-Length" in sent[1]["body"]


def test_a_declared_content_length_past_the_limit_is_413_before_reading() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    length = str(MAX_BODY_BYTES + 1).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", length)],
    }
    trio.run(BodyLimit(app), scope, receive, send)
    assert sent[0]["status"] == 413
