"""The example shop (examples/shop/) for real: a 4-replica cluster, a `pbft gateway` process
and the shop process, all on 127.0.0.1; 40 buyers order 15 items at once while the shop and
the gateway are killed with SIGKILL at seeded random moments and started again.

Afterwards the shop's books, the gateway's payments and the cluster's ledger must agree:
- every order is done, none stuck; an order is fulfilled iff it holds a reserved item;
- every SKU sold min(stock, demand) items: no sale lost, none sold twice;
- the gateway has exactly one payment per order (no hold placed twice), captured for a
  fulfilled order, voided otherwise: nobody charged without an item, no open hold left;
- the ledger (GET /v1/accounts, and the cluster read directly): the merchant's balance grew
  by the captured sum, each buyer's fell by what it bought, nothing is held anywhere.

The first kill always lands between submit and answer: two replicas are stopped (SIGSTOP)
so the cluster decides nothing, the shop (and by the seed the gateway) is killed with
requests in flight, then the replicas go on; the restarted shop resumes those orders from
its journal with the same keys (a shop that made new keys would place second holds, and
this test sees them). The other kills fall where the seed puts them. Every wait is bounded.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from gateway_harness import STARTUP_S, GatewayHarness

from runtime.ports import consecutive_free_ports

SHOP_DIR = Path(__file__).resolve().parent.parent / "examples" / "shop"
sys.path.insert(0, str(SHOP_DIR))

from shop_orders import Outcome, Stage  # noqa: E402 (examples/shop is imported by path)
from shop_store import ShopStore  # noqa: E402

SEED = 1130
BUYERS = 40
ITEMS = {"cap": (700, 5), "mug": (300, 5), "tee": (500, 5)}
MERCHANT_CLIENT = 0
MERCHANT = "acct-00000"
# write_cluster: client c owns acct-(2c) and acct-(2c+1); buyers use clients 1 and 2.
BUYER_ACCOUNTS = {"acct-00002": 1, "acct-00003": 1, "acct-00004": 2, "acct-00005": 2}
# Buyers arrive over this many seconds, while the kills happen.
ARRIVALS_S = 12.0
RANDOM_KILLS = 4
# Stopped (SIGSTOP) to hold requests in flight: two of four leave no quorum; not 0, the
# primary of view 0, so the pause costs no view change.
STALLED_REPLICAS = (2, 3)
ORDERS_DEADLINE_S = 240.0
STOP_S = 30.0


class ShopProcess:
    """examples/shop/shop.py as a process on a fixed port (the buyers come back to it)."""

    def __init__(self, root: Path, config: Path, db: Path, port: int) -> None:
        self.root = root
        self.config = config
        self.db = db
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = root / "shop.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts: list[dict[str, Any]] = []

    def start(self, timeout_s: float = STARTUP_S) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [sys.executable, str(SHOP_DIR / "shop.py"), "--config", str(self.config)]
        command += ["--db", str(self.db), "--listen", f"127.0.0.1:{self.port}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for record in self.records(offset):
                if record.get("event") == "listening":
                    self.starts.append(record)
                    return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the shop exited with {self.process.returncode}:\n{self.tail()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"the shop did not listen within {timeout_s:g} s:\n{self.tail()}")

    def records(self, offset: int = 0) -> list[dict[str, Any]]:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        records = []
        for line in lines:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by SIGKILL
        return records

    def tail(self, count: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-count:])

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_S)
            self.process = None

    def stop(self) -> int | None:
        """SIGTERM and its exit status (None if it was not running)."""
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_S)
            raise RuntimeError(f"the shop ignored SIGTERM:\n{self.tail()}") from None
        self.process = None
        return code


def write_config(
    path: Path,
    gateway_url: str,
    tokens: dict[int, str],
    *,
    name: str = "shop",
    merchant: str = MERCHANT,
    hold_ms: int = 900_000,
    items: dict[str, tuple[int, int]] = ITEMS,
) -> None:
    keys = "\n".join(f'"{client}" = "{token}"' for client, token in sorted(tokens.items()))
    shelf = "\n".join(
        f"{sku} = {{ price = {price}, stock = {stock} }}" for sku, (price, stock) in items.items()
    )
    path.write_text(
        f'name = "{name}"\ngateway = "{gateway_url}"\nmerchant_account = "{merchant}"\n'
        f"merchant_client = {MERCHANT_CLIENT}\nhold_expires_in_ms = {hold_ms}\n"
        f"[api_keys]\n{keys}\n[items]\n{shelf}\n"
    )
    path.chmod(0o600)


async def buyer(
    index: int, order: dict[str, Any], start_s: float, shop_url: str, results: dict[int, Any]
) -> None:
    """Place one order and come back with the same order id until it is done (the shop may
    be dead for a while): what a browser's retry does."""
    await trio.sleep(start_s)
    delay = 0.1
    async with httpx.AsyncClient(base_url=shop_url, timeout=60.0) as http:
        with trio.fail_after(ORDERS_DEADLINE_S):
            while True:
                try:
                    response = await http.post("/orders", json=order)
                except httpx.HTTPError:
                    response = None
                if response is not None:
                    if response.status_code == 200:
                        results[index] = response.json()
                        return
                    if response.status_code not in (202, 503):
                        raise AssertionError(
                            f"order {order}: {response.status_code} {response.text}"
                        )
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def chaos(
    rng: random.Random, harness: GatewayHarness, shop: ShopProcess, log: list[str]
) -> None:
    """First, while buyers are still arriving, a kill that lands between submit and answer
    for sure: two replicas are stopped (SIGSTOP: no quorum, so every payment the gateway
    sends waits), the shop is killed (and, by the seed, the gateway too) with those requests
    in flight, then the replicas go on (SIGCONT) and the killed processes start again. Then
    RANDOM_KILLS kills of the shop, the gateway or both at seeded moments, each started
    again after a seeded pause."""
    gateway = harness.gateway
    await trio.sleep(rng.uniform(1.0, 3.0))
    stalled = [harness.local.processes[replica] for replica in STALLED_REPLICAS]
    for process in stalled:
        process.send_signal(signal.SIGSTOP)
    try:
        await trio.sleep(rng.uniform(1.5, 3.0))  # orders pile up at the gateway
        shop.kill()
        both = rng.random() < 0.5
        if both:
            gateway.kill()
        log.append("in flight: shop" + (" and gateway" if both else ""))
    finally:
        for process in stalled:
            process.send_signal(signal.SIGCONT)
    if both:
        await trio.to_thread.run_sync(gateway.start)
    await trio.to_thread.run_sync(shop.start)
    for _ in range(RANDOM_KILLS):
        await trio.sleep(rng.uniform(0.3, 2.5))
        victim = rng.choice(["shop", "gateway", "both"])
        if victim in ("shop", "both"):
            shop.kill()
        if victim in ("gateway", "both"):
            gateway.kill()
        log.append(victim)
        await trio.sleep(rng.uniform(0.0, 1.0))
        if victim in ("gateway", "both"):
            await trio.to_thread.run_sync(gateway.start)
        if victim in ("shop", "both"):
            await trio.to_thread.run_sync(shop.start)


def all_pages(http: httpx.Client, account: str) -> list[dict[str, Any]]:
    payments: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"account": account, "limit": 100}
        if after is not None:
            params["starting_after"] = after
        page = http.get("/v1/payments", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        payments += body["data"]
        if not body["has_more"]:
            return payments
        after = body["data"][-1]["id"]
    raise AssertionError("more than 100 pages of payments")


def wait_for_balances(
    harness: GatewayHarness,
    tokens: dict[int, str],
    owners: dict[str, int],
    expected: dict[str, int],
) -> dict[str, dict[str, Any]]:
    """GET /v1/accounts for each account (with its owner's key) until it shows `expected`
    (a read may lag the last decision by a moment); bounded."""
    deadline = time.monotonic() + 60.0
    while True:
        seen = {}
        for account, owner in owners.items():
            with harness.http(tokens[owner]) as http:
                answer = http.get(f"/v1/accounts/{account}")
            assert answer.status_code == 200, answer.text
            seen[account] = answer.json()
        if all(seen[name]["available"] == value for name, value in expected.items()):
            return seen
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


@dataclass
class Env:
    root: Path
    harness: GatewayHarness
    tokens: dict[int, str]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One cluster and gateway (clients 0-3) for the module: the kill test uses clients 1-2's
    accounts, the other test client 3's, so neither sees the other's payments."""
    root = tmp_path_factory.mktemp("shop")
    [gateway_port] = consecutive_free_ports(1)
    listen = ("--listen", f"127.0.0.1:{gateway_port}")  # fixed: the shop comes back to it
    with GatewayHarness.start(root, clients=4, extra=listen) as harness:
        tokens = {client: harness.create_key(client) for client in range(4)}
        yield Env(root, harness, tokens)


def post(url: str, body: object, **options: Any) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60.0) as http:
        return http.post("/orders", json=body, **options)


def test_shop_declines_releases_and_refuses(env: Env) -> None:
    """What the kill test does not reach: a hold that expires before its capture (the item
    goes back on the shelf and the hold is voided or expired: nobody charged), a buyer
    without the money (declined, stock untouched), an account the buyer's client does not
    own (declined by the gateway's 403), and the shop's own 4xx for bad orders."""
    harness, tokens = env.harness, env.tokens
    root = env.root / "declines"
    root.mkdir()
    buyers = {"acct-00006": 3, "acct-00007": 3}
    merchant = "acct-00001"  # client 0's other account: the kill test's merchant is apart
    owners = {merchant: MERCHANT_CLIENT, **buyers}
    before = harness.balances(list(owners))
    config = root / "shop.toml"
    # A hold of 1 ms has expired by the time its capture is decided (a later batch).
    items = {"mug": (300, 2), "yacht": (before["acct-00007"] + 1, 1)}
    write_config(
        config,
        harness.gateway.url,
        {0: tokens[0], 3: tokens[3]},
        name="shop2",
        merchant=merchant,
        hold_ms=1,
        items=items,
    )
    [port] = consecutive_free_ports(1)
    shop = ShopProcess(root, config, root / "shop.sqlite", port)
    shop.start()
    try:
        expired = post(shop.url, order("late", "mug", "acct-00006", 3))
        poor = post(shop.url, order("poor", "yacht", "acct-00007", 3))
        theirs = post(shop.url, order("theirs", "mug", "acct-00002", 3))
        assert [answer.status_code for answer in (expired, poor, theirs)] == [200, 200, 200]
        assert expired.json()["outcome"] == "cancelled"
        assert poor.json()["outcome"] == "declined"
        assert poor.json()["note"] == "insufficient_funds"
        assert theirs.json()["outcome"] == "declined"
        assert "403" in theirs.json()["note"] and theirs.json()["payment_id"] is None
        # The shop's own refusals, each naming the field.
        refusals = [
            (order("late", "yacht", "acct-00006", 3), 409, "order_id"),
            (order("x", "mug", "acct-00006", 1), 422, "buyer_client"),
            (order("x", "tea", "acct-00006", 3), 422, "sku"),
            (order("x y", "mug", "acct-00006", 3), 422, "order_id"),
            ({**order("x", "mug", "acct-00006", 3), "buyer_client": 3.0}, 422, "buyer_client"),
            ({**order("x", "mug", "acct-00006", 3), "buyer_client": "3"}, 422, "buyer_client"),
            ({**order("x", "mug", "acct-00006", 3), "price": 1}, 422, "price"),
            ({"sku": "mug", "buyer_account": "acct-00006", "buyer_client": 3}, 422, "order_id"),
        ]
        for body, status, field in refusals:
            answer = post(shop.url, body)
            assert (answer.status_code, answer.json().get("field")) == (status, field), body
            assert answer.headers["content-type"] == "application/problem+json"
        too_big = post(shop.url, {**order("x", "mug", "acct-00006", 3), "pad": "x" * 20_000})
        assert too_big.status_code == 413
        with httpx.Client(base_url=shop.url, timeout=60.0) as http:
            items_left = http.get("/items").json()
            assert http.get("/orders/nobody").status_code == 404
        assert shop.stop() == 0  # SIGTERM: a clean stop
    finally:
        shop.stop()
    assert items_left == {
        "mug": {"price": 300, "stock": 2},
        "yacht": {"price": items["yacht"][0], "stock": 1},
    }
    books = ShopStore(shop.db, "shop2")
    try:
        journal = books.journal("late")
        late = books.order("late")
        assert books.reserved_orders() == {}
    finally:
        books.close()
    assert [entry for entry, _ in journal] == ["started", "reserved", "released", "done"]
    assert journal[2][1] == {"reason": "hold_expired"}
    assert late is not None and late.payment_id is not None
    with harness.http(tokens[3]) as http:
        payment = http.get(f"/v1/payments/{late.payment_id}").json()
    assert (payment["status"], payment["captured_amount"]) == ("expired", 0)
    seen = wait_for_balances(harness, tokens, owners, before)
    assert {name: seen[name]["available"] for name in owners} == before
    assert all(seen[name]["held"] == 0 for name in owners), seen


def order(order_id: str, sku: str, account: str, client: int) -> dict[str, object]:
    return {"order_id": order_id, "sku": sku, "buyer_account": account, "buyer_client": client}


def test_killed_shop_and_gateway_never_charge_for_missing_stock(env: Env) -> None:
    rng = random.Random(SEED)
    harness, tokens = env.harness, env.tokens
    accounts = [MERCHANT, *BUYER_ACCOUNTS]
    before = harness.balances(accounts)
    config = env.root / "shop.toml"
    write_config(config, harness.gateway.url, {c: tokens[c] for c in (0, 1, 2)})
    [shop_port] = consecutive_free_ports(1)
    shop = ShopProcess(env.root, config, env.root / "shop.sqlite", shop_port)
    shop.start()
    orders = {}
    for index in range(BUYERS):
        account = list(BUYER_ACCOUNTS)[index % len(BUYER_ACCOUNTS)]
        orders[index] = {
            "order_id": f"order-{index:02d}",
            "sku": rng.choice(sorted(ITEMS)),
            "buyer_account": account,
            "buyer_client": BUYER_ACCOUNTS[account],
        }
    arrivals = {index: rng.uniform(0.0, ARRIVALS_S) for index in orders}
    results: dict[int, Any] = {}
    kills: list[str] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            for index, order in orders.items():
                nursery.start_soon(buyer, index, order, arrivals[index], shop.url, results)
            nursery.start_soon(chaos, rng, harness, shop, kills)

    try:
        trio.run(scenario)
        assert shop.stop() == 0
    finally:
        shop.stop()
    print(f"seed {SEED}: kills {kills}; shop starts {[s['resumed'] for s in shop.starts]}")

    # --- the shop's books ----------------------------------------------------------------
    books = ShopStore(shop.db, "shop")
    try:
        done = {order.order_id: order for order in books.orders()}
        reserved = books.reserved_orders()
        stock = books.items()
    finally:
        books.close()
    assert len(done) == BUYERS
    assert all(order.stage is Stage.DONE for order in done.values()), done
    assert not [order for order in done.values() if order.note.startswith("stuck")]
    fulfilled = {oid for oid, order in done.items() if order.outcome is Outcome.FULFILLED}
    assert fulfilled == set(reserved)
    assert {order.outcome for order in done.values()} <= {
        Outcome.FULFILLED,
        Outcome.OUT_OF_STOCK,
    }
    demand = Counter(order["sku"] for order in orders.values())
    sold = Counter(reserved.values())
    for sku, (price, initial) in ITEMS.items():
        assert sold[sku] == min(initial, demand[sku]), (sku, sold, demand)
        assert stock[sku] == (price, initial - sold[sku])
    for index, order in orders.items():
        assert results[index]["outcome"] == done[order["order_id"]].outcome.value
    # The shop killed with requests in flight resumed them from its journal.
    assert shop.starts[1]["resumed"] > 0, shop.starts

    # --- the gateway's payments: one per order ------------------------------------------
    # Metadata is shown to the payment's creator only: the buyers' clients (1, 2) list them.
    payments = []
    for buyer_client in (1, 2):
        with harness.http(tokens[buyer_client]) as http:
            payments += [
                payment
                for payment in all_pages(http, MERCHANT)
                if payment["metadata"].get("shop") == "shop"
            ]
    by_order = Counter(payment["metadata"]["order_id"] for payment in payments)
    assert by_order == Counter(list(done)), "a hold placed twice, or an order without one"
    for payment in payments:
        order = done[payment["metadata"]["order_id"]]
        assert payment["id"] == order.payment_id
        assert payment["from"] == order.buyer_account
        assert payment["amount"] == order.amount
        if order.outcome is Outcome.FULFILLED:
            assert (payment["status"], payment["captured_amount"]) == ("captured", order.amount)
        else:
            assert (payment["status"], payment["captured_amount"]) == ("voided", 0)

    # --- the ledger agrees with the books ---------------------------------------------------
    paid = Counter[str]()
    for order_id in fulfilled:
        paid[done[order_id].buyer_account] += done[order_id].amount
    expected = {account: before[account] - paid[account] for account in BUYER_ACCOUNTS}
    expected[MERCHANT] = before[MERCHANT] + sum(paid.values())
    owners = {MERCHANT: MERCHANT_CLIENT, **BUYER_ACCOUNTS}
    seen = wait_for_balances(harness, tokens, owners, expected)
    assert {name: seen[name]["available"] for name in expected} == expected
    assert all(seen[name]["held"] == 0 for name in seen), seen
    assert harness.balances(accounts) == expected
