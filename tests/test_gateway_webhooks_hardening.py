"""review2's webhook findings (W1, W3, W7, W10), as regression tests: a delivery never stops
the dispatcher, internal targets are refused, the receiver's answer is never read back."""

from __future__ import annotations

import functools
import json
import sqlite3
from pathlib import Path

import pytest
import trio

from gateway.store import connect
from gateway.webhooks import InvalidInput, WebhookConfig, Webhooks, WebhookStore, check_url


def _event(conn: sqlite3.Connection, client_id: int, now_ms: int = 1_000) -> int:
    cur = conn.execute(
        "INSERT INTO events (type, payment_id, client_id, created_ms, body) VALUES (?,?,?,?,'')",
        ("payment.confirmed", f"pay_{client_id}_1", client_id, now_ms),
    )
    event_id = cur.lastrowid
    assert event_id is not None
    body = {"object": "event", "id": f"evt_{event_id}", "type": "payment.confirmed",
            "created_ms": now_ms, "data": {"id": f"pay_{client_id}_1"}}
    conn.execute("UPDATE events SET body = ? WHERE id = ?", (json.dumps(body), event_id))
    conn.commit()
    return event_id


BAD_HOSTS = ["http://a..b/", "http://" + "a" * 64 + ".example/", "http://" + "a." * 130 + "x/"]


@pytest.mark.parametrize("url", BAD_HOSTS)
def test_w10_url_the_idna_codec_refuses_is_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_url(url)


@pytest.mark.parametrize("url", BAD_HOSTS[:2])
def test_w10_stored_bad_host_does_not_kill_the_dispatcher(tmp_path: Path, url: str) -> None:
    """A row stored before the check existed (or written by hand): the delivery fails and
    is retried, the dispatcher lives on."""

    async def main() -> Webhooks:
        conn = connect(tmp_path / "gw.db")
        hooks = Webhooks(conn, WebhookConfig(timeout_s=2.0, poll_interval_s=0.05, seed=1))
        hooks.store.create_endpoint(7, "http://receiver.example/", None)
        conn.execute("UPDATE webhook_endpoints SET url = ?", (url,))
        conn.commit()
        _event(conn, 7)
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.dispatch)
            with trio.fail_after(10):
                while hooks.counts["retry"] < 1:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        return hooks

    hooks = trio.run(main)
    assert hooks.counts["retry"] == 1


def test_w10_poison_row_fails_after_max_attempts(tmp_path: Path) -> None:
    """A row whose attempts are used up (each crashed the process: finish() never ran) is
    marked failed at claim, never claimed again."""
    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    store.create_endpoint(1, "http://receiver.example/", None)
    _event(conn, 1)
    store.fan_out(2_000, 100)
    conn.execute("UPDATE webhook_deliveries SET attempts = 3")
    conn.commit()
    assert store.claim_due(3_000, 16, 15_000, 4, None, 3) == []
    assert conn.execute("SELECT state, last_error FROM webhook_deliveries").fetchall() == [
        ("failed", "attempts used up")
    ]


def test_w3_pending_delivery_of_pruned_event_is_failed_not_a_crash(tmp_path: Path) -> None:
    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    store.create_endpoint(1, "http://receiver.example/", None)
    event_id = _event(conn, 1)
    store.fan_out(2_000, 100)
    conn.execute("DELETE FROM events WHERE id = ?", (event_id,))  # GatewayStore.prune
    conn.commit()
    assert store.claim_due(3_000, 16, 15_000, 4) == []
    assert conn.execute("SELECT state, last_error FROM webhook_deliveries").fetchall() == [
        ("failed", "event pruned")
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/v1/payments",
        "http://localhost:9100/",
        "http://api.localhost/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/admin",
        "http://192.168.1.1/",
        "http://0.0.0.0:22/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
    ],
)
def test_w1_internal_targets_refused_unless_the_operator_opts_in(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_url(url)
    assert caught.value.field == "url"
    assert check_url(url, allow_private=True) == url


def test_w1_public_targets_accepted() -> None:
    for url in ["https://shop.example/hooks", "http://93.184.216.34/h", "http://[2606:4700::1]/"]:
        assert check_url(url) == url


class _Answering:
    """A 127.0.0.1 receiver answering every request with `status` and a secret body."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[bytes] = []
        self.port = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                self.requests.append(await stream.receive_some(65536))
                body = b"INTERNAL-ONLY root_password=hunter2"
                await stream.send_all(
                    f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n".encode()
                    + b"Connection: close\r\n\r\n"
                    + body
                )
        finally:
            await stream.aclose()


def _dispatch_once(tmp_path: Path, status: int, url_of: object, allow: bool) -> tuple:
    """Runs a dispatcher until one attempt is recorded; (receiver, last_error)."""
    receiver = _Answering(status)

    async def main() -> str:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, receiver.handler, 0, host="127.0.0.1")
            )
            receiver.port = listeners[0].socket.getsockname()[1]
            conn = connect(tmp_path / "gw.db")
            config = WebhookConfig(timeout_s=2.0, poll_interval_s=0.05, seed=1)
            hooks = Webhooks(conn, config)
            # Registered while allowed (or written before the check existed).
            WebhookStore(conn, allow_private=True).create_endpoint(
                7, url_of(receiver.port), None  # type: ignore[operator]
            )
            if allow:
                hooks = Webhooks(
                    conn, WebhookConfig(**{**config.__dict__, "allow_private": True})
                )
            _event(conn, 7)
            await nursery.start(hooks.dispatch)
            with trio.fail_after(10):
                while hooks.counts["retry"] + hooks.counts["delivered"] < 1:
                    await trio.sleep(0.05)
            page = hooks.store.list_events(7, None, 10, None)
            nursery.cancel_scope.cancel()
            return str(page["data"][0]["deliveries"][0]["last_error"])

    return receiver, trio.run(main)


def test_w1_receiver_answer_is_never_read_back(tmp_path: Path) -> None:
    receiver, last_error = _dispatch_once(
        tmp_path, 500, lambda port: f"http://127.0.0.1:{port}/", allow=True
    )
    assert len(receiver.requests) == 1
    assert last_error == "HTTP 500"


def test_w1_a_name_resolving_to_loopback_is_refused_at_delivery(tmp_path: Path) -> None:
    """Checked after resolution (a public-looking name may resolve inside: rebinding)."""
    receiver, last_error = _dispatch_once(
        tmp_path, 200, lambda port: f"http://localhost:{port}/", allow=False
    )
    assert receiver.requests == []
    assert last_error == "target address not allowed"


def test_w1_a_name_is_pinned_to_its_resolved_address_with_its_host_header(tmp_path: Path) -> None:
    receiver, last_error = _dispatch_once(
        tmp_path, 200, lambda port: f"http://localhost:{port}/", allow=True
    )
    assert last_error == "None"  # delivered
    (request,) = receiver.requests
    assert f"\r\nhost: localhost:{receiver.port}\r\n" in request.decode().lower()


def test_w2_one_client_cannot_take_all_slots(tmp_path: Path) -> None:
    """Client 1's four tarpits and 50 events, then one event of client 2: client 2 is
    served in the same round, and client 1 holds at most max_per_client slots."""
    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    for i in range(4):
        store.create_endpoint(1, f"http://tarpit{i}.example/", None)
    store.create_endpoint(2, "http://victim.example/", None)
    for _ in range(50):
        _event(conn, 1)
    _event(conn, 2)
    store.fan_out(2_000, 1000)
    config = WebhookConfig()
    claimed = store.claim_due(2_000, config.max_concurrency, 15_000, config.max_per_endpoint)
    urls = [d.url for d in claimed]
    assert "http://victim.example/" in urls
    assert len(urls) - 1 == config.max_per_client
    # Still in flight: client 1 gets nothing more, whatever its backlog.
    sending = {d.delivery_id: d.endpoint_id for d in claimed}
    assert store.claim_due(2_001, 16, 15_000, 4, sending) == []


def test_w7_prune_fails_undelivered_rows_instead_of_dropping_them(tmp_path: Path) -> None:
    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    store.create_endpoint(1, "http://receiver.example/", None)
    _event(conn, 1)
    store.fan_out(1_000, 100)  # pending since t=1 s; the gateway then stays down 8 days
    week = 7 * 24 * 3600 * 1000
    later = 1_000 + week + 24 * 3600 * 1000
    assert store.prune(later, week) == 0
    assert conn.execute("SELECT state, last_error FROM webhook_deliveries").fetchall() == [
        ("failed", "expired")
    ]
    listed = store.list_events(1, None, 10, None)["data"][0]["deliveries"]
    assert [(d["state"], d["last_error"]) for d in listed] == [("failed", "expired")]


def test_w8_endpoint_churn_is_bounded(tmp_path: Path) -> None:
    from gateway.webhooks import MAX_ENDPOINTS_CREATED_PER_DAY, TooManyEndpoints

    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    refused = 0
    for i in range(200):
        try:
            _, raw = store.create_endpoint(1, "http://receiver.example/", None, f"key-{i}")
        except TooManyEndpoints:
            refused += 1
            continue
        store.delete_endpoint(1, json.loads(raw)["id"])
    (endpoints,) = conn.execute("SELECT COUNT(*) FROM webhook_endpoints").fetchone()
    (replays,) = conn.execute("SELECT COUNT(*) FROM webhook_idempotency").fetchone()
    assert endpoints == MAX_ENDPOINTS_CREATED_PER_DAY
    assert replays == 0  # a deleted endpoint's replay record goes with it (W6)
    assert refused == 200 - MAX_ENDPOINTS_CREATED_PER_DAY
    # Another client is not affected.
    assert store.create_endpoint(2, "http://receiver.example/", None)[0] == 200


@pytest.mark.parametrize("event_type", [None, "payment.confirmed"])
def test_w9_listing_events_walks_the_client_index(tmp_path: Path, event_type: str | None) -> None:
    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    store.list_events(1, event_type, 10, "evt_5")
    conn.set_trace_callback(None)
    (query,) = [q for q in statements if q.startswith("SELECT id, body FROM events")]
    plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + query))
    assert "USING" in plan and "INDEX events_by_client" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort: the index gives the order


def test_w9_api_reads_do_not_wait_for_the_dispatcher(tmp_path: Path) -> None:
    """With a read connection, GET /v1/events does not queue behind the dispatcher's store
    calls (here: its one-at-a-time limiter held throughout)."""
    conn = connect(tmp_path / "gw.db")
    hooks = Webhooks(conn, WebhookConfig(), read_conn=connect(tmp_path / "gw.db"))
    _event(conn, 1)

    async def main() -> dict:
        async with hooks._limiter:  # the dispatcher busy on a long store call
            with trio.fail_after(5):
                return await hooks.list_events(1, None, 10, None)

    assert [e["type"] for e in trio.run(main)["data"]] == ["payment.confirmed"]


def test_w6_replay_after_delete_does_not_return_the_secret(tmp_path: Path) -> None:
    conn = connect(tmp_path / "gw.db")
    store = WebhookStore(conn)
    _, raw = store.create_endpoint(1, "http://receiver.example/", None, "k1")
    _, other = store.create_endpoint(1, "http://receiver.example/", None, "k2")
    first = json.loads(raw)
    store.delete_endpoint(1, first["id"])
    _, again = store.create_endpoint(1, "http://receiver.example/", None, "k1")
    assert first["secret"] not in again.decode()
    assert json.loads(again)["id"] != first["id"]
    # The other endpoint's replay record is untouched.
    assert store.create_endpoint(1, "http://receiver.example/", None, "k2")[1] == other
