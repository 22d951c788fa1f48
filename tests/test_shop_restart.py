"""examples/shop across restarts, against an in-process fake gateway that replays by
Idempotency-Key like the real one (same key + same body: the first answer; same key +
another body: 422 idempotency-key-reused):
- a retry after a configuration edit sends the journalled body (review2 S1);
- resume drives a long journal with bounded concurrency, and a stuck order does not grow
  the journal at each restart (S2);
- a lost or restored database never replays another database's holds (S3)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "shop"))

# examples/shop is not an installed package: its modules are imported by path.
import shop as shop_module
from shop import Shop, ShopConfig
from shop_orders import Call, Do, Outcome, Stage, Step
from shop_store import Order, ShopError, ShopStore

CONFIG = ShopConfig(
    "shop", "http://gw", "acct-00000", 0, 900_000, {0: "gk_a", 1: "gk_b"}, {"mug": (700, 5)}
)


class FakeGateway:
    """Replays by Idempotency-Key; `answer` decides a new key's answer (None: a fresh
    payment, held by an authorize, captured or voided by the others)."""

    def __init__(self, answer: httpx.Response | None = None) -> None:
        self.answer = answer
        self.first: dict[str, tuple[dict[str, object], httpx.Response]] = {}
        self.sent: list[tuple[str, str, dict[str, object]]] = []
        self.payments = 0
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        body = json.loads(request.content)
        self.sent.append((request.url.path, key, body))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(0.001)
        finally:
            self.in_flight -= 1
        if key in self.first:
            first_body, first_answer = self.first[key]
            if first_body != body:
                problem = {"type": "https://pbft-payments.dev/problems/idempotency-key-reused"}
                return httpx.Response(422, json=problem)
            return httpx.Response(first_answer.status_code, content=first_answer.content)
        answer = self.answer or self._payment(request.url.path)
        self.first[key] = (body, answer)
        return answer

    def _payment(self, path: str) -> httpx.Response:
        if path == "/v1/payments":
            self.payments += 1
            payment_id, status = f"pay_1_{self.payments}", "held"
        else:
            payment_id = path.split("/")[3]
            status = "captured" if path.endswith("/capture") else "voided"
        payment = {"object": "payment", "id": payment_id, "status": status, "reason": "none"}
        return httpx.Response(200, json=payment)


def _store(path: Path, stock: int = 5) -> ShopStore:
    store = ShopStore(path, "shop")
    store.put_item("mug", 700, stock)
    return store


def _start(store: ShopStore, order_id: str, config: ShopConfig = CONFIG) -> Order:
    return store.start(
        order_id,
        "mug",
        "acct-00002",
        1,
        config.hold_expires_in_ms,
        config.merchant_account,
        config.merchant_client,
    )


async def _steps(config: ShopConfig, store: ShopStore, gateway: FakeGateway, order: Order) -> None:
    async with httpx.AsyncClient(
        base_url="http://gw", transport=httpx.MockTransport(gateway)
    ) as http:
        await Shop(config, store, http)._steps(order)


# --- S1: every field of a retried request comes from the order's journal ---------------------


def test_a_retry_after_a_config_edit_sends_the_journalled_body(tmp_path: Path) -> None:
    store = _store(tmp_path / "shop.db")
    order = _start(store, "order-1")
    gateway = FakeGateway(
        httpx.Response(504, json={"type": "https://pbft-payments.dev/problems/cluster-timeout"})
    )
    moved = dataclasses.replace(
        CONFIG, merchant_account="acct-00004", merchant_client=1, hold_expires_in_ms=5_000
    )

    async def main() -> None:
        async with httpx.AsyncClient(
            base_url="http://gw", transport=httpx.MockTransport(gateway)
        ) as http:
            step = Step(Do.CALL, Call.AUTHORIZE)
            await Shop(CONFIG, store, http)._call(order, step)  # before the kill
            await Shop(moved, store, http)._call(order, step)  # after the restart

    trio.run(main)
    (_, key1, body1), (_, key2, body2) = gateway.sent
    assert key1 == key2
    assert body1 == body2, f"same key, another body: {body1} vs {body2}"
    assert body1["to"] == "acct-00000"
    assert body1["metadata"] == {"shop": "shop", "order_id": "order-1", "sku": "mug"}


def test_capture_after_a_config_edit_goes_to_the_journalled_merchant(tmp_path: Path) -> None:
    store = _store(tmp_path / "shop.db")
    order = _start(store, "order-1")
    gateway = FakeGateway()
    # The merchant moved to client 1 after the order started; the hold pays client 0's
    # account, so the capture must still carry client 0's key.
    moved = dataclasses.replace(CONFIG, merchant_account="acct-00004", merchant_client=1)
    tokens: list[str] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        tokens.append(request.headers["Authorization"])
        return await gateway(request)

    async def main() -> None:
        async with httpx.AsyncClient(
            base_url="http://gw", transport=httpx.MockTransport(recording)
        ) as http:
            await Shop(moved, store, http)._steps(order)

    trio.run(main)
    done = store.order("order-1")
    assert done is not None and done.outcome is Outcome.FULFILLED
    assert [path for path, _, _ in gateway.sent] == ["/v1/payments", "/v1/payments/pay_1_1/capture"]
    assert gateway.sent[0][2]["to"] == "acct-00000"
    assert tokens == ["Bearer gk_b", "Bearer gk_a"]  # the buyer's client, then merchant 0's


def test_a_database_from_before_the_merchant_columns_is_refused(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE orders (order_id TEXT PRIMARY KEY, sku TEXT)")
    old.commit()
    old.close()
    with pytest.raises(ShopError, match="older shop.py"):
        ShopStore(tmp_path / "old.db", "shop")


# --- S2: bounded resume; a stuck order is journalled once ------------------------------------


def test_resume_drives_a_long_journal_with_bounded_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shop_module, "RESUME_WORKERS", 4)
    store = _store(tmp_path / "shop.db", stock=100)
    for number in range(40):
        _start(store, f"o-{number}")
    gateway = FakeGateway()
    peak_running = 0

    async def main() -> None:
        nonlocal peak_running
        async with (
            httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(gateway)) as http,
            trio.open_nursery() as nursery,
        ):
            shop = Shop(CONFIG, store, http)
            shop.nursery = nursery
            assert await shop.resume() == 40
            with trio.fail_after(30):
                while store.unfinished():
                    peak_running = max(peak_running, len(shop.running))
                    await trio.sleep(0.0005)

    trio.run(main)
    assert 1 <= peak_running <= 4
    assert gateway.peak <= 4
    assert {order.outcome for order in store.orders()} == {Outcome.FULFILLED}
    assert gateway.payments == 40


def test_a_stuck_order_is_journalled_once_across_restarts(tmp_path: Path) -> None:
    store = _store(tmp_path / "shop.db")
    _start(store, "o-1")
    # The key answered for another body before (a hold may exist): stuck, for a person.
    reused = {"type": "https://pbft-payments.dev/problems/idempotency-key-reused"}
    gateway = FakeGateway(httpx.Response(422, json=reused))

    async def restart() -> None:
        async with (
            httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(gateway)) as http,
            trio.open_nursery() as nursery,
        ):
            shop = Shop(CONFIG, store, http)
            shop.nursery = nursery
            assert await shop.resume() == 1

    for _ in range(3):
        trio.run(restart)
    entries = [entry for entry, _ in store.journal("o-1")]
    assert entries == ["started", "stuck"]
    order = store.order("o-1")
    assert order is not None and order.stage is Stage.STARTED
    assert order.note.startswith("stuck: authorize ")
    assert len(gateway.sent) == 3  # each start tries again, and journals nothing new


def test_a_new_reason_to_be_stuck_is_journalled(tmp_path: Path) -> None:
    store = _store(tmp_path / "shop.db")
    _start(store, "o-1")
    store.stuck("o-1", "a")
    store.stuck("o-1", "a")
    store.stuck("o-1", "b")
    assert [(entry, detail) for entry, detail in store.journal("o-1")][1:] == [
        ("stuck", {"note": "a"}),
        ("stuck", {"note": "b"}),
    ]


# --- S3: keys carry the database's instance id and the order's nonce -------------------------


def test_two_databases_under_one_name_never_share_a_key(tmp_path: Path) -> None:
    first, second = _store(tmp_path / "a.db"), _store(tmp_path / "b.db")
    assert first.instance != second.instance
    one, other = _start(first, "o-1"), _start(second, "o-1")
    assert {one.key(call) for call in Call}.isdisjoint({other.key(call) for call in Call})
    assert all(one.key(call).startswith(f"shop:{first.instance}:o-1:") for call in Call)


def test_a_lost_database_makes_a_new_hold_instead_of_replaying(tmp_path: Path) -> None:
    gateway = FakeGateway()
    lost = _store(tmp_path / "lost.db")
    trio.run(_steps, CONFIG, lost, gateway, _start(lost, "o-1"))
    fresh = _store(tmp_path / "fresh.db")  # the shop's database is gone: a new one
    trio.run(_steps, CONFIG, fresh, gateway, _start(fresh, "o-1"))
    first, again = lost.order("o-1"), fresh.order("o-1")
    assert first is not None and again is not None
    assert (first.outcome, again.outcome) == (Outcome.FULFILLED, Outcome.FULFILLED)
    # Two items, two holds, two captures: not one charge replayed for a second item.
    assert (first.payment_id, again.payment_id) == ("pay_1_1", "pay_1_2")
    assert gateway.payments == 2


def test_a_restored_backup_makes_a_new_hold_instead_of_replaying(tmp_path: Path) -> None:
    gateway = FakeGateway()
    live = _store(tmp_path / "live.db")
    backup = sqlite3.connect(tmp_path / "backup.db")
    live.db.backup(backup)  # taken before order o-1
    backup.close()
    trio.run(_steps, CONFIG, live, gateway, _start(live, "o-1"))
    restored = ShopStore(tmp_path / "backup.db", "shop")
    assert restored.instance == live.instance  # the same database, an older state of it
    trio.run(_steps, CONFIG, restored, gateway, _start(restored, "o-1"))
    again = restored.order("o-1")
    assert again is not None and again.outcome is Outcome.FULFILLED
    assert again.payment_id == "pay_1_2"
    assert gateway.payments == 2


def test_a_known_order_id_keeps_its_keys_across_reopens(tmp_path: Path) -> None:
    store = _store(tmp_path / "shop.db")
    order = _start(store, "o-1")
    reopened = ShopStore(tmp_path / "shop.db", "shop")
    assert _start(reopened, "o-1") == order
