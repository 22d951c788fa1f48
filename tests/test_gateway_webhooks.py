"""Webhooks at unit level: the store, the signature, the backoff, and the dispatcher against a
real HTTP receiver on 127.0.0.1, fed by event rows written as the payment service writes them.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from webhook_receiver import Received, Receiver, always, fail_first

from gateway import webhooks_bench
from gateway.store import connect
from gateway.webhooks import (
    DELIVERED,
    FAILED,
    PENDING,
    SENDING,
    EndpointNotFound,
    IdempotencyMismatch,
    InvalidInput,
    TooManyEndpoints,
    WebhookConfig,
    Webhooks,
    WebhookStore,
    backoff_s,
    check_url,
    sign,
    verify_signature,
)

FAST = WebhookConfig(
    timeout_s=2.0,
    max_attempts=6,
    backoff_base_s=0.05,
    backoff_cap_s=0.4,
    poll_interval_s=0.02,
    seed=7,
    allow_private=True,  # the test receivers listen on 127.0.0.1
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.db"
    connect(path).close()
    return path


def add_event(conn: sqlite3.Connection, client_id: int, kind: str = "payment.confirmed") -> int:
    """One event row as the payment service writes it, in one transaction (gateway/store.py's
    Database._put_event: its id is known only once inserted)."""
    created = int(time.time() * 1000)
    payment_id = f"pay_{client_id}_{created}"
    with conn:
        cursor = conn.execute(
            "INSERT INTO events (type, payment_id, client_id, created_ms, body)"
            " VALUES (?, ?, ?, ?, '')",
            (kind, payment_id, client_id, created),
        )
        event_id = cursor.lastrowid
        assert event_id is not None
        body = {
            "object": "event",
            "id": f"evt_{event_id}",
            "type": kind,
            "created_ms": created,
            "data": {"object": "payment", "id": payment_id, "status": kind.split(".")[1]},
        }
        conn.execute("UPDATE events SET body = ? WHERE id = ?", (json.dumps(body), event_id))
    return event_id


def states(conn: sqlite3.Connection) -> dict[int, tuple[str, int]]:
    rows = conn.execute("SELECT event_id, state, attempts FROM webhook_deliveries").fetchall()
    conn.commit()
    return {event_id: (state, attempts) for event_id, state, attempts in rows}


async def until(predicate: Callable[[], bool]) -> None:
    """Polls `predicate` (the caller bounds the wait with fail_after)."""
    while not predicate():
        await trio.sleep(0.01)


def new_endpoint(store: WebhookStore, client_id: int, url: str) -> tuple[str, str]:
    _status, body = store.create_endpoint(client_id, url, None)
    endpoint = json.loads(body)
    return endpoint["id"], endpoint["secret"]


# --- signatures and backoff --------------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering_wrong_secret_and_stale_time() -> None:
    body = b'{"object":"event","id":"evt_1"}'
    now = 1_700_000_000
    header = sign("whsec_a", now, body)
    assert header.startswith(f"t={now},v1=")
    assert verify_signature("whsec_a", header, body, now=now)
    assert verify_signature("whsec_a", header, body.decode(), now=now + 299)
    assert not verify_signature("whsec_a", header, body.replace(b"1", b"2"), now=now)
    assert not verify_signature("whsec_b", header, body, now=now)
    assert not verify_signature("whsec_a", header, body, now=now + 301)
    assert not verify_signature("whsec_a", header, body, now=now - 301)
    # Rotation: any matching v1 is enough.
    other = sign("whsec_old", now, body).split(",")[1]
    assert verify_signature("whsec_a", f"{header},{other}", body, now=now)
    for bad in ["", "t=1", "v1=00", "t=x,v1=00", "garbage", f"t={now}", "t=-5,v1=00", "a" * 5000]:
        assert not verify_signature("whsec_a", bad, body, now=now)


def test_backoff_doubles_from_the_base_with_bounded_jitter_and_a_cap() -> None:
    config = WebhookConfig(backoff_base_s=1.0, backoff_cap_s=30.0, jitter=0.2)
    rng = random.Random(1)
    for attempts, base in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (60, 30.0)]:
        for _ in range(50):
            delay = backoff_s(attempts, config, rng)
            assert base <= delay < base * 1.2
    # Seeded: the same seed gives the same delays.
    assert [backoff_s(3, config, random.Random(5)) for _ in range(2)] == [
        backoff_s(3, config, random.Random(5)) for _ in range(2)
    ]
    with pytest.raises(ValueError):
        WebhookConfig(backoff_base_s=5, backoff_cap_s=1)
    with pytest.raises(ValueError):
        WebhookConfig(max_attempts=0)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "example.com/hooks",
        "http://",
        "https://user:pw@example.com/",
        "http://example.com:99999/",
        "http://exa mple.com/",
        "http://example.com/\x00",
        "http://example.com/#frag",
        "http://ex\u00e4mple.com/",
        "https://example.com/" + "a" * 2100,
        "",
    ],
)
def test_bad_urls_are_refused_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_url(url)
    assert caught.value.field == "url"


def test_good_urls_are_kept_as_given() -> None:
    assert check_url("https://shop.example/hooks?x=1") == "https://shop.example/hooks?x=1"
    local = "http://127.0.0.1:8081/a/b"
    assert check_url(local, allow_private=True) == local


# --- the store ---------------------------------------------------------------------------------


def test_endpoint_secret_is_shown_once_and_endpoints_are_per_client(db: Path) -> None:
    store = WebhookStore(connect(db))
    status, body = store.create_endpoint(1, "https://a.example/h", "mine")
    created = json.loads(body)
    assert status == 200 and created["secret"].startswith("whsec_")
    assert created["id"].startswith("we_") and created["description"] == "mine"
    listed = store.list_endpoints(1)
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert "secret" not in listed["data"][0]
    assert store.list_endpoints(2)["data"] == []
    with pytest.raises(EndpointNotFound):
        store.delete_endpoint(2, created["id"])  # another client's: not found, not deleted
    assert store.delete_endpoint(1, created["id"])["deleted"] is True
    assert store.list_endpoints(1)["data"] == []
    with pytest.raises(EndpointNotFound):
        store.delete_endpoint(1, created["id"])
    with pytest.raises(InvalidInput) as caught:
        store.delete_endpoint(1, "nope")
    assert caught.value.field == "id"


def test_endpoint_limit_per_client(db: Path) -> None:
    store = WebhookStore(connect(db))
    ids = [new_endpoint(store, 1, f"https://a.example/{i}")[0] for i in range(16)]
    with pytest.raises(TooManyEndpoints):
        store.create_endpoint(1, "https://a.example/17", None)
    new_endpoint(store, 2, "https://b.example/")  # another client has its own limit
    store.delete_endpoint(1, ids[0])
    new_endpoint(store, 1, "https://a.example/17")


def test_idempotent_creation_replays_the_same_bytes_and_refuses_another_body(db: Path) -> None:
    store = WebhookStore(connect(db))
    first = store.create_endpoint(1, "https://a.example/h", None, "key-1")
    # A restarted gateway (new connection, new store) replays it too, secret included.
    again = WebhookStore(connect(db)).create_endpoint(1, "https://a.example/h", None, "key-1")
    assert again == first
    assert len(store.list_endpoints(1)["data"]) == 1
    with pytest.raises(IdempotencyMismatch) as caught:
        store.create_endpoint(1, "https://a.example/other", None, "key-1")
    assert caught.value.status == 422
    # Keys are per client.
    other = store.create_endpoint(2, "https://a.example/h", None, "key-1")
    assert json.loads(other[1])["id"] != json.loads(first[1])["id"]
    with pytest.raises(InvalidInput):
        store.create_endpoint(1, "https://a.example/h", None, "k" * 256)


def test_fan_out_reaches_the_events_client_endpoints_made_before_it_once(db: Path) -> None:
    conn = connect(db)
    store = WebhookStore(conn)
    early = add_event(conn, 1)
    a, _ = new_endpoint(store, 1, "https://a.example/")
    b, _ = new_endpoint(store, 2, "https://b.example/")
    e1 = add_event(conn, 1)
    e2 = add_event(conn, 2)
    now = int(time.time() * 1000)
    assert store.fan_out(now, 1) == 1  # batch of one: the cursor moves one event at a time
    assert store.fan_out(now, 100) == 2
    assert store.fan_out(now, 100) == 0
    rows = conn.execute("SELECT event_id, endpoint_id FROM webhook_deliveries ORDER BY event_id")
    assert [(e, f"we_{p}") for e, p in rows] == [(e1, a), (e2, b)]
    assert early not in states(conn)  # made before the endpoint existed
    # A second store on the same database (a restart) keeps the cursor: nothing twice.
    assert WebhookStore(connect(db)).fan_out(now, 100) == 0


def test_list_events_pages_newest_first_filters_and_shows_deliveries(db: Path) -> None:
    conn = connect(db)
    store = WebhookStore(conn)
    endpoint, _ = new_endpoint(store, 1, "https://a.example/")
    ids = [add_event(conn, 1, "payment.held" if i % 2 else "payment.confirmed") for i in range(5)]
    add_event(conn, 2)
    store.fan_out(int(time.time() * 1000), 100)
    page = store.list_events(1, None, 2, None)
    assert [e["id"] for e in page["data"]] == [f"evt_{ids[4]}", f"evt_{ids[3]}"]
    assert page["has_more"] is True
    delivery = page["data"][0]["deliveries"][0]
    assert delivery["endpoint"] == endpoint and delivery["state"] == PENDING
    assert delivery["attempts"] == 0
    rest = store.list_events(1, None, 100, page["data"][-1]["id"])
    assert [e["id"] for e in rest["data"]] == [f"evt_{i}" for i in reversed(ids[:3])]
    assert rest["has_more"] is False
    held = store.list_events(1, "payment.held", 100, None)
    assert [e["id"] for e in held["data"]] == [f"evt_{ids[3]}", f"evt_{ids[1]}"]
    assert all(e["type"] == "payment.held" for e in held["data"])
    for args, field in [
        (("payment.nope", 10, None), "type"),
        ((None, 0, None), "limit"),
        ((None, 101, None), "limit"),
        ((None, 10, "pay_1"), "starting_after"),
        ((None, 10, "evt_x"), "starting_after"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            store.list_events(1, *args)
        assert caught.value.field == field


# --- the dispatcher against a real receiver ------------------------------------------------------


def check_signed(request: Received, secret: str) -> dict:
    """The request's signature verifies with verify_signature, and not with a tampered body."""
    header = request.headers["pbft-signature"]
    assert verify_signature(secret, header, request.body)
    assert not verify_signature(secret, header, request.body + b" ")
    tampered = request.body.replace(b'"event"', b'"evemt"')
    assert tampered != request.body and not verify_signature(secret, header, tampered)
    event = json.loads(request.body)
    assert request.headers["pbft-event-id"] == event["id"]
    assert request.headers["content-type"] == "application/json"
    return event


def test_every_event_is_delivered_signed_and_failures_are_retried_with_backoff(
    db: Path,
) -> None:
    conn = connect(db)
    results: list[str] = []

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                receiver = Receiver(answer=fail_first(3))
                await nursery.start(receiver.serve)
                hooks = Webhooks(connect(db), FAST, on_result=results.append)
                _status, body = await hooks.create_endpoint(1, receiver.url, None, None)
                secret = json.loads(body)["secret"]
                event_id = add_event(conn, 1)
                await nursery.start(hooks.dispatch)
                await until(lambda: states(conn).get(event_id, ("",))[0] == DELIVERED)
                nursery.cancel_scope.cancel()
        requests = receiver.requests
        assert len(requests) == 4  # three failed, the fourth delivered
        assert [r.headers["pbft-delivery-attempt"] for r in requests] == ["1", "2", "3", "4"]
        for request in requests:
            assert check_signed(request, secret)["id"] == f"evt_{event_id}"
        # Exponential: the n-th retry waits at least base * 2**(n-1) (ms rounding aside).
        for n, (before, after) in enumerate(zip(requests, requests[1:], strict=False), start=1):
            assert after.at - before.at >= FAST.backoff_base_s * 2 ** (n - 1) - 0.005

    trio.run(main)
    assert results == ["retry", "retry", "retry", "delivered"]
    assert states(conn)[1] == (DELIVERED, 4)


def test_attempts_run_out_and_redirects_are_not_followed(db: Path) -> None:
    conn = connect(db)
    results: list[str] = []
    config = WebhookConfig(**{**FAST.__dict__, "max_attempts": 3})

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                failing = Receiver(answer=always(503))
                redirecting = Receiver(answer=always(302))
                await nursery.start(failing.serve)
                await nursery.start(redirecting.serve)
                hooks = Webhooks(connect(db), config, on_result=results.append)
                await hooks.create_endpoint(1, failing.url, None, None)
                await hooks.create_endpoint(1, redirecting.url, None, None)
                add_event(conn, 1)
                await nursery.start(hooks.dispatch)
                await until(
                    lambda: (
                        [r[0] for r in conn.execute("SELECT state FROM webhook_deliveries")]
                        == [FAILED, FAILED]
                    )
                )
                nursery.cancel_scope.cancel()
        assert len(failing.requests) == 3 and len(redirecting.requests) == 3

    trio.run(main)
    assert sorted(results) == ["failed", "failed"] + ["retry"] * 4
    listed = WebhookStore(conn).list_events(1, None, 10, None)["data"][0]["deliveries"]
    assert [(d["state"], d["attempts"], d["last_status"]) for d in listed] == [
        (FAILED, 3, 503),
        (FAILED, 3, 302),
    ]
    # Only the status: the receiver's text is never read back to the merchant.
    assert listed[0]["last_error"] == "HTTP 503"


def test_a_restarted_dispatcher_delivers_exactly_the_missing_events(db: Path) -> None:
    conn = connect(db)
    refusing = {3, 4}  # the receiver's answer to events 3 and 4 is 500 until this is emptied

    def answer(request: Received, _number: int) -> int:
        return 500 if int(request.event_id.removeprefix("evt_")) in refusing else 200

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                receiver = Receiver(answer=answer)
                await nursery.start(receiver.serve)
                config = WebhookConfig(**{**FAST.__dict__, "max_attempts": 50})
                first = Webhooks(connect(db), config)
                _status, body = await first.create_endpoint(1, receiver.url, None, None)
                secret = json.loads(body)["secret"]
                events = [add_event(conn, 1) for _ in range(4)]
                assert events == [1, 2, 3, 4]
                async with trio.open_nursery() as inner:
                    await inner.start(first.dispatch)
                    await until(
                        lambda: (
                            states(conn).get(1, ("",))[0] == DELIVERED
                            and states(conn).get(2, ("",))[0] == DELIVERED
                            and all(states(conn).get(e, ("", 0))[1] >= 2 for e in (3, 4))
                        )
                    )
                    inner.cancel_scope.cancel()  # the gateway stops mid-retry
                before = len(receiver.requests)
                refusing.clear()
                second = Webhooks(connect(db), config)  # a new process: new connection
                await nursery.start(second.dispatch)
                await until(lambda: all(s == DELIVERED for s, _ in states(conn).values()))
                nursery.cancel_scope.cancel()
        after = receiver.requests[before:]
        assert sorted(r.event_id for r in after) == ["evt_3", "evt_4"]
        for request in after:
            check_signed(request, secret)
        delivered_ids = {r.event_id for r in receiver.requests if answer(r, 0) == 200}
        assert delivered_ids == {"evt_1", "evt_2", "evt_3", "evt_4"}

    trio.run(main)


def test_a_delivery_in_progress_when_the_dispatcher_dies_is_sent_again(db: Path) -> None:
    conn = connect(db)
    hang = [True]

    def answer(_request: Received, _number: int) -> int | None:
        return None if hang[0] else 200

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                receiver = Receiver(answer=answer)
                await nursery.start(receiver.serve)
                first = Webhooks(connect(db), FAST)
                await first.create_endpoint(1, receiver.url, None, None)
                event_id = add_event(conn, 1)
                async with trio.open_nursery() as inner:
                    await inner.start(first.dispatch)
                    await receiver.wait_for(lambda requests: len(requests) == 1)
                    inner.cancel_scope.cancel()  # killed while the POST is unanswered
                assert states(conn)[event_id] == (SENDING, 1)
                hang[0] = False
                await nursery.start(Webhooks(connect(db), FAST).dispatch)
                await until(lambda: states(conn)[event_id][0] == DELIVERED)
                nursery.cancel_scope.cancel()
        assert [r.event_id for r in receiver.requests] == [f"evt_{event_id}"] * 2
        assert receiver.requests[1].headers["pbft-delivery-attempt"] == "2"

    trio.run(main)


def test_a_hanging_receiver_does_not_hold_up_the_others(db: Path) -> None:
    conn = connect(db)
    slow = WebhookConfig(**{**FAST.__dict__, "timeout_s": 60.0})

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                stuck = Receiver(answer=lambda _r, _n: None)
                good = Receiver()
                await nursery.start(stuck.serve)
                await nursery.start(good.serve)
                hooks = Webhooks(connect(db), slow)
                await hooks.create_endpoint(1, stuck.url, None, None)
                _status, body = await hooks.create_endpoint(2, good.url, None, None)
                secret = json.loads(body)["secret"]
                await nursery.start(hooks.dispatch)
                for _ in range(3):
                    add_event(conn, 1)
                    add_event(conn, 2)
                await good.wait_for(lambda requests: len(requests) == 3)
                assert len(stuck.requests) == 3  # all three still unanswered
                nursery.cancel_scope.cancel()
        for request in good.requests:
            check_signed(request, secret)

    trio.run(main)


def test_a_receiver_that_never_answers_times_out_and_is_retried(db: Path) -> None:
    conn = connect(db)
    quick = WebhookConfig(**{**FAST.__dict__, "timeout_s": 0.2, "max_attempts": 2})

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                stuck = Receiver(answer=lambda _r, _n: None)
                await nursery.start(stuck.serve)
                hooks = Webhooks(connect(db), quick)
                await hooks.create_endpoint(1, stuck.url, None, None)
                event_id = add_event(conn, 1)
                await nursery.start(hooks.dispatch)
                await until(lambda: states(conn).get(event_id, ("",))[0] == FAILED)
                nursery.cancel_scope.cancel()
        assert len(stuck.requests) == 2

    trio.run(main)
    (error,) = conn.execute("SELECT last_error FROM webhook_deliveries").fetchone()
    assert "no answer within 0.2 s" in error


def test_deleting_an_endpoint_fails_its_pending_deliveries(db: Path) -> None:
    conn = connect(db)
    store = WebhookStore(conn, allow_private=True)
    endpoint, _ = new_endpoint(store, 1, "http://127.0.0.1:9/never")
    event_id = add_event(conn, 1)
    store.fan_out(int(time.time() * 1000), 100)
    store.delete_endpoint(1, endpoint)
    assert states(conn)[event_id] == (FAILED, 0)
    assert store.claim_due(int(time.time() * 1000) + 10**9, 10, 1000, 4) == []


def test_a_claim_is_a_lease_that_runs_out_if_no_result_is_recorded(db: Path) -> None:
    conn = connect(db)
    store = WebhookStore(conn, allow_private=True)
    new_endpoint(store, 1, "http://127.0.0.1:9/never")
    first, second = add_event(conn, 1), add_event(conn, 1)
    now = int(time.time() * 1000)
    store.fan_out(now, 100)
    claimed = store.claim_due(now, 1, 1000, 4)
    assert [(d.event_id, d.attempt) for d in claimed] == [(first, 1)]
    assert states(conn)[first] == (SENDING, 1)
    # Still leased: only the other one is due.
    assert [d.event_id for d in store.claim_due(now + 999, 10, 1000, 4)] == [second]
    # Lease over, but this dispatcher is still sending it: not claimed twice.
    sending = {d.delivery_id: d.endpoint_id for d in claimed}
    assert store.claim_due(now + 1000, 10, 1000, 4, sending) == []
    again = store.claim_due(now + 1000, 10, 1000, 4)
    assert [(d.event_id, d.attempt) for d in again] == [(first, 2)]


def test_a_refused_connection_is_a_failed_attempt_not_a_crash(db: Path) -> None:
    conn = connect(db)
    config = WebhookConfig(**{**FAST.__dict__, "max_attempts": 2})

    async def main() -> None:
        # A port that was just listening and is now closed: connections are refused.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                hooks = Webhooks(connect(db), config)
                await hooks.create_endpoint(1, f"http://127.0.0.1:{port}/h", None, None)
                event_id = add_event(conn, 1)
                await nursery.start(hooks.dispatch)
                await until(lambda: states(conn).get(event_id, ("",))[0] == FAILED)
                nursery.cancel_scope.cancel()

    trio.run(main)
    (error,) = conn.execute("SELECT last_error FROM webhook_deliveries").fetchone()
    assert error.startswith("ConnectError")


def test_no_more_than_max_concurrency_posts_are_in_flight(db: Path) -> None:
    conn = connect(db)
    narrow = WebhookConfig(**{**FAST.__dict__, "timeout_s": 60.0, "max_concurrency": 2})

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                stuck = Receiver(answer=lambda _r, _n: None)
                await nursery.start(stuck.serve)
                hooks = Webhooks(connect(db), narrow)
                await hooks.create_endpoint(1, stuck.url, None, None)
                for _ in range(5):
                    add_event(conn, 1)
                await nursery.start(hooks.dispatch)
                await stuck.wait_for(lambda requests: len(requests) == 2)
                await trio.sleep(20 * narrow.poll_interval_s)  # rounds that could send more
                assert len(stuck.requests) == 2
                assert sorted(s for s, _ in states(conn).values()) == [PENDING] * 3 + [SENDING] * 2
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_claims_leave_room_for_other_endpoints(db: Path) -> None:
    conn = connect(db)
    store = WebhookStore(conn)
    crowded, _ = new_endpoint(store, 1, "https://a.example/")
    quiet, _ = new_endpoint(store, 2, "https://b.example/")
    for _ in range(6):
        add_event(conn, 1)
    add_event(conn, 2)
    now = int(time.time() * 1000)
    store.fan_out(now, 100)
    first = store.claim_due(now, 10, 60_000, 2)
    assert sorted(f"we_{d.endpoint_id}" for d in first) == sorted([crowded, crowded, quiet])
    # Two of the crowded endpoint's in flight: it is full, whatever is due.
    sending = {d.delivery_id: d.endpoint_id for d in first if f"we_{d.endpoint_id}" == crowded}
    assert store.claim_due(now + 1, 10, 60_000, 2, sending) == []
    # One of them done: room for one more.
    sending.pop(next(iter(sending)))
    assert len(store.claim_due(now + 1, 10, 60_000, 2, sending)) == 1


def test_a_receiver_that_hangs_on_many_events_holds_only_its_share_of_slots(db: Path) -> None:
    conn = connect(db)
    config = WebhookConfig(
        **{**FAST.__dict__, "timeout_s": 60.0, "max_concurrency": 4, "max_per_endpoint": 2}
    )

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                stuck = Receiver(answer=lambda _r, _n: None)
                good = Receiver()
                await nursery.start(stuck.serve)
                await nursery.start(good.serve)
                hooks = Webhooks(connect(db), config)
                await hooks.create_endpoint(1, stuck.url, None, None)
                await hooks.create_endpoint(2, good.url, None, None)
                for _ in range(8):
                    add_event(conn, 1)  # all due at once, ahead of client 2's
                for _ in range(5):
                    add_event(conn, 2)
                await nursery.start(hooks.dispatch)
                await good.wait_for(lambda requests: len(requests) == 5)
                assert len(stuck.requests) == 2
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_webhook_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    assert webhooks_bench.main(["--events", "20", "--concurrency", "4"]) == 0
    out = capsys.readouterr().out
    assert "baseline (httpx POSTs" in out and "dispatcher / baseline time:" in out
    assert webhooks_bench.main(["--events", "0"]) == 2
    assert "--events must be" in capsys.readouterr().err


def test_prune_bounds_deliveries_replay_records_and_deleted_endpoints(db: Path) -> None:
    conn = connect(db)
    store = WebhookStore(conn)
    now = int(time.time() * 1000)
    day = 24 * 3600 * 1000
    endpoint, _ = new_endpoint(store, 1, "https://a.example/")
    store.create_endpoint(1, "https://b.example/", None, "key", now_ms=now - 2 * day)
    add_event(conn, 1)
    store.fan_out(now - 8 * day, 100)  # a delivery made eight days ago
    store.delete_endpoint(1, endpoint, now_ms=now - 8 * day)
    [(secret,)] = conn.execute("SELECT secret FROM webhook_endpoints WHERE id = 1").fetchall()
    assert secret == ""  # forgotten at deletion
    # The deleted endpoint's (failed) delivery goes; the other one, never made, is marked
    # failed (`expired`), not dropped, and goes one retention later.
    assert store.prune(now, 7 * day) == 1
    remaining = conn.execute("SELECT state, last_error FROM webhook_deliveries").fetchall()
    assert remaining == [("failed", "expired")]
    assert conn.execute("SELECT id FROM webhook_endpoints").fetchall() == [(2,)]
    assert store.prune(now + 7 * day + 1, 7 * day) == 1
    assert conn.execute("SELECT COUNT(*) FROM webhook_idempotency").fetchall() == [(0,)]
