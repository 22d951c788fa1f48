"""A tiny web shop that sells through the payment gateway and never charges for missing stock.

    python examples/shop/shop.py --config shop.toml --db shop.db --listen 127.0.0.1:8090

Its own HTTP server (FastAPI on hypercorn's trio worker, like the gateway): buyers POST an
order, and each order is driven by the journal of examples/shop/shop_orders.py: authorize
(a hold), reserve an item in the shop's SQLite, capture if reserved, void otherwise. A server
rather than a command per order: one long-lived process owns the stock and its journal, and
at start it resumes every unfinished order of the journal (RESUME_WORKERS at a time) before
it is killed again; this is the process the kill test kills.

HTTP API (JSON; errors are application/problem+json naming the field):
- POST /orders {"order_id", "sku", "buyer_account", "buyer_client"} -> 200 with the finished
  order, or 202 with it unfinished (it goes on in the background; poll GET). The same
  order id with the same fields is the same order (safe to retry); other fields: 409.
- GET /orders/{order_id}, GET /items (price and stock left), GET /healthz.

Configuration (TOML; it holds API keys: keep it private):
    name = "shop"                        # first part of every Idempotency-Key the shop uses
    gateway = "http://127.0.0.1:8080"
    merchant_account = "acct-00000"      # receives the captures (of orders started after)
    merchant_client = 0                  # owns merchant_account: captures and voids
    hold_expires_in_ms = 900000          # how long a hold lasts if the shop stays down
    [api_keys]                           # cluster client id -> the gateway's API key for it
    "0" = "gk_..."
    "1" = "gk_..."
    [items]                              # put on the shelf when the database has no such sku
    mug = { price = 700, stock = 5 }

Exit codes: 0 stopped by SIGINT/SIGTERM, 2 a usage or configuration mistake (one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import signal
import sqlite3
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from pydantic import BaseModel, ConfigDict, Field
from shop_orders import Answer, Call, Do, Kind, Stage, Step, after, classify, first_step
from shop_store import (
    MAX_ACCOUNT_NAME_LENGTH,
    MAX_CLIENT_ID,
    Order,
    OrderConflict,
    ShopError,
    ShopStore,
    check_item,
    check_name,
)

EXIT_USAGE = 2
PROBLEM_PREFIX = "https://pbft-payments.dev/problems/shop/"
# An unanswered call is repeated after 0.2 s, doubling up to 5 s, for as long as it takes:
# every call is idempotent, and giving up would leave a hold open or an item unpaid.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
# The gateway waits up to its cluster timeout (10 s by default) before its 504.
GATEWAY_TIMEOUT_S = 30.0
# How long POST /orders waits for the order to finish before answering 202.
ORDER_WAIT_S = 20.0
MAX_RUNNING_ORDERS = 1000
MAX_CONCURRENT_CALLS = 32
# Orders resumed at start are driven by this many workers, however long the journal.
RESUME_WORKERS = 32
MAX_HOLD_MS = 3_600_000
MAX_BODY_BYTES = 16 * 1024

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration file is unusable; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class ShopConfig:
    name: str
    gateway: str
    merchant_account: str
    merchant_client: int
    hold_expires_in_ms: int
    api_keys: dict[int, str]
    items: dict[str, tuple[int, int]]


def load_config(path: Path) -> ShopConfig:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not TOML: {error}") from None

    def setting(name: str, kind: type[T]) -> T:
        value = document.get(name)
        if type(value) is not kind:
            raise ConfigError(f"{path}: {name} must be a {kind.__name__}")
        return value

    try:
        name = check_name("name", setting("name", str))
    except ShopError as error:
        raise ConfigError(f"{path}: {error}") from None
    gateway = setting("gateway", str)
    if not gateway.startswith(("http://", "https://")):
        raise ConfigError(f"{path}: gateway must be an http:// or https:// URL")
    merchant_account = setting("merchant_account", str)
    if not 0 < len(merchant_account) <= MAX_ACCOUNT_NAME_LENGTH:
        raise ConfigError(f"{path}: merchant_account must be an account name")
    merchant_client = setting("merchant_client", int)
    hold_ms = setting("hold_expires_in_ms", int)
    if not 1 <= hold_ms <= MAX_HOLD_MS:
        raise ConfigError(f"{path}: hold_expires_in_ms must be in 1..{MAX_HOLD_MS}")
    keys: dict[int, str] = {}
    for client, token in setting("api_keys", dict).items():
        if not client.isdigit() or int(client) > MAX_CLIENT_ID or type(token) is not str:
            raise ConfigError(f"{path}: api_keys maps client ids to API key strings")
        keys[int(client)] = token
    if merchant_client not in keys:
        raise ConfigError(f"{path}: api_keys has no key for merchant_client {merchant_client}")
    items: dict[str, tuple[int, int]] = {}
    shelf = document.get("items", {})
    if not isinstance(shelf, dict):
        raise ConfigError(f"{path}: items must be a table")
    for sku, item in shelf.items():
        if not isinstance(item, dict) or set(item) != {"price", "stock"}:
            raise ConfigError(f"{path}: items.{sku} must be {{price = N, stock = N}}")
        price, stock = item["price"], item["stock"]
        try:
            check_name("sku", sku)
            check_item(price, stock)
        except ShopError as error:
            raise ConfigError(f"{path}: items.{sku}: {error}") from None
        items[sku] = (price, stock)
    return ShopConfig(name, gateway, merchant_account, merchant_client, hold_ms, keys, items)


class OrderBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    order_id: str = Field(min_length=1, max_length=64)
    sku: str = Field(min_length=1, max_length=64)
    buyer_account: str = Field(min_length=1, max_length=64)
    buyer_client: int = Field(ge=0, le=MAX_CLIENT_ID)


def problem(status: int, slug: str, detail: str, field: str | None = None) -> JSONResponse:
    body: dict[str, object] = {
        "type": PROBLEM_PREFIX + slug,
        "title": slug.replace("-", " "),
        "status": status,
        "detail": detail,
    }
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def log(event: str, **fields: object) -> None:
    """One JSON line on stderr per thing worth knowing afterwards."""
    line = {"at_ms": time.time_ns() // 1_000_000, "event": event, **fields}
    print(json.dumps(line, sort_keys=True), file=sys.stderr, flush=True)


class Shop:
    """The store, the gateway connection and the orders being driven in this process."""

    def __init__(self, config: ShopConfig, store: ShopStore, http: httpx.AsyncClient) -> None:
        self.config = config
        self.store = store
        self.http = http
        self.running: dict[str, trio.Event] = {}
        self.nursery: trio.Nursery | None = None
        # SQLite calls run on a worker thread, one at a time (one connection).
        self._db_lock = trio.CapacityLimiter(1)
        self._calls = trio.CapacityLimiter(MAX_CONCURRENT_CALLS)

    async def db(self, function: Callable[..., T], *arguments: Any) -> T:
        return await trio.to_thread.run_sync(lambda: function(*arguments), limiter=self._db_lock)

    def drive(self, order: Order) -> trio.Event:
        """Start driving `order` to done unless this process already is; its done event."""
        event = self.running.get(order.order_id)
        if event is None:
            assert self.nursery is not None, "drive() before run() started"
            event = self.running[order.order_id] = trio.Event()
            self.nursery.start_soon(self._drive, order.order_id, event)
        return event

    async def resume(self) -> int:
        """Drive every order the journal says is unfinished (after a crash, a kill -9), at
        most RESUME_WORKERS at a time; how many there are."""
        assert self.nursery is not None, "resume() before run() started"
        unfinished = await self.db(self.store.unfinished)
        send, receive = trio.open_memory_channel[str](0)
        self.nursery.start_soon(self._feed, send, unfinished)
        async with receive:
            for _ in range(min(RESUME_WORKERS, len(unfinished))):
                self.nursery.start_soon(self._resume_worker, receive.clone())
        return len(unfinished)

    async def _feed(self, send: trio.MemorySendChannel[str], order_ids: list[str]) -> None:
        async with send:
            for order_id in order_ids:
                await send.send(order_id)

    async def _resume_worker(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for order_id in receive:
                if order_id in self.running:
                    continue  # a buyer's POST drives it already
                log("resume", order_id=order_id)
                event = self.running[order_id] = trio.Event()
                await self._drive(order_id, event)

    async def _drive(self, order_id: str, done: trio.Event) -> None:
        try:
            order = await self.db(self.store.order, order_id)
            if order is not None and order.stage is not Stage.DONE:
                await self._steps(order)
        finally:
            del self.running[order_id]
            done.set()

    async def _steps(self, order: Order) -> None:
        step = first_step(order.stage)
        delay = RETRY_FIRST_S
        while True:
            if step.do is Do.RESERVE:
                order = await self.db(self.store.reserve, order.order_id)
                log("stage", order_id=order.order_id, stage=order.stage.value)
                step = first_step(order.stage)
            elif step.do is Do.RELEASE:
                order = await self.db(self.store.release, order.order_id, step.note)
                log("stage", order_id=order.order_id, stage=order.stage.value, note=step.note)
                step = first_step(order.stage)
            elif step.do is Do.FINISH:
                assert step.outcome is not None
                await self.db(self.store.finish, order.order_id, step.outcome, step.note)
                log("done", order_id=order.order_id, outcome=step.outcome.value, note=step.note)
                return
            elif step.do is Do.STUCK:
                await self.db(self.store.stuck, order.order_id, step.note)
                log("stuck", order_id=order.order_id, stage=order.stage.value, note=step.note)
                return
            elif step.do is Do.RETRY:
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                step = first_step(order.stage)
            else:
                answer = await self._call(order, step)
                if answer.payment_id and order.payment_id is None:
                    await self.db(self.store.note_payment, order.order_id, answer.payment_id)
                    order = dataclasses.replace(order, payment_id=answer.payment_id)
                step = after(order.stage, answer)
                if step.do is Do.RETRY:
                    log("retry", order_id=order.order_id, call=str(step.call), why=step.note)
                else:
                    delay = RETRY_FIRST_S

    async def _call(self, order: Order, step: Step) -> Answer:
        call = step.call
        assert call is not None
        # Every field of a body comes from the order's journal row, never from the current
        # configuration: a retry after an edit sends the same body under the same key.
        if call is Call.AUTHORIZE:
            path = "/v1/payments"
            client = order.buyer_client
            body: dict[str, object] = {
                "from": order.buyer_account,
                "to": order.merchant_account,
                "amount": order.amount,
                "capture": False,
                "expires_in_ms": order.expires_in_ms,
                "metadata": {"shop": order.shop_name, "order_id": order.order_id, "sku": order.sku},
            }
        else:
            if order.payment_id is None:
                # The authorize's answer was lost before it was noted: its replay names it.
                return await self._call(order, Step(Do.CALL, Call.AUTHORIZE))
            client = order.merchant_client
            path = f"/v1/payments/{order.payment_id}/{call}"
            body = {"amount": order.amount} if call is Call.CAPTURE else {}
        token = self.config.api_keys.get(client)
        if token is None:
            return Answer(Kind.DENIED, reason=f"no API key for client {client}")
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": order.key(call)}
        async with self._calls:
            try:
                response = await self.http.post(path, json=body, headers=headers)
            except httpx.HTTPError as error:
                return classify(None, f"{type(error).__name__}: {error}")
        try:
            decoded = response.json()
        except ValueError:
            decoded = None
        answer = classify(response.status_code, decoded)
        # A payment answered to a capture or void has the authorize's id; keep the first.
        if call is not Call.AUTHORIZE:
            answer = dataclasses.replace(answer, payment_id="")
        return answer


def create_app(shop: Shop) -> FastAPI:
    app = FastAPI(title="pbft example shop", version="1")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        return problem(
            422, "invalid-order", str(first.get("msg", "invalid")), ".".join(where) or None
        )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return problem(413, "body-too-large", f"bodies are at most {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.post("/orders")
    async def place(body: OrderBody) -> JSONResponse:
        if body.buyer_client not in shop.config.api_keys:
            detail = f"the shop takes no payments from client {body.buyer_client}"
            return problem(422, "unknown-client", detail, "buyer_client")
        busy = len(shop.running) >= MAX_RUNNING_ORDERS
        if busy and await shop.db(shop.store.order, body.order_id) is None:
            # Refused before it is journalled: a new order waits for room, an old one is
            # looked at below (it may be done, or already being driven).
            return problem(503, "busy", "too many unfinished orders; try again")
        try:
            order = await shop.db(
                shop.store.start,
                body.order_id,
                body.sku,
                body.buyer_account,
                body.buyer_client,
                shop.config.hold_expires_in_ms,
                shop.config.merchant_account,
                shop.config.merchant_client,
            )
        except ShopError as error:
            if isinstance(error, OrderConflict):
                return problem(409, "order-conflict", str(error), error.field)
            return problem(422, "order-refused", str(error), error.field)
        if order.stage is not Stage.DONE:
            if order.order_id not in shop.running and busy:
                return problem(503, "busy", "too many unfinished orders; try again")
            with trio.move_on_after(ORDER_WAIT_S):
                await shop.drive(order).wait()
            order = await shop.db(shop.store.order, body.order_id) or order
        return JSONResponse(order.as_json(), status_code=200 if order.stage is Stage.DONE else 202)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: str) -> JSONResponse:
        order = await shop.db(shop.store.order, order_id)
        if order is None:
            return problem(404, "no-such-order", f"no order {order_id!r}", "order_id")
        return JSONResponse(order.as_json())

    @app.get("/items")
    async def items() -> JSONResponse:
        stock = await shop.db(shop.store.items)
        return JSONResponse(
            {sku: {"price": price, "stock": left} for sku, (price, left) in stock.items()}
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"ok": True, "running": len(shop.running)})

    return app


async def run(config: ShopConfig, db_path: Path, listen: str) -> None:
    store = ShopStore(db_path, config.name)
    have = store.items()
    for sku, (price, stock) in config.items.items():
        if sku not in have:
            store.put_item(sku, price, stock)
    timeout = httpx.Timeout(GATEWAY_TIMEOUT_S, connect=5.0)
    limits = httpx.Limits(max_connections=MAX_CONCURRENT_CALLS)
    async with httpx.AsyncClient(base_url=config.gateway, timeout=timeout, limits=limits) as http:
        shop = Shop(config, store, http)
        hypercorn = HypercornConfig()
        hypercorn.bind = [listen]
        hypercorn.graceful_timeout = 5.0
        hypercorn.accesslog = None
        async with trio.open_nursery() as nursery:
            shop.nursery = nursery
            resumed = await shop.resume()

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        return

            async def serve_then_stop(
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await serve(
                    create_app(shop),  # type: ignore[arg-type]
                    hypercorn,
                    shutdown_trigger=stop_on_signal,
                    task_status=task_status,
                )
                # Unfinished orders stop here; the journal resumes them at the next start.
                nursery.cancel_scope.cancel()

            binds = await nursery.start(serve_then_stop)
            log("listening", binds=binds, resumed=resumed)
    store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shop.py",
        description="A tiny web shop selling through the pbft payment gateway.",
        epilog="Exit codes: 0 stopped by SIGINT/SIGTERM; 2 a usage or configuration mistake.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the shop's TOML file")
    parser.add_argument("--db", type=Path, required=True, help="the shop's SQLite books")
    parser.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT on 127.0.0.1")
    arguments = parser.parse_args(argv)
    host, _, port = arguments.listen.rpartition(":")
    if host != "127.0.0.1" or not port.isdigit() or not 0 <= int(port) <= 65535:
        print(
            f"shop.py: --listen must be 127.0.0.1:PORT, got {arguments.listen!r}", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        config = load_config(arguments.config)
        if not arguments.db.parent.is_dir():
            raise ConfigError(f"--db: no directory {arguments.db.parent}")
        trio.run(run, config, arguments.db, arguments.listen)
    except BaseException as raised:
        error = _lone(raised)
        if isinstance(error, KeyboardInterrupt):
            return 0
        if isinstance(error, ConfigError | ShopError):
            message = str(error)
        elif isinstance(error, sqlite3.Error):
            message = f"--db {arguments.db}: {error}"
        elif isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            message = f"--listen {arguments.listen}: the address is in use"
        else:
            raise
        print(f"shop.py: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _lone(error: BaseException) -> BaseException:
    """The one exception inside (nested) one-member groups, as trio's nurseries wrap it."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
