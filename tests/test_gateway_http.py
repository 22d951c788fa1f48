"""The gateway's HTTP API through a real `pbft gateway` process and four real replicas.

Every endpoint, authentication, idempotency as a client sees it over HTTP, and every class
of bad input: each gets a 4xx application/problem+json body naming the field, never a 500.
One cluster and one gateway (serving clients 0 and 1 of three) for the module; tests work on
balance differences and fresh Idempotency-Keys, never on absolute state.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gateway_harness import GatewayHarness

# write_cluster: client 0 owns acct-00000 and acct-00001, client 1 acct-00002 and acct-00003,
# client 2 acct-00004 and acct-00005 (client 2 has keys but this gateway does not serve it).
A0, A1, B0, B1, C0 = "acct-00000", "acct-00001", "acct-00002", "acct-00003", "acct-00004"
HOUR_MS = 3_600_000
PROBLEM = "application/problem+json"
PROBLEMS = "https://pbft-payments.dev/problems/"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHarness]:
    root = tmp_path_factory.mktemp("gateway-http")
    with GatewayHarness.start(root, clients=3, gateway_clients=[0, 1]) as started:
        yield started


@pytest.fixture(scope="module")
def tokens(harness: GatewayHarness) -> dict[int, str]:
    return {client: harness.create_key(client) for client in (0, 1, 2)}


@pytest.fixture(scope="module")
def alice(harness: GatewayHarness, tokens: dict[int, str]) -> Iterator[httpx.Client]:
    """Client 0's API key."""
    with harness.http(tokens[0]) as http:
        yield http


@pytest.fixture(scope="module")
def bob(harness: GatewayHarness, tokens: dict[int, str]) -> Iterator[httpx.Client]:
    """Client 1's API key."""
    with harness.http(tokens[1]) as http:
        yield http


def post(
    http: httpx.Client, path: str, body: object = None, key: str | None = None
) -> httpx.Response:
    """POST JSON with a fresh Idempotency-Key (or `key`)."""
    headers = {"Idempotency-Key": key or uuid.uuid4().hex}
    if body is None:
        return http.post(path, headers=headers)
    return http.post(path, json=body, headers=headers)


def pay(http: httpx.Client, source: str, target: str, amount: int, **more: Any) -> dict[str, Any]:
    response = post(http, "/v1/payments", {"from": source, "to": target, "amount": amount, **more})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    payment: dict[str, Any] = response.json()
    return payment


def available(http: httpx.Client, account: str) -> int:
    response = http.get(f"/v1/accounts/{account}")
    assert response.status_code == 200, response.text
    return int(response.json()["available"])


def assert_problem(response: httpx.Response, status: int, slug: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM, response.headers
    body = response.json()
    assert body["type"] == PROBLEMS + slug, body
    assert body["status"] == status
    assert body["title"] and body["detail"]
    if field is not None:
        assert body.get("field") == field, body


# --- every endpoint ---------------------------------------------------------------------------


def test_a_payment_is_confirmed_with_a_receipt_that_verifies(alice: httpx.Client) -> None:
    before = available(alice, A0)
    payment = pay(alice, A0, B0, 250, metadata={"order": "1001"})
    assert payment["object"] == "payment" and payment["id"].startswith("pay_0_")
    assert (payment["status"], payment["reason"], payment["amount"]) == ("confirmed", "none", 250)
    assert payment["metadata"] == {"order": "1001"} and payment["seq"] > 0
    receipt = payment["receipt"]
    assert receipt["outcome"] == "confirmed" and receipt["op"] == "transfer"
    assert len(receipt["signers"]) >= 2  # f + 1 of four replicas
    assert available(alice, A0) == before - 250

    verified = alice.post("/v1/receipts/verify", json={"receipt": receipt["data"]})
    assert verified.status_code == 200, verified.text
    assert verified.json()["valid"] is True
    assert verified.json()["payment_id"] == payment["id"]
    assert (verified.json()["outcome"], verified.json()["amount"]) == ("confirmed", 250)

    got = alice.get(f"/v1/payments/{payment['id']}")
    assert got.status_code == 200 and got.json() == payment


def test_a_tampered_or_garbage_receipt_does_not_verify(alice: httpx.Client) -> None:
    payment = pay(alice, A0, B0, 7)
    data = bytearray(base64.b64decode(payment["receipt"]["data"]))
    data[len(data) // 2] ^= 0x01
    for receipt in (base64.b64encode(bytes(data)).decode(), "bm90IGEgcmVjZWlwdA==", "%%%"):
        verified = alice.post("/v1/receipts/verify", json={"receipt": receipt})
        assert verified.status_code == 200, verified.text
        assert verified.json()["valid"] is False, verified.json()


def test_a_rejected_payment_is_answered_200_with_its_reason_and_receipt(
    alice: httpx.Client,
) -> None:
    before = available(alice, A1)
    payment = pay(alice, A1, B0, before + 1)
    assert (payment["status"], payment["reason"]) == ("rejected", "insufficient_funds")
    assert payment["receipt"]["outcome"] == "rejected"
    assert available(alice, A1) == before


def test_a_hold_is_captured_in_part_by_the_payee(alice: httpx.Client, bob: httpx.Client) -> None:
    before_payer, before_payee = available(alice, A0), available(bob, B0)
    hold = pay(alice, A0, B0, 1_000, capture=False, expires_in_ms=HOUR_MS)
    assert (hold["status"], hold["capture"], hold["expires_in_ms"]) == ("held", False, HOUR_MS)
    held = alice.get(f"/v1/accounts/{A0}").json()
    assert held["available"] == before_payer - 1_000 and held["held"] >= 1_000

    captured = post(bob, f"/v1/payments/{hold['id']}/capture", {"amount": 600})
    assert captured.status_code == 200, captured.text
    body = captured.json()
    assert (body["status"], body["captured_amount"]) == ("captured", 600)
    assert [operation["op"] for operation in body["operations"]][-1] == "capture"
    assert available(alice, A0) == before_payer - 600  # the rest went back
    assert available(bob, B0) == before_payee + 600


def test_a_whole_capture_needs_no_body(alice: httpx.Client, bob: httpx.Client) -> None:
    hold = pay(alice, A0, B0, 40, capture=False)
    captured = post(bob, f"/v1/payments/{hold['id']}/capture")
    assert captured.status_code == 200, captured.text
    assert (captured.json()["status"], captured.json()["captured_amount"]) == ("captured", 40)


def test_a_hold_is_voided_and_a_capture_after_it_is_a_409_problem(
    alice: httpx.Client, bob: httpx.Client
) -> None:
    before = available(alice, A0)
    hold = pay(alice, A0, B0, 300, capture=False, expires_in_ms=HOUR_MS)
    voided = post(alice, f"/v1/payments/{hold['id']}/void")
    assert voided.status_code == 200, voided.text
    assert voided.json()["status"] == "voided"
    assert available(alice, A0) == before

    refused = post(bob, f"/v1/payments/{hold['id']}/capture", {"amount": 300})
    assert_problem(refused, 409, "operation-rejected", None)
    problem = refused.json()
    assert problem["reason"] == "hold_already_voided"
    assert problem["operation"]["op"] == "capture"
    assert problem["operation"]["receipt"]["outcome"] == "rejected"


def test_refunds_in_part_then_in_full_then_too_much(alice: httpx.Client, bob: httpx.Client) -> None:
    payment = pay(alice, A0, B0, 500)
    path = f"/v1/payments/{payment['id']}/refunds"
    partial = post(bob, path, {"amount": 200})
    assert partial.status_code == 200, partial.text
    assert (partial.json()["status"], partial.json()["refunded_amount"]) == ("confirmed", 200)
    rest = post(bob, path, {"amount": 300})
    assert rest.status_code == 200, rest.text
    assert (rest.json()["status"], rest.json()["refunded_amount"]) == ("refunded", 500)
    too_much = post(bob, path, {"amount": 1})
    assert_problem(too_much, 409, "operation-rejected", None)
    assert too_much.json()["reason"] == "exceeds_refundable"


def test_payments_are_listed_a_page_at_a_time(alice: httpx.Client) -> None:
    made = [pay(alice, A1, B1, amount)["id"] for amount in (11, 12, 13)]
    seen: list[str] = []
    page = alice.get("/v1/payments", params={"account": A1, "limit": 2})
    while True:
        assert page.status_code == 200, page.text
        listed = page.json()
        assert listed["object"] == "list" and len(listed["data"]) <= 2
        seen += [payment["id"] for payment in listed["data"]]
        if not listed["has_more"]:
            break
        cursor = listed["data"][-1]["id"]
        page = alice.get(
            "/v1/payments", params={"account": A1, "limit": 2, "starting_after": cursor}
        )
    assert len(seen) == len(set(seen))
    assert seen[:3] == made[::-1]  # newest first
    assert all(payment in seen for payment in made)


def test_an_opened_account_starts_at_zero_and_belongs_to_its_client(
    alice: httpx.Client, bob: httpx.Client
) -> None:
    name = f"shop-{uuid.uuid4().hex[:8]}"
    opened = post(alice, "/v1/accounts", {"name": name})
    assert opened.status_code == 200, opened.text
    account = alice.get(f"/v1/accounts/{name}")
    assert account.status_code == 200, account.text
    assert (account.json()["available"], account.json()["held"]) == (0, 0)
    assert account.json()["seq"] > 0
    assert_problem(bob.get(f"/v1/accounts/{name}"), 403, "forbidden", "name")
    again = post(alice, "/v1/accounts", {"name": name})
    assert again.status_code >= 400 and again.status_code < 500
    assert again.headers["content-type"] == PROBLEM


def test_healthz_openapi_and_metrics(harness: GatewayHarness, alice: httpx.Client) -> None:
    health = alice.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert all(client["connected_replicas"] >= 3 for client in health.json()["clients"].values())
    document = alice.get("/openapi.json").json()
    for path in (
        "/v1/payments",
        "/v1/payments/{payment_id}",
        "/v1/payments/{payment_id}/capture",
        "/v1/payments/{payment_id}/void",
        "/v1/payments/{payment_id}/refunds",
        "/v1/accounts",
        "/v1/accounts/{name}",
        "/v1/receipts/verify",
    ):
        assert path in document["paths"], path
    pay(alice, A0, B0, 1)
    text = alice.get("/metrics").text
    assert 'gateway_http_requests_total{method="POST",route="/v1/payments",status="200"}' in text
    assert 'gateway_payment_decisions_total{op="transfer",outcome="confirmed",reason="none"}' in (
        text
    )
    assert 'gateway_cluster_round_trip_seconds_count{kind="submit",result="decided"}' in text
    assert "gateway_webhook_deliveries_total" in text or "gateway_webhook_deliveries" in text


# --- authentication ---------------------------------------------------------------------------


def test_a_missing_malformed_or_unknown_key_is_401(harness: GatewayHarness) -> None:
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer gk_" + "A" * 43},
        {"Authorization": "Bearer " + "x" * 5000},
    ):
        with harness.http(None, headers=headers) as http:
            assert_problem(http.get(f"/v1/accounts/{A0}"), 401, "unauthorized", "Authorization")
            response = post(http, "/v1/payments", {"from": A0, "to": B0, "amount": 1})
            assert_problem(response, 401, "unauthorized", "Authorization")


def test_a_revoked_key_is_401(harness: GatewayHarness) -> None:
    token = harness.create_key(0)
    with harness.http(token) as http:
        assert http.get(f"/v1/accounts/{A0}").status_code == 200
        harness.revoke_key(max(harness.key_ids()))
        assert_problem(http.get(f"/v1/accounts/{A0}"), 401, "unauthorized", "Authorization")


def test_someone_elses_account_is_403(alice: httpx.Client, bob: httpx.Client) -> None:
    before = available(bob, B0)
    response = post(alice, "/v1/payments", {"from": B0, "to": A0, "amount": 5})
    assert_problem(response, 403, "forbidden", "from")
    assert_problem(alice.get(f"/v1/accounts/{B0}"), 403, "forbidden", "name")
    payment = pay(alice, A0, B0, 5)
    # Only the payee's owner captures or refunds; the payer's owner may not refund itself.
    refused = post(alice, f"/v1/payments/{payment['id']}/refunds", {"amount": 5})
    assert refused.status_code == 403, refused.text
    assert available(bob, B0) == before + 5


def test_a_key_of_a_client_this_gateway_does_not_serve_is_403(
    harness: GatewayHarness, tokens: dict[int, str]
) -> None:
    with harness.http(tokens[2]) as http:
        response = http.get(f"/v1/accounts/{C0}")
        assert_problem(response, 403, "forbidden", "Authorization")
        assert response.json()["client"] == 2


# --- idempotency ------------------------------------------------------------------------------


def test_the_same_key_and_body_replays_the_first_answer_byte_for_byte(
    alice: httpx.Client,
) -> None:
    before = available(alice, A0)
    key = uuid.uuid4().hex
    body = {"from": A0, "to": B0, "amount": 33}
    first = post(alice, "/v1/payments", body, key)
    again = post(alice, "/v1/payments", body, key)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert available(alice, A0) == before - 33  # one payment, not two


def test_the_same_key_with_another_body_or_route_is_422(alice: httpx.Client) -> None:
    key = uuid.uuid4().hex
    assert post(alice, "/v1/payments", {"from": A0, "to": B0, "amount": 3}, key).is_success
    other = post(alice, "/v1/payments", {"from": A0, "to": B0, "amount": 4}, key)
    assert_problem(other, 422, "idempotency-key-reused", "Idempotency-Key")
    elsewhere = post(alice, "/v1/accounts", {"name": f"x-{key[:8]}"}, key)
    assert_problem(elsewhere, 422, "idempotency-key-reused", "Idempotency-Key")


def test_keys_are_per_client(alice: httpx.Client, bob: httpx.Client) -> None:
    key = uuid.uuid4().hex
    first = post(alice, "/v1/payments", {"from": A0, "to": B0, "amount": 2}, key)
    second = post(bob, "/v1/payments", {"from": B0, "to": A0, "amount": 2}, key)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] != second.json()["id"]


# --- bad input --------------------------------------------------------------------------------

GOOD = {"from": A0, "to": B0, "amount": 1}
JSON = {"Content-Type": "application/json"}

# (name, path, raw body, extra headers, status, problem type, field)
BAD_INPUTS: list[tuple[str, str, bytes, dict[str, str], int, str, str]] = [
    ("malformed json", "/v1/payments", b'{"from": "a",', JSON, 400, "malformed-json", "body"),
    ("not an object", "/v1/payments", b"[1, 2]", JSON, 400, "invalid-body", "body"),
    ("empty body", "/v1/payments", b"", JSON, 400, "invalid-body", "body"),
    ("not utf-8", "/v1/payments", b"\xff\xfe{", JSON, 400, "malformed-json", "body"),
    ("deep nesting", "/v1/payments", b"[" * 30_000 + b"]" * 30_000, JSON, 400,
     "malformed-json", "body"),
    ("form post", "/v1/payments", b"from=a&to=b&amount=1",
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported-media-type",
     "Content-Type"),
    ("float amount", "/v1/payments", b'{"from":"acct-00000","to":"acct-00002","amount":1.0}',
     JSON, 422, "invalid-field", "amount"),
    ("string amount", "/v1/payments", b'{"from":"acct-00000","to":"acct-00002","amount":"1"}',
     JSON, 422, "invalid-field", "amount"),
    ("bool amount", "/v1/payments", b'{"from":"acct-00000","to":"acct-00002","amount":true}',
     JSON, 422, "invalid-field", "amount"),
    ("negative amount", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":-5}', JSON, 422, "invalid-field",
     "amount"),
    ("zero amount", "/v1/payments", b'{"from":"acct-00000","to":"acct-00002","amount":0}',
     JSON, 422, "invalid-field", "amount"),
    ("oversized amount", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":9223372036854775808}', JSON, 422,
     "invalid-field", "amount"),
    ("huge amount", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":1' + b"0" * 5000 + b"}", JSON, 400,
     "malformed-json", "body"),
    ("nan amount", "/v1/payments", b'{"from":"acct-00000","to":"acct-00002","amount":NaN}',
     JSON, 422, "invalid-field", "amount"),
    ("missing amount", "/v1/payments", b'{"from":"acct-00000","to":"acct-00002"}', JSON, 422,
     "invalid-field", "amount"),
    ("number account", "/v1/payments", b'{"from":7,"to":"acct-00002","amount":1}', JSON, 422,
     "invalid-field", "from"),
    ("long account", "/v1/payments",
     b'{"from":"acct-00000","to":"' + b"x" * 500 + b'","amount":1}', JSON, 422,
     "invalid-field", "to"),
    ("unknown field", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":1,"currency":"EUR"}', JSON, 422,
     "invalid-field", "currency"),
    ("string capture", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":1,"capture":"false"}', JSON, 422,
     "invalid-field", "capture"),
    ("float expiry", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":1,"capture":false,'
     b'"expires_in_ms":1.5}', JSON, 422, "invalid-field", "expires_in_ms"),
    ("metadata not strings", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":1,"metadata":{"k":1}}', JSON, 422,
     "invalid-field", "metadata.k"),
    ("too much metadata", "/v1/payments",
     b'{"from":"acct-00000","to":"acct-00002","amount":1,"metadata":{'
     + b",".join(b'"k%d":"v"' % index for index in range(21)) + b"}}", JSON, 422,
     "invalid-field", "metadata"),
    ("body too large", "/v1/payments", b'{"pad":"' + b"x" * 70_000 + b'"}', JSON, 413,
     "body-too-large", "body"),
    ("capture float", "/v1/payments/pay_0_1/capture", b'{"amount":2.5}', JSON, 422,
     "invalid-field", "amount"),
    ("refund without amount", "/v1/payments/pay_0_1/refunds", b"{}", JSON, 422,
     "invalid-field", "amount"),
    ("void with a field", "/v1/payments/pay_0_1/void", b'{"amount":1}', JSON, 422,
     "invalid-field", "amount"),
    ("bad payment id", "/v1/payments/pay_zero/capture", b"{}", JSON, 400,
     "invalid-parameter", "payment_id"),
    ("account name type", "/v1/accounts", b'{"name":["a"]}', JSON, 422, "invalid-field",
     "name"),
    ("receipt type", "/v1/receipts/verify", b'{"receipt":12}', JSON, 422, "invalid-field",
     "receipt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "slug", "field"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_a_4xx_problem_naming_the_field(
    alice: httpx.Client,
    path: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    slug: str,
    field: str,
) -> None:
    response = alice.post(
        path, content=content, headers={"Idempotency-Key": uuid.uuid4().hex, **headers}
    )
    assert_problem(response, status, slug, field)


def test_a_missing_or_too_long_idempotency_key_is_400(alice: httpx.Client) -> None:
    for path, body in (
        ("/v1/payments", GOOD),
        ("/v1/accounts", {"name": "never-opened"}),
        ("/v1/payments/pay_0_1/void", None),
    ):
        missing = alice.post(path, json=body)
        assert_problem(missing, 400, "missing-header", "Idempotency-Key")
        too_long = alice.post(path, json=body, headers={"Idempotency-Key": "k" * 256})
        assert_problem(too_long, 400, "invalid-header", "Idempotency-Key")


def test_bad_query_and_path_parameters_are_400(alice: httpx.Client) -> None:
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"starting_after": "nope"}, "starting_after"),
        ({"account": "x" * 500}, "account"),
    ):
        assert_problem(alice.get("/v1/payments", params=params), 400, "invalid-parameter", field)
    assert_problem(alice.get("/v1/payments/12"), 400, "invalid-parameter", "payment_id")


def test_unknown_payments_routes_and_methods(alice: httpx.Client) -> None:
    assert_problem(alice.get("/v1/payments/pay_0_1"), 404, "not-found", "payment_id")
    assert_problem(post(alice, "/v1/payments/pay_0_1/void"), 404, "not-found", "payment_id")
    assert_problem(alice.get("/v1/nothing"), 404, "not-found", None)
    assert_problem(alice.delete("/v1/payments"), 405, "method-not-allowed", None)


def test_an_unknown_account_is_a_4xx_naming_the_field(alice: httpx.Client) -> None:
    for body, field in (
        ({"from": A0, "to": "nobody-here", "amount": 1}, "to"),
        ({"from": "nobody-here", "to": B0, "amount": 1}, "from"),
    ):
        response = post(alice, "/v1/payments", body)
        assert_problem(response, 422, "unknown-account", field)
    assert_problem(alice.get("/v1/accounts/nobody-here"), 404, "unknown-account", "name")


def test_nothing_was_ever_answered_500(alice: httpx.Client) -> None:
    text = alice.get("/metrics").text
    server_errors = [
        line
        for line in text.splitlines()
        if line.startswith("gateway_http_requests_total") and 'status="5' in line
    ]
    assert server_errors == []
