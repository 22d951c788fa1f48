"""The gateway's own state in SQLite: API keys, idempotency records, payments, their
operations, the events webhooks deliver, and the request ids the gateway chose.

Durability: WAL with synchronous=FULL, so a committed transaction survives a power cut,
and every decision is one transaction (the payment's row, its operation, its event and the
idempotency record's response together): a reader never sees a payment confirmed without
its event, or an idempotency key answered without the payment it answers for.

Threads: sqlite3 calls block (fsync on every commit), so the gateway never makes them on
the trio loop: `GatewayStore` runs each call in a worker thread (trio.to_thread) on one
connection guarded by one lock. One connection because SQLite serialises writers anyway
and the gateway's write rate is the cluster's decision rate, far below one writer's; one
lock because a sqlite3 connection must not be used by two threads at once. A call, once
started, finishes even if its caller is cancelled (a commit is never abandoned half-way).
Other components (webhooks) open their own connection with `connect`.

Bounds: idempotency records are pruned `retention_ms` after they were answered (24 h by
default, the issue's minimum); records still in flight are never pruned (the resume task
owes them an answer). Events are pruned after `event_retention_ms` (30 days by default).
Payments are the gateway's business record and are kept.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from gateway import keys
from gateway.keys import ApiKey, Caller

T = TypeVar("T")

DEFAULT_RETENTION_MS = 24 * 3600 * 1000
DEFAULT_EVENT_RETENTION_MS = 30 * 24 * 3600 * 1000
# How long a writer waits for another connection's (the webhooks') write lock.
BUSY_TIMEOUT_MS = 10_000
# Idempotency keys: at most this many characters (the limit).
MAX_IDEMPOTENCY_KEY_LENGTH = 255
# The database file and its -wal/-shm: the owner's only.
FILE_MODE = 0o600
IN_FLIGHT = "in_flight"
DONE = "done"

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_sha256 BLOB NOT NULL UNIQUE,
    client_id INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS idempotency (
    client_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    route TEXT NOT NULL,
    body_sha256 BLOB NOT NULL,
    request_id INTEGER NOT NULL,
    target TEXT NOT NULL,
    operation TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    status_code INTEGER,
    response BLOB,
    created_ms INTEGER NOT NULL,
    done_ms INTEGER,
    PRIMARY KEY (client_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_state ON idempotency (state, done_ms);
CREATE TABLE IF NOT EXISTS payments (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    client_id INTEGER NOT NULL,
    request_id INTEGER NOT NULL,
    from_account TEXT NOT NULL,
    to_account TEXT NOT NULL,
    from_owner INTEGER,
    to_owner INTEGER,
    amount INTEGER NOT NULL,
    capture INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    captured_amount INTEGER NOT NULL DEFAULT 0,
    refunded_amount INTEGER NOT NULL DEFAULT 0,
    expires_in_ms INTEGER,
    expires_at_ms INTEGER,
    metadata TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    receipt BLOB,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_from ON payments (from_account, row);
CREATE INDEX IF NOT EXISTS payments_to ON payments (to_account, row);
CREATE INDEX IF NOT EXISTS payments_held ON payments (status, expires_at_ms);
CREATE INDEX IF NOT EXISTS payments_client ON payments (client_id, row);
CREATE INDEX IF NOT EXISTS payments_from_owner ON payments (from_owner, row);
CREATE INDEX IF NOT EXISTS payments_to_owner ON payments (to_owner, row);
CREATE TABLE IF NOT EXISTS payment_operations (
    payment_id TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    request_id INTEGER NOT NULL,
    op TEXT NOT NULL,
    amount INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    receipt BLOB,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (client_id, request_id)
);
CREATE INDEX IF NOT EXISTS payment_operations_payment ON payment_operations (payment_id);
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY,
    client_id INTEGER NOT NULL,
    request_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS request_ids (
    client_id INTEGER PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
# meta: the cluster (short id) the database belongs to, the clients it served, the schema.
SCHEMA_VERSION = 1


class StoreError(Exception):
    """The gateway database cannot be used; the message names the file and why."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A connection to the gateway database at `path` with the pragmas every user needs
    (WAL, synchronous=FULL, a busy timeout), the schema created if missing. Usable from
    any one thread at a time (check_same_thread off: the store hands it to its worker)."""
    where = Path(path)
    if where.is_dir():
        raise StoreError(f"{where}: is a directory, not a database file")
    if not where.parent.is_dir():
        raise StoreError(f"{where}: directory {where.parent} does not exist")
    _private(where)
    try:
        db = sqlite3.connect(where, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    except sqlite3.Error as error:
        raise StoreError(f"{where}: cannot open: {error}") from None
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{where}: cannot use write-ahead logging (journal mode {mode})")
        db.execute("PRAGMA synchronous = FULL")
        with db:
            db.executescript(SCHEMA)
    except sqlite3.OperationalError as error:  # read-only, locked, no room for the WAL
        db.close()
        raise StoreError(f"{where}: cannot use: {error}") from None
    except sqlite3.DatabaseError as error:
        db.close()
        raise StoreError(f"{where}: not a gateway database: {error}") from None
    except StoreError:
        db.close()
        raise
    return db


def _private(where: Path) -> None:
    """Create the database file 0600 (it holds payments, receipts, key hashes and webhook
    secrets), or take group/other bits off an existing one and its -wal/-shm (SQLite gives
    new -wal/-shm files the database file's mode)."""
    try:
        # Only a new file is opened here: closing a descriptor of a file this process has
        # open in SQLite would drop that connection's POSIX locks on it.
        try:
            os.close(os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
        except FileExistsError:
            pass
        for path in (where, Path(f"{where}-wal"), Path(f"{where}-shm")):
            if path.exists() and path.stat().st_mode & 0o077:
                os.chmod(path, path.stat().st_mode & 0o700)
    except OSError as error:
        raise StoreError(f"{where}: cannot open: {error.strerror or error}") from None


@dataclass(frozen=True)
class IdempotencyRecord:
    """One Idempotency-Key of one client: what it asked (route, body hash), the cluster
    request chosen for it before anything was sent, and once answered, the answer."""

    client_id: int
    key: str
    route: str
    body_sha256: bytes
    request_id: int
    target: str  # the payment id (or account name) the request acts on
    operation: dict[str, Any]  # pbft.operations.Operation's fields, to resubmit it as is
    state: str
    status_code: int | None
    response: bytes | None
    created_ms: int


_IDEMPOTENCY_COLUMNS = (
    "client_id, key, route, body_sha256, request_id, target, operation, state, "
    "status_code, response, created_ms"
)


def _record(row: tuple[Any, ...]) -> IdempotencyRecord:
    values = list(row)
    values[6] = json.loads(values[6])
    return IdempotencyRecord(*values)


@dataclass
class PaymentRow:
    """A payment as the gateway records it (gateway/payments_json.py renders it)."""

    id: str
    client_id: int
    request_id: int
    from_account: str
    to_account: str
    from_owner: int | None
    to_owner: int | None
    amount: int
    capture: bool
    status: str
    reason: str
    captured_amount: int
    refunded_amount: int
    expires_in_ms: int | None
    expires_at_ms: int | None
    metadata: dict[str, str]
    seq: int
    receipt: bytes | None
    created_ms: int
    updated_ms: int
    row: int = 0


_PAYMENT_COLUMNS = (
    "id, client_id, request_id, from_account, to_account, from_owner, to_owner, amount, "
    "capture, status, reason, captured_amount, refunded_amount, expires_in_ms, "
    "expires_at_ms, metadata, seq, receipt, created_ms, updated_ms, row"
)


def _payment(row: tuple[Any, ...]) -> PaymentRow:
    values = list(row)
    values[8] = bool(values[8])
    values[15] = json.loads(values[15])
    return PaymentRow(*values)


@dataclass
class OperationRow:
    """One cluster request made for a payment (its transfer or authorize, a capture, ...)."""

    payment_id: str
    client_id: int
    request_id: int
    op: str
    amount: int
    outcome: str  # pending until decided
    reason: str
    seq: int
    receipt: bytes | None
    created_ms: int


_OPERATION_COLUMNS = (
    "payment_id, client_id, request_id, op, amount, outcome, reason, seq, receipt, created_ms"
)


@dataclass(frozen=True)
class AccountRow:
    name: str
    client_id: int
    request_id: int
    state: str
    reason: str
    seq: int
    created_ms: int


@dataclass(frozen=True)
class EventRow:
    """An event to write: the store gives it its id and renders its body."""

    type: str
    payment_id: str
    client_id: int
    data: dict[str, Any]


@dataclass
class Decision:
    """Everything one decision changes, written in one transaction: the payment and the
    operation rows (either may be absent: opening an account has no payment), the
    account row, the events, and the idempotency record's answer."""

    payment: PaymentRow | None = None
    operation: OperationRow | None = None
    account: AccountRow | None = None
    events: list[EventRow] = field(default_factory=list)
    answer: tuple[int, str, int, bytes] | None = None  # client, key, status, response


class Database:
    """The synchronous store on one connection. Used by GatewayStore's worker thread and
    by the CLI (`pbft gateway-key`); not safe for two threads at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.db = connect(path)

    def close(self) -> None:
        self.db.close()

    def bind_cluster(self, cluster_id: str, clients: Iterable[int]) -> bool:
        """Bind the database to cluster `cluster_id` (short id): its requests, request ids
        and receipts mean nothing on another cluster, where resuming them would move money
        on a ledger that never received them. StoreError if it belongs to another cluster.
        True if it held data but no cluster yet (written before the binding): adopted."""
        with self.db:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'cluster_id'").fetchone()
            if row is not None and row[0] != cluster_id:
                raise StoreError(
                    f"{self.path} belongs to cluster {row[0]}, not to this cluster {cluster_id}"
                )
            adopted = False
            if row is None:
                adopted = any(
                    self.db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
                    for table in ("api_keys", "idempotency", "payments", "request_ids")
                )
                self.db.execute(
                    "INSERT INTO meta (key, value) VALUES ('cluster_id', ?), ('schema', ?)",
                    (cluster_id, str(SCHEMA_VERSION)),
                )
            served = self.db.execute("SELECT value FROM meta WHERE key = 'clients'").fetchone()
            known = {int(client) for client in served[0].split(",") if client} if served else set()
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('clients', ?)",
                (",".join(str(client) for client in sorted(known | set(clients))),),
            )
        return adopted

    # -- API keys (gateway/keys.py) --

    def create_key(self, client_id: int) -> tuple[ApiKey, str]:
        return keys.create_key(self.db, client_id)

    def list_keys(self, client_id: int | None = None) -> list[ApiKey]:
        return keys.list_keys(self.db, client_id)

    def revoke_key(self, key_id: int) -> ApiKey:
        return keys.revoke_key(self.db, key_id)

    def lookup_token(self, token: str) -> Caller | None:
        return keys.lookup_token(self.db, token)

    # -- request ids --

    def next_request_id(self, client_id: int, candidate: int) -> int:
        """`candidate` (a PaymentClient.new_request_id()), or one past the last id this
        database handed out for `client_id` if that is higher: monotonic across restarts
        and clock steps back, so a restarted gateway never reuses an id."""
        with self.db:
            return self._choose_request_id(client_id, candidate)

    def _choose_request_id(self, client_id: int, candidate: int) -> int:
        """next_request_id inside the caller's transaction."""
        row = self.db.execute(
            "SELECT last FROM request_ids WHERE client_id = ?", (client_id,)
        ).fetchone()
        chosen = candidate if row is None else max(candidate, row[0] + 1)
        self.db.execute(
            "INSERT INTO request_ids (client_id, last) VALUES (?, ?) "
            "ON CONFLICT (client_id) DO UPDATE SET last = excluded.last",
            (client_id, chosen),
        )
        return chosen

    # -- idempotency --

    def idempotency(self, client_id: int, key: str) -> IdempotencyRecord | None:
        row = self.db.execute(
            f"SELECT {_IDEMPOTENCY_COLUMNS} FROM idempotency WHERE client_id = ? AND key = ?",
            (client_id, key),
        ).fetchone()
        return None if row is None else _record(row)

    def begin(
        self,
        record: IdempotencyRecord,
        payment: PaymentRow | None,
        operation: OperationRow | None,
    ) -> IdempotencyRecord | None:
        """Record a request before it is sent: the idempotency record, and the pending
        payment and/or operation rows, in one transaction. If the key is already recorded
        nothing is written and the existing record is returned."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            existing = self.idempotency(record.client_id, record.key)
            if existing is not None:
                return existing
            self._insert(record, payment, operation)
        return None

    def claim(
        self,
        client_id: int,
        key: str,
        candidate: int,
        build: Callable[[int], tuple[IdempotencyRecord, PaymentRow | None, OperationRow | None]],
    ) -> tuple[IdempotencyRecord, bool]:
        """The record of (client_id, key) and False if there is one; else, in ONE
        transaction, a new request id (next_request_id of `candidate`), the record and rows
        `build(request_id)` makes, written before anything is sent, and True. One commit
        (one fsync) for the id, the key and the pending payment together."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            existing = self.idempotency(client_id, key)
            if existing is not None:
                return existing, False
            record, payment, operation = build(self._choose_request_id(client_id, candidate))
            if (record.client_id, record.key) != (client_id, key):
                raise ValueError("claim: the record built is for another key")
            self._insert(record, payment, operation)
        return record, True

    def _insert(
        self,
        record: IdempotencyRecord,
        payment: PaymentRow | None,
        operation: OperationRow | None,
    ) -> None:
        self.db.execute(
            f"INSERT INTO idempotency ({_IDEMPOTENCY_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.client_id,
                record.key,
                record.route,
                record.body_sha256,
                record.request_id,
                record.target,
                json.dumps(record.operation, sort_keys=True),
                IN_FLIGHT,
                None,
                None,
                record.created_ms,
            ),
        )
        if payment is not None:
            self._put_payment(payment)
        if operation is not None:
            self._put_operation(operation)

    def in_flight(self, limit: int, after: tuple[int, str] = (-1, "")) -> list[IdempotencyRecord]:
        """Up to `limit` unanswered records in (client, key) order after `after`."""
        rows = self.db.execute(
            f"SELECT {_IDEMPOTENCY_COLUMNS} FROM idempotency WHERE state = ? "
            "AND (client_id, key) > (?, ?) ORDER BY client_id, key LIMIT ?",
            (IN_FLIGHT, after[0], after[1], limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def prune(self, now: int, retention_ms: int, event_retention_ms: int) -> tuple[int, int]:
        """Drop answered idempotency records and events past their retention; the counts."""
        with self.db:
            keys_gone = self.db.execute(
                "DELETE FROM idempotency WHERE state = ? AND done_ms < ?",
                (DONE, now - retention_ms),
            ).rowcount
            events_gone = self.db.execute(
                "DELETE FROM events WHERE created_ms < ?", (now - event_retention_ms,)
            ).rowcount
        return keys_gone, events_gone

    # -- decisions --

    def decide(self, decision: Decision) -> list[int]:
        """Write one decision (see Decision) in one transaction; the new events' ids."""
        event_ids: list[int] = []
        with self.db:
            if decision.payment is not None:
                self._put_payment(decision.payment)
            if decision.operation is not None:
                self._put_operation(decision.operation)
            if decision.account is not None:
                self._put_account(decision.account)
            for event in decision.events:
                event_ids.append(self._put_event(event))
            if decision.answer is not None:
                client_id, key, status, response = decision.answer
                self.db.execute(
                    "UPDATE idempotency SET state = ?, status_code = ?, response = ?, "
                    "done_ms = ? WHERE client_id = ? AND key = ?",
                    (DONE, status, response, now_ms(), client_id, key),
                )
        return event_ids

    def _put_payment(self, payment: PaymentRow) -> None:
        values = (
            payment.id,
            payment.client_id,
            payment.request_id,
            payment.from_account,
            payment.to_account,
            payment.from_owner,
            payment.to_owner,
            payment.amount,
            int(payment.capture),
            payment.status,
            payment.reason,
            payment.captured_amount,
            payment.refunded_amount,
            payment.expires_in_ms,
            payment.expires_at_ms,
            json.dumps(payment.metadata, sort_keys=True),
            payment.seq,
            payment.receipt,
            payment.created_ms,
            payment.updated_ms,
        )
        columns = _PAYMENT_COLUMNS.rsplit(", row", 1)[0]
        updates = ", ".join(
            f"{name} = excluded.{name}" for name in columns.split(", ") if name != "id"
        )
        cursor = self.db.execute(
            f"INSERT INTO payments ({columns}) VALUES ({', '.join('?' * len(values))}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}",
            values,
        )
        if not payment.row:
            payment.row = cursor.lastrowid or 0

    def _put_operation(self, operation: OperationRow) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO payment_operations ({_OPERATION_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                operation.payment_id,
                operation.client_id,
                operation.request_id,
                operation.op,
                operation.amount,
                operation.outcome,
                operation.reason,
                operation.seq,
                operation.receipt,
                operation.created_ms,
            ),
        )

    def _put_account(self, account: AccountRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO accounts (name, client_id, request_id, state, reason, seq, "
            "created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                account.name,
                account.client_id,
                account.request_id,
                account.state,
                account.reason,
                account.seq,
                account.created_ms,
            ),
        )

    def _put_event(self, event: EventRow) -> int:
        created = now_ms()
        cursor = self.db.execute(
            "INSERT INTO events (type, payment_id, client_id, created_ms, body) "
            "VALUES (?, ?, ?, ?, '')",
            (event.type, event.payment_id, event.client_id, created),
        )
        event_id = cursor.lastrowid
        assert event_id is not None
        body = {
            "object": "event",
            "id": f"evt_{event_id}",
            "type": event.type,
            "created_ms": created,
            "data": event.data,
        }
        self.db.execute(
            "UPDATE events SET body = ? WHERE id = ?",
            (json.dumps(body, separators=(",", ":"), ensure_ascii=False), event_id),
        )
        return event_id

    # -- reads --

    def payment(self, payment_id: str) -> PaymentRow | None:
        row = self.db.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = ?", (payment_id,)
        ).fetchone()
        return None if row is None else _payment(row)

    def operations(self, payment_id: str) -> list[OperationRow]:
        rows = self.db.execute(
            f"SELECT {_OPERATION_COLUMNS} FROM payment_operations WHERE payment_id = ? "
            "ORDER BY created_ms, request_id",
            (payment_id,),
        ).fetchall()
        return [OperationRow(*row) for row in rows]

    def payments_of(
        self, client_id: int, account: str | None, limit: int, before_row: int | None
    ) -> list[PaymentRow]:
        """Newest first: payments `client_id` made or whose account it owns (optionally
        only those naming `account`), older than row `before_row`, at most `limit`."""
        # One ordered index walk per way of being a party (or per side of `account`), each
        # stopping after `limit` rows, merged: never a scan of the table nor a sort of all
        # of an account's payments (the store's one lock is held meanwhile).
        bound = "" if before_row is None else " AND row < ?"
        tail = () if before_row is None else (before_row,)
        parties = "(client_id = ? OR from_owner = ? OR to_owner = ?)"
        walks: list[tuple[str, tuple[Any, ...]]]
        if account is None:
            walks = [
                (f"{column} = ?{bound}", (client_id, *tail))
                for column in ("client_id", "from_owner", "to_owner")
            ]
        else:
            walks = [
                (f"{column} = ? AND {parties}{bound}", (account, *[client_id] * 3, *tail))
                for column in ("from_account", "to_account")
            ]
        union = " UNION ".join(
            f"SELECT * FROM (SELECT row FROM payments WHERE {where} ORDER BY row DESC LIMIT ?)"
            for where, _values in walks
        )
        values: list[Any] = []
        for _where, walk_values in walks:
            values += [*walk_values, limit]
        rows = self.db.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE row IN ({union}) "
            "ORDER BY row DESC LIMIT ?",
            (*values, limit),
        ).fetchall()
        return [_payment(row) for row in rows]

    def holds_due(self, now: int, limit: int, after_row: int = 0) -> list[PaymentRow]:
        """Held payments whose expiry (as this gateway estimated it) has passed."""
        rows = self.db.execute(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE status = 'held' "
            "AND expires_at_ms <= ? AND row > ? ORDER BY row LIMIT ?",
            (now, after_row, limit),
        ).fetchall()
        return [_payment(row) for row in rows]

    def account(self, name: str) -> AccountRow | None:
        row = self.db.execute(
            "SELECT name, client_id, request_id, state, reason, seq, created_ms "
            "FROM accounts WHERE name = ?",
            (name,),
        ).fetchone()
        return None if row is None else AccountRow(*row)

    def events_after(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        """(id, body) of events after `after_id`, in id order (tests; webhooks use SQL)."""
        return self.db.execute(
            "SELECT id, body FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        ).fetchall()


class GatewayStore:
    """The Database, called from trio: each call runs in a worker thread under one lock
    (see the module's docstring for why)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        event_retention_ms: int = DEFAULT_EVENT_RETENTION_MS,
    ) -> None:
        if retention_ms < DEFAULT_RETENTION_MS:
            raise ValueError("idempotency keys must be kept at least 24 hours")
        self.database = Database(path)
        self.path = self.database.path
        self.retention_ms = retention_ms
        self.event_retention_ms = event_retention_ms
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.database.close()

    def _locked(self, call: Callable[[Database], T]) -> T:
        with self._lock:
            return call(self.database)

    async def run(self, call: Callable[[Database], T]) -> T:
        """`call(database)` in a worker thread; not abandoned if the caller is cancelled."""
        return await trio.to_thread.run_sync(self._locked, call)

    async def lookup_token(self, token: str) -> Caller | None:
        return await self.run(lambda db: db.lookup_token(token))

    async def next_request_id(self, client_id: int, candidate: int) -> int:
        return await self.run(lambda db: db.next_request_id(client_id, candidate))

    async def idempotency(self, client_id: int, key: str) -> IdempotencyRecord | None:
        return await self.run(lambda db: db.idempotency(client_id, key))

    async def begin(
        self,
        record: IdempotencyRecord,
        payment: PaymentRow | None,
        operation: OperationRow | None,
    ) -> IdempotencyRecord | None:
        return await self.run(lambda db: db.begin(record, payment, operation))

    async def decide(self, decision: Decision) -> list[int]:
        return await self.run(lambda db: db.decide(decision))

    async def payment(self, payment_id: str) -> tuple[PaymentRow, list[OperationRow]] | None:
        def read(db: Database) -> tuple[PaymentRow, list[OperationRow]] | None:
            row = db.payment(payment_id)
            return None if row is None else (row, db.operations(payment_id))

        return await self.run(read)

    async def payments_of(
        self, client_id: int, account: str | None, limit: int, before_row: int | None
    ) -> list[tuple[PaymentRow, list[OperationRow]]]:
        def read(db: Database) -> list[tuple[PaymentRow, list[OperationRow]]]:
            rows = db.payments_of(client_id, account, limit, before_row)
            return [(row, db.operations(row.id)) for row in rows]

        return await self.run(read)

    async def account(self, name: str) -> AccountRow | None:
        return await self.run(lambda db: db.account(name))

    async def in_flight(
        self, limit: int, after: tuple[int, str] = (-1, "")
    ) -> list[IdempotencyRecord]:
        return await self.run(lambda db: db.in_flight(limit, after))

    async def holds_due(self, now: int, limit: int, after_row: int = 0) -> list[PaymentRow]:
        return await self.run(lambda db: db.holds_due(now, limit, after_row))

    async def prune(self) -> tuple[int, int]:
        now = now_ms()
        return await self.run(lambda db: db.prune(now, self.retention_ms, self.event_retention_ms))
