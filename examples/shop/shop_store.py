"""The shop's books: stock, orders, reservations and the journal, in one SQLite file.

WAL with synchronous=FULL: a transaction the shop acted on is on disk before the next
gateway call, so a kill -9 at any point leaves a journal the shop resumes from. Every stage
change is one transaction that also appends its journal row; the stock moves only in the
reserve and release transactions, together with the `reservations` row that says which
order holds the item. So at every commit: items sold = rows of `reservations`.

Not thread-safe by itself: the server (shop.py) runs every call on one worker thread at a
time. Limits: order ids, SKUs and account names are short printable strings (checked here,
as they arrive from outside), and the server bounds how many orders are unfinished.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from shop_orders import Call, Outcome, Stage, idempotency_key

# Order ids, SKUs and shop names end up in idempotency keys (<= 255 characters).
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_AMOUNT = 2**63 - 1
MAX_CLIENT_ID = 2**32 - 1
MAX_ACCOUNT_NAME_LENGTH = 64
MAX_STOCK = 10**9

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    sku TEXT PRIMARY KEY,
    price INTEGER NOT NULL CHECK (price > 0),
    stock INTEGER NOT NULL CHECK (stock >= 0)
);
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    sku TEXT NOT NULL REFERENCES items (sku),
    buyer_account TEXT NOT NULL,
    buyer_client INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    expires_in_ms INTEGER NOT NULL,
    shop_name TEXT NOT NULL,
    merchant_account TEXT NOT NULL,
    merchant_client INTEGER NOT NULL,
    stage TEXT NOT NULL,
    outcome TEXT,
    payment_id TEXT,
    authorize_key TEXT NOT NULL,
    capture_key TEXT NOT NULL,
    void_key TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_unfinished ON orders (stage) WHERE stage != 'done';
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY REFERENCES orders (order_id),
    sku TEXT NOT NULL REFERENCES items (sku)
);
CREATE TABLE IF NOT EXISTS instance (
    only INTEGER PRIMARY KEY CHECK (only = 0),
    id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
"""


class ShopError(ValueError):
    """An order or item the shop refuses; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class OrderConflict(ShopError):
    """The order id exists with other fields."""


@dataclass(frozen=True)
class Order:
    order_id: str
    sku: str
    buyer_account: str
    buyer_client: int
    amount: int
    expires_in_ms: int
    shop_name: str
    merchant_account: str
    merchant_client: int
    stage: Stage
    outcome: Outcome | None
    payment_id: str | None
    authorize_key: str
    capture_key: str
    void_key: str
    note: str

    def key(self, call: Call) -> str:
        return {
            Call.AUTHORIZE: self.authorize_key,
            Call.CAPTURE: self.capture_key,
            Call.VOID: self.void_key,
        }[call]

    def as_json(self) -> dict[str, object]:
        return {
            "order_id": self.order_id,
            "sku": self.sku,
            "buyer_account": self.buyer_account,
            "buyer_client": self.buyer_client,
            "amount": self.amount,
            "stage": self.stage.value,
            "outcome": None if self.outcome is None else self.outcome.value,
            "payment_id": self.payment_id,
            "note": self.note,
        }


_ORDER_COLUMNS = (
    "order_id, sku, buyer_account, buyer_client, amount, expires_in_ms, "
    "shop_name, merchant_account, merchant_client, stage, outcome, payment_id, "
    "authorize_key, capture_key, void_key, note"
)


def _order(row: tuple[object, ...]) -> Order:
    (order_id, sku, account, client, amount, hold_ms, shop, merchant, merchant_client) = row[:9]
    (stage, outcome, payment_id, a, c, v, note) = row[9:]
    return Order(
        str(order_id),
        str(sku),
        str(account),
        int(client),  # type: ignore[call-overload]
        int(amount),  # type: ignore[call-overload]
        int(hold_ms),  # type: ignore[call-overload]
        str(shop),
        str(merchant),
        int(merchant_client),  # type: ignore[call-overload]
        Stage(stage),
        None if outcome is None else Outcome(outcome),
        None if payment_id is None else str(payment_id),
        str(a),
        str(c),
        str(v),
        str(note),
    )


def check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ShopError(field, f"{field} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def check_item(price: object, stock: object) -> None:
    if type(price) is not int or not 0 < price <= MAX_AMOUNT:
        raise ShopError("price", f"price must be an integer in 1..{MAX_AMOUNT}")
    if type(stock) is not int or not 0 <= stock <= MAX_STOCK:
        raise ShopError("stock", f"stock must be an integer in 0..{MAX_STOCK}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ShopStore:
    """One connection to the shop's database (see the module docstring)."""

    def __init__(self, path: Path, shop_name: str) -> None:
        self.path = path
        self.shop_name = check_name("shop name", shop_name)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(orders)")}
        if columns and "merchant_account" not in columns:
            self.db.close()
            raise ShopError("db", f"{path}: made by an older shop.py (no merchant columns)")
        self.db.executescript(SCHEMA)
        # Drawn once, when the database is made: it goes into every Idempotency-Key.
        self.db.execute(
            "INSERT OR IGNORE INTO instance (only, id) VALUES (0, ?)", (secrets.token_hex(8),)
        )
        self.instance = str(self.db.execute("SELECT id FROM instance").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def _begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def _journal(self, order_id: str, entry: str, detail: dict[str, object]) -> None:
        self.db.execute(
            "INSERT INTO journal (order_id, entry, detail, at_ms) VALUES (?, ?, ?, ?)",
            (order_id, entry, json.dumps(detail, sort_keys=True), _now_ms()),
        )

    def _set_stage(self, order_id: str, stage: Stage, note: str = "") -> None:
        self.db.execute(
            "UPDATE orders SET stage = ?, note = ?, updated_ms = ? WHERE order_id = ?",
            (stage.value, note, _now_ms(), order_id),
        )

    # --- items ----------------------------------------------------------------------------

    def put_item(self, sku: str, price: int, stock: int) -> None:
        """Create an item or set its price and stock (stock-taking, not an order)."""
        check_name("sku", sku)
        check_item(price, stock)
        self.db.execute(
            "INSERT INTO items (sku, price, stock) VALUES (?, ?, ?) "
            "ON CONFLICT (sku) DO UPDATE SET price = excluded.price, stock = excluded.stock",
            (sku, price, stock),
        )

    def items(self) -> dict[str, tuple[int, int]]:
        """sku -> (price, stock left)."""
        rows = self.db.execute("SELECT sku, price, stock FROM items ORDER BY sku")
        return {sku: (price, stock) for sku, price, stock in rows}

    # --- orders ---------------------------------------------------------------------------

    def start(
        self,
        order_id: str,
        sku: str,
        buyer_account: str,
        buyer_client: int,
        expires_in_ms: int,
        merchant_account: str,
        merchant_client: int,
    ) -> Order:
        """Journal `started` with the three idempotency keys the order will ever use and
        everything its calls are made of (amount, expiry, shop name, merchant account and
        client: a retry sends the same body after a price or configuration change); the
        existing order if this one was started before with the same fields. An order id
        this database does not know is a new order, with new keys (a fresh nonce)."""
        check_name("order_id", order_id)
        check_name("sku", sku)
        if not isinstance(buyer_account, str) or not (
            0 < len(buyer_account) <= MAX_ACCOUNT_NAME_LENGTH and buyer_account.isprintable()
        ):
            raise ShopError("buyer_account", "buyer_account must be an account name")
        if type(buyer_client) is not int or not 0 <= buyer_client <= MAX_CLIENT_ID:
            raise ShopError("buyer_client", "buyer_client must be a client id")
        if type(expires_in_ms) is not int or expires_in_ms <= 0:
            raise ShopError("expires_in_ms", "expires_in_ms must be a positive integer")
        if not isinstance(merchant_account, str) or not (
            0 < len(merchant_account) <= MAX_ACCOUNT_NAME_LENGTH and merchant_account.isprintable()
        ):
            raise ShopError("merchant_account", "merchant_account must be an account name")
        if type(merchant_client) is not int or not 0 <= merchant_client <= MAX_CLIENT_ID:
            raise ShopError("merchant_client", "merchant_client must be a client id")
        self._begin()
        try:
            existing = self.order(order_id)
            if existing is not None:
                if (existing.sku, existing.buyer_account, existing.buyer_client) != (
                    sku,
                    buyer_account,
                    buyer_client,
                ):
                    raise OrderConflict("order_id", f"order {order_id} exists with other fields")
                self.db.execute("ROLLBACK")
                return existing
            item = self.db.execute("SELECT price FROM items WHERE sku = ?", (sku,)).fetchone()
            if item is None:
                raise ShopError("sku", f"no item {sku!r}")
            nonce = secrets.token_hex(8)
            keys = {
                call: idempotency_key(self.shop_name, self.instance, order_id, nonce, call)
                for call in Call
            }
            now = _now_ms()
            self.db.execute(
                f"INSERT INTO orders ({_ORDER_COLUMNS}, created_ms, updated_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, '', ?, ?)",
                (
                    order_id,
                    sku,
                    buyer_account,
                    buyer_client,
                    item[0],
                    expires_in_ms,
                    self.shop_name,
                    merchant_account,
                    merchant_client,
                    Stage.STARTED.value,
                    keys[Call.AUTHORIZE],
                    keys[Call.CAPTURE],
                    keys[Call.VOID],
                    now,
                    now,
                ),
            )
            self._journal(
                order_id,
                Stage.STARTED.value,
                {
                    "amount": item[0],
                    "expires_in_ms": expires_in_ms,
                    "shop_name": self.shop_name,
                    "merchant_account": merchant_account,
                    "merchant_client": merchant_client,
                    "keys": {str(call): key for call, key in keys.items()},
                },
            )
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        order = self.order(order_id)
        assert order is not None  # inserted just above
        return order

    def order(self, order_id: str) -> Order | None:
        row = self.db.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        return None if row is None else _order(row)

    def unfinished(self) -> list[str]:
        """The ids of the orders not done, oldest first."""
        rows = self.db.execute(
            "SELECT order_id FROM orders WHERE stage != 'done' ORDER BY created_ms, order_id"
        )
        return [str(order_id) for (order_id,) in rows]

    def orders(self) -> list[Order]:
        rows = self.db.execute(f"SELECT {_ORDER_COLUMNS} FROM orders ORDER BY order_id")
        return [_order(row) for row in rows]

    def note_payment(self, order_id: str, payment_id: str) -> None:
        """Remember the payment id the gateway named (a convenience: the authorize's replay
        names it again)."""
        self.db.execute(
            "UPDATE orders SET payment_id = ? WHERE order_id = ? AND payment_id IS NULL",
            (payment_id, order_id),
        )

    def reserve(self, order_id: str) -> Order:
        """started -> reserved (one item taken) or out_of_stock, in one transaction."""
        self._begin()
        try:
            order = self._unfinished_order(order_id)
            if order.stage is Stage.STARTED:
                taken = self.db.execute(
                    "UPDATE items SET stock = stock - 1 WHERE sku = ? AND stock > 0", (order.sku,)
                ).rowcount
                stage = Stage.RESERVED if taken else Stage.OUT_OF_STOCK
                if taken:
                    self.db.execute(
                        "INSERT INTO reservations (order_id, sku) VALUES (?, ?)",
                        (order_id, order.sku),
                    )
                self._set_stage(order_id, stage)
                self._journal(order_id, stage.value, {"sku": order.sku})
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return self._unfinished_order(order_id)

    def release(self, order_id: str, reason: str) -> Order:
        """reserved -> released: the item goes back on the shelf, as no capture can come."""
        self._begin()
        try:
            order = self._unfinished_order(order_id)
            if order.stage is Stage.RESERVED:
                self.db.execute("DELETE FROM reservations WHERE order_id = ?", (order_id,))
                self.db.execute("UPDATE items SET stock = stock + 1 WHERE sku = ?", (order.sku,))
                self._set_stage(order_id, Stage.RELEASED, reason)
                self._journal(order_id, Stage.RELEASED.value, {"reason": reason})
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return self._unfinished_order(order_id)

    def finish(self, order_id: str, outcome: Outcome, note: str = "") -> Order:
        self._begin()
        try:
            order = self.order(order_id)
            if order is None:
                raise ShopError("order_id", f"no order {order_id}")
            if order.stage is not Stage.DONE:
                self.db.execute(
                    "UPDATE orders SET stage = 'done', outcome = ?, note = ?, updated_ms = ? "
                    "WHERE order_id = ?",
                    (outcome.value, note, _now_ms(), order_id),
                )
                self._journal(order_id, Stage.DONE.value, {"outcome": outcome.value, "note": note})
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        done = self.order(order_id)
        assert done is not None
        return done

    def stuck(self, order_id: str, note: str) -> None:
        """Keep the stage (so a restart tries again) but say why it stopped; journalled
        once per reason, not again at each restart that finds it stuck the same way."""
        self._begin()
        try:
            last = self.db.execute(
                "SELECT entry, detail FROM journal WHERE order_id = ? ORDER BY id DESC LIMIT 1",
                (order_id,),
            ).fetchone()
            if last != ("stuck", json.dumps({"note": note}, sort_keys=True)):
                self.db.execute(
                    "UPDATE orders SET note = ?, updated_ms = ? WHERE order_id = ?",
                    (f"stuck: {note}", _now_ms(), order_id),
                )
                self._journal(order_id, "stuck", {"note": note})
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _unfinished_order(self, order_id: str) -> Order:
        order = self.order(order_id)
        if order is None:
            raise ShopError("order_id", f"no order {order_id}")
        return order

    def reserved_orders(self) -> dict[str, str]:
        """order id -> sku of every item sold (or held for an unfinished order)."""
        rows = self.db.execute("SELECT order_id, sku FROM reservations ORDER BY order_id")
        return dict(rows.fetchall())

    def journal(self, order_id: str) -> list[tuple[str, dict[str, object]]]:
        rows = self.db.execute(
            "SELECT entry, detail FROM journal WHERE order_id = ? ORDER BY id", (order_id,)
        )
        return [(entry, json.loads(detail)) for entry, detail in rows]
