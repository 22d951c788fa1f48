"""examples/shop/shop.py's HTTP layer in process (httpx's ASGI transport, under trio), with
the gateway unreachable: an order that cannot get its hold answers 202 and takes no item;
a shop with too many unfinished orders refuses a new one (503) before journalling it, yet
still answers for an order it has finished."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "shop"))

# examples/shop is not an installed package: its modules are imported by path.
import shop as shop_module
from shop import Shop, ShopConfig, create_app
from shop_orders import Outcome, Stage
from shop_store import ShopStore

# Nothing listens on the discard port: every gateway call fails at once (connection refused).
DEAD_GATEWAY = "http://127.0.0.1:9"
ORDER = {"order_id": "o-1", "sku": "mug", "buyer_account": "acct-00002", "buyer_client": 1}


@asynccontextmanager
async def running_shop(tmp_path: Path) -> AsyncIterator[tuple[Shop, httpx.AsyncClient]]:
    config = ShopConfig("shop", DEAD_GATEWAY, "acct-00000", 0, 60_000, {0: "gk_a", 1: "gk_b"}, {})
    store = ShopStore(tmp_path / "shop.sqlite", "shop")
    store.put_item("mug", 700, 1)
    async with (
        httpx.AsyncClient(base_url=DEAD_GATEWAY, timeout=5.0) as gateway,
        trio.open_nursery() as nursery,
    ):
        shop = Shop(config, store, gateway)
        shop.nursery = nursery
        transport = httpx.ASGITransport(app=create_app(shop))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            yield shop, http
        nursery.cancel_scope.cancel()
    store.close()


def test_no_hold_no_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shop_module, "ORDER_WAIT_S", 0.5)

    async def scenario() -> None:
        async with running_shop(tmp_path) as (shop, http):
            answer = await http.post("/orders", json=ORDER)
            assert answer.status_code == 202
            assert (answer.json()["stage"], answer.json()["outcome"]) == ("started", None)
            assert "o-1" in shop.running  # still asking the gateway, with backoff
            assert (await http.get("/items")).json() == {"mug": {"price": 700, "stock": 1}}
            assert (await http.get("/orders/o-1")).json()["stage"] == "started"
            assert (await http.get("/healthz")).json() == {"ok": True, "running": 1}

    trio.run(scenario)
    books = ShopStore(tmp_path / "shop.sqlite", "shop")
    assert books.reserved_orders() == {}
    assert [entry for entry, _ in books.journal("o-1")] == ["started"]
    books.close()


def test_a_busy_shop_refuses_new_orders_before_journalling_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shop_module, "MAX_RUNNING_ORDERS", 1)
    monkeypatch.setattr(shop_module, "ORDER_WAIT_S", 0.2)

    async def scenario() -> None:
        async with running_shop(tmp_path) as (shop, http):
            # A finished order, as if from an earlier run.
            await shop.db(
                shop.store.start, "done-1", "mug", "acct-00002", 1, 60_000, "acct-00000", 0
            )
            await shop.db(shop.store.finish, "done-1", Outcome.OUT_OF_STOCK)
            assert (await http.post("/orders", json=ORDER)).status_code == 202
            refused = await http.post("/orders", json={**ORDER, "order_id": "o-2"})
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert (await http.get("/orders/o-2")).status_code == 404
            again = await http.post("/orders", json=ORDER)  # the one being driven: 202
            assert again.status_code == 202
            done = await http.post("/orders", json={**ORDER, "order_id": "done-1"})
            assert (done.status_code, done.json()["stage"]) == (200, Stage.DONE.value)

    trio.run(scenario)
