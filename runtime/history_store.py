"""The replica's history on disk: pbft.history.HistoryStore in SQLite (stdlib sqlite3).

The node (runtime/node.py) feeds it every batch its core executed through
ThreadedHistoryStore (below): a thread of its own writes what is queued in one
transaction, off the node's step loop; and the core reads it to answer lookups
(pbft/lookups.py). One row per executed request, indexed by (client_id, request_id) for
status and by its reference (the hold or payment it names) for holds; one row per hold
released at expiry, indexed by the hold; one row per account entry, keyed by (account,
seq, position) for paged account history. Retention prunes old seqs (pbft/history.py
says how many are kept), so the file stays bounded.

No fsync per batch: the file is in WAL mode with synchronous=NORMAL, which syncs only when
SQLite checkpoints its WAL (every 1000 pages by default): durable across a crash of the
process, consistent after a power loss, which may lose the last writes. The node's thread
(ThreadedHistoryStore) groups many batches into one transaction (a transaction rewrites
every page it touches into the WAL, so one per batch cost about twice as much per batch as
one per 16, see runtime/history_bench.py), and makes a write durable (synchronous=FULL for
that transaction) where recovery needs it: through each stable checkpoint.
That is enough because history is derived state, and only of committed batches, which
execute alike wherever and whenever they execute: after a restart the replica re-executes
from its stable checkpoint (pbft/recovery.py) and the node records those batches again,
which rewrites their rows idempotently (recording seq s drops s and everything after it
first). The node's durable writer makes history durable through a checkpoint's seq before
it writes that stable checkpoint (`sync_through`), so history never lags the checkpoint a
restart resumes from, even after a power loss (it may run ahead of the log: those batches
are rewritten as they execute again). What a store lacks, it says: if the replica caught
up by state transfer, the seqs it never recorded fall before `held_from`, and lookups
about them are answered "not held", never "not found"; the client's f + 1 matching gets
the answer from replicas that hold it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from pbft.codec import pack
from pbft.events import Executed
from pbft.history import (
    CONFIRMED,
    DEFAULT_RETENTION_SEQS,
    AccountEntry,
    HoldView,
    ReleaseRecord,
    RequestRecord,
    check_retention,
    closes_hold,
    decides,
    entry_fields,
    hold_view,
    next_held_range,
    wire_record,
)

# Version 2 (from 1, migrated on open): each table is appended in seq order and has only
# the indexes its reads and pruning use, and an account entry is stored as columns
# instead of a packed blob (runtime/history_bench.py: about a third less CPU a batch).
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER NOT NULL, idx INTEGER NOT NULL,
    client_id INTEGER NOT NULL, request_id INTEGER NOT NULL,
    ref_client INTEGER NOT NULL, ref_request INTEGER NOT NULL,
    closes_hold INTEGER NOT NULL, decides INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_seq ON requests (seq);
CREATE INDEX IF NOT EXISTS requests_by_id ON requests (client_id, request_id);
CREATE INDEX IF NOT EXISTS requests_by_ref ON requests (ref_client, ref_request)
    WHERE closes_hold = 1;
CREATE TABLE IF NOT EXISTS releases (
    seq INTEGER NOT NULL, hold_client INTEGER NOT NULL, hold_request INTEGER NOT NULL,
    payer TEXT NOT NULL, amount TEXT NOT NULL,
    PRIMARY KEY (seq, hold_client, hold_request)
);
CREATE INDEX IF NOT EXISTS releases_by_hold ON releases (hold_client, hold_request);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER NOT NULL, position INTEGER NOT NULL, account TEXT NOT NULL,
    timestamp_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    client_id INTEGER NOT NULL, request_id INTEGER NOT NULL,
    available_delta INTEGER NOT NULL, held_delta INTEGER NOT NULL,
    PRIMARY KEY (seq, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_account ON entries (account, seq, position);
"""
# Version 1's requests kept its rows under a (seq, idx) key of their own and indexed every
# row by its reference; its entries were keyed by account (each insert landing anywhere in
# the table) and packed. Rows move over as they are; entries are unpacked into columns.
_MIGRATE_FROM_1 = (
    "ALTER TABLE requests RENAME TO requests_v1",
    "ALTER TABLE entries RENAME TO entries_v1",
    "DROP INDEX requests_by_id",
    "DROP INDEX requests_by_ref",
    "DROP INDEX entries_by_seq",
)
_TABLES = ("requests", "releases", "entries")


class HistoryStoreError(RuntimeError):
    """The history file cannot be used (another schema version, not a database)."""


def _sql_int(value: int) -> int:
    """A uint64 id as SQLite's signed 64-bit INTEGER (a bijection: only compared for
    equality, never ordered)."""
    return value - 2**64 if value >= 2**63 else value


def _uint(value: int) -> int:
    """The inverse of _sql_int."""
    return value + 2**64 if value < 0 else value


def _entry_row(account: str, entry: AccountEntry) -> tuple[object, ...]:
    """An entries row (version 2's columns) of a decoded entry (a version 1 file's)."""
    return (
        entry.seq,
        entry.position,
        account,
        entry.timestamp_ms,
        entry.kind,
        entry.client_id,
        _sql_int(entry.request_id),
        entry.available_delta,
        entry.held_delta,
    )


class SqliteHistoryStore:
    """pbft.history.HistoryStore in one SQLite file (":memory:" for a private one)."""

    def __init__(self, path: str | Path, retention_seqs: int = DEFAULT_RETENTION_SEQS) -> None:
        self.retention_seqs = check_retention(retention_seqs)
        try:
            # Used by one thread at a time, not always the one that opened it
            # (ThreadedHistoryStore serialises its use).
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            has_meta = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            version = self._meta("schema_version", 0) if has_meta else SCHEMA_VERSION
            if version == 1:
                self._migrate_from_1()
            elif version == SCHEMA_VERSION:
                self._db.executescript(_SCHEMA)
                self._meta("schema_version", SCHEMA_VERSION)
        except sqlite3.DatabaseError as error:
            raise HistoryStoreError(f"history file {path}: {error}") from None
        if version not in (1, SCHEMA_VERSION):
            raise HistoryStoreError(
                f"history file {path} has schema version {version}, expected {SCHEMA_VERSION}"
            )
        self._from = self._meta("held_from", 0)
        self._through = self._meta("held_through", 0)

    def close(self) -> None:
        self._db.close()

    def _migrate_from_1(self) -> None:
        """Version 1's file to version 2, in one transaction (a crash leaves version 1)."""
        db = self._db
        db.execute("BEGIN")
        try:
            for statement in _MIGRATE_FROM_1:
                db.execute(statement)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO requests SELECT seq, idx, client_id, request_id, ref_client, "
                "ref_request, closes_hold, decides, record FROM requests_v1 ORDER BY seq, idx"
            )
            db.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _entry_row(account, AccountEntry.decode(entry))
                    for account, entry in db.execute(
                        "SELECT account, entry FROM entries_v1 ORDER BY seq, position"
                    )
                ),
            )
            db.execute("DROP TABLE requests_v1")
            db.execute("DROP TABLE entries_v1")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, default))
            return default
        return int(row[0])

    def held_from(self) -> int:
        return self._from

    def held_through(self) -> int:
        return self._through

    def record(self, executed: Executed) -> None:
        self.record_all((executed,))

    def record_all(self, batches: Iterable[Executed], *, durable: bool = False) -> None:
        """Record batches in one transaction (the node's thread records many at once).
        `durable`: the commit syncs the WAL (synchronous=FULL), so it and every earlier
        commit survive a power loss; with no batches, only that sync."""
        db = self._db
        held_from, held_through = self._from, self._through
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN")
        try:
            for executed in batches:
                seq = executed.seq
                low, high, rewrite = next_held_range(
                    held_from, held_through, seq, self.retention_seqs
                )
                if rewrite:
                    for table in _TABLES:
                        db.execute(f"DELETE FROM {table} WHERE seq >= ?", (seq,))
                if low > held_from or rewrite:
                    for table in _TABLES:
                        db.execute(f"DELETE FROM {table} WHERE seq < ?", (low,))
                self._insert(executed)
                held_from, held_through = low, high
            db.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                ((held_from, "held_from"), (held_through, "held_through")),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")
        self._from, self._through = held_from, held_through

    def _insert(self, executed: Executed) -> None:
        db = self._db
        seq = executed.seq
        db.executemany(
            "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    seq,
                    index,
                    request.client_id,
                    _sql_int(request.request_id),
                    request.ref_client,
                    _sql_int(request.ref_request),
                    int(closes_hold(request)),
                    int(decides(request)),
                    pack(wire_record(executed, index, request)),
                )
                for index, request in enumerate(executed.requests)
            ],
        )
        if executed.released:
            db.executemany(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        seq,
                        release.hold_client,
                        _sql_int(release.hold_request),
                        release.payer,
                        # Amounts may reach 2**64 - 1: kept as text, read back exactly.
                        str(release.amount),
                    )
                    for release in executed.released
                ],
            )
        db.executemany(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (seq, fields[1], account, fields[2], fields[3], fields[4], _sql_int(fields[5]),
                 fields[6], fields[7])
                for account, fields in entry_fields(
                    seq, executed.timestamp_ms, executed.requests, executed.released
                )
            ],
        )  # fmt: skip

    def request(self, client_id: int, request_id: int) -> RequestRecord | None:
        row = self._db.execute(
            "SELECT record FROM requests WHERE client_id = ? AND request_id = ? AND decides = 1 "
            "ORDER BY seq LIMIT 1",
            (client_id, _sql_int(request_id)),
        ).fetchone()
        return None if row is None else RequestRecord.decode(row[0])

    def account(
        self, account: str, after: tuple[int, int], through_seq: int, limit: int
    ) -> list[AccountEntry]:
        rows = self._db.execute(
            "SELECT seq, position, timestamp_ms, kind, client_id, request_id, available_delta, "
            "held_delta FROM entries WHERE account = ? AND (seq, position) > (?, ?) "
            "AND seq <= ? ORDER BY seq, position LIMIT ?",
            (account, after[0], after[1], through_seq, limit),
        ).fetchall()
        return [
            AccountEntry(seq, position, time_ms, kind, client, _uint(request), available, held)
            for seq, position, time_ms, kind, client, request, available, held in rows
        ]

    def hold(self, client_id: int, request_id: int) -> HoldView | None:
        authorize = self.request(client_id, request_id)
        if authorize is None or authorize.op != "authorize" or authorize.outcome != CONFIRMED:
            return None
        closing = [
            RequestRecord.decode(row[0])
            for row in self._db.execute(
                "SELECT record FROM requests WHERE ref_client = ? AND ref_request = ? "
                "AND closes_hold = 1 ORDER BY seq, idx",
                (client_id, _sql_int(request_id)),
            )
        ]
        row = self._db.execute(
            "SELECT seq, payer, amount FROM releases WHERE hold_client = ? AND hold_request = ? "
            "ORDER BY seq LIMIT 1",
            (client_id, _sql_int(request_id)),
        ).fetchone()
        release = (
            None
            if row is None
            else ReleaseRecord(int(row[0]), client_id, request_id, str(row[1]), int(row[2]))
        )
        return hold_view(authorize, closing, release)


# Executed batches queued for the history thread before the node stops stepping and waits
# for it (ThreadedHistoryStore.wait_for_room): a disk that falls behind slows the replica
# down instead of growing the queue. 256 batches of up to 64 requests: a few MB at most,
# and well under a second of SQLite work (runtime.history_bench).
MAX_PENDING_BATCHES = 256
# The thread writes a group of batches in one transaction once any of these holds: this
# many are queued, the oldest has waited GROUP_DELAY_S, a batch at a checkpoint seq is
# queued (written durably, so the stable checkpoint that follows finds it synced), or
# someone waits (a read, sync_through, close). Nothing on the replica's path waits for the
# delay: only how far the file lags behind what was executed, which recovery rewrites. A
# checkpoint interval's batches usually end a group first; the delay only matters below
# 16 batches a second (at 0.25 s, pbft bench under load made groups of about 3 batches).
GROUP_BATCHES = 64
GROUP_DELAY_S = 1.0


class ThreadedHistoryStore:
    """A SqliteHistoryStore written by a thread of its own, off the node's step path.

    `record_all` only queues (the node's trio loop goes on reading the network and
    stepping the core); the thread writes a group of queued batches in one transaction
    (GROUP_BATCHES above says when). Reads (the core's lookups) first have everything
    queued written, so the replica answers from all it has executed (read-your-writes):
    "not found" stays true. A lookup waits for that write in the loop, a few ms, instead
    of every batch paying for a transaction of its own.

    Recovery resumes from the stable checkpoint and re-executes only what follows it, so
    history must hold every batch up to a checkpoint, durably, before that checkpoint is:
    the node's durable writer calls `sync_through(seq)` before it writes a ("checkpoint",)
    record (runtime/node.py). Given `checkpoint_interval`, the thread already wrote each
    checkpoint's batch durably when it was queued, so that call usually returns at once.
    Batches after it are re-executed and rewritten after a crash, as before. A failed
    write is raised by the next call into the store, like the log's.
    """

    def __init__(
        self,
        store: SqliteHistoryStore,
        max_pending: int = MAX_PENDING_BATCHES,
        *,
        checkpoint_interval: int | None = None,
        group_batches: int = GROUP_BATCHES,
        group_delay_s: float = GROUP_DELAY_S,
    ) -> None:
        self._store = store
        self.retention_seqs = store.retention_seqs
        self.max_pending = max_pending
        self.checkpoint_interval = checkpoint_interval
        self.group_batches = group_batches
        self.group_delay_s = group_delay_s
        self._changed = threading.Condition()  # guards everything below
        self._queue: list[Executed] = []
        self._queued_at = 0.0  # when the oldest queued batch was queued (monotonic)
        self._boundary = False  # a batch at a checkpoint seq is queued
        self._hurry = 0  # callers waiting for the queue to be written
        self._sync = False  # the next write must be durable (sync_through waits for it)
        self._writing: list[Executed] | None = None  # the group being written
        self._writing_durable = False
        self._unsynced_low: int | None = None  # lowest seq written since the last sync
        self._closing = False
        self._error: BaseException | None = None
        self.batches_written = 0
        self.transactions = 0
        self.syncs = 0  # durable transactions
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def _due(self) -> bool:
        return (
            self._closing
            or self._hurry > 0
            or self._sync
            or self._boundary
            or len(self._queue) >= self.group_batches
            or time.monotonic() >= self._queued_at + self.group_delay_s
        )

    def _run(self) -> None:
        changed = self._changed
        while True:
            with changed:
                while not ((self._queue or self._sync or self._closing) and self._due()):
                    if self._queue:
                        changed.wait(self._queued_at + self.group_delay_s - time.monotonic())
                    else:
                        changed.wait()
                if not self._queue and not self._sync:
                    return  # closing, nothing left to write
                batches, self._queue = self._queue, []
                durable = self._sync or self._boundary or self._closing
                self._sync = self._boundary = False
                self._writing, self._writing_durable = batches, durable
            try:
                self._store.record_all(batches, durable=durable)
            except BaseException as error:  # kept for the caller, who raises it
                with changed:
                    self._error = error
                    self._writing = None
                    changed.notify_all()
                return
            with changed:
                self._writing = None
                if durable:
                    self._unsynced_low = None
                    self.syncs += 1
                elif batches:
                    low = min(executed.seq for executed in batches)
                    if self._unsynced_low is None or low < self._unsynced_low:
                        self._unsynced_low = low
                self.batches_written += len(batches)
                self.transactions += 1
                changed.notify_all()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def pending(self) -> int:
        with self._changed:
            return len(self._queue) + (self._writing is not None)

    def record(self, executed: Executed) -> None:
        self.record_all((executed,))

    def record_all(self, batches: Iterable[Executed]) -> None:
        """Queue a step's batches, never waiting (the bound is the caller's: see
        `wait_for_room`)."""
        with self._changed:
            self._raise_failure()
            if self._closing:
                raise HistoryStoreError("history store is closed")
            was_empty = not self._queue
            interval = self.checkpoint_interval
            for executed in batches:
                self._queue.append(executed)
                if interval is not None and executed.seq % interval == 0:
                    self._boundary = True
            if self._queue:
                if was_empty:
                    self._queued_at = time.monotonic()
                self._changed.notify_all()

    def wait_for_room(self) -> None:
        """Block until fewer than `max_pending` batches are queued (in a worker thread)."""
        with self._changed:
            self._hurry += 1
            self._changed.notify_all()
            try:
                while len(self._queue) >= self.max_pending and self._error is None:
                    self._changed.wait()
            finally:
                self._hurry -= 1
            self._raise_failure()

    def flush(self) -> None:
        """Block until everything queued so far is written (not necessarily synced)."""
        with self._changed:
            self._hurry += 1
            self._changed.notify_all()
            try:
                while (self._queue or self._writing is not None) and self._error is None:
                    self._changed.wait()
            finally:
                self._hurry -= 1
            self._raise_failure()

    def _needs_sync(self, seq: int) -> bool | None:
        """For sync_through(seq): False if every batch queued so far with a seq <= `seq`
        is written durably; None if the write under way (durable) will make it so; True
        if a durable write must be asked for."""
        if any(executed.seq <= seq for executed in self._queue):
            return True
        writing = self._writing
        if writing is not None and self._writing_durable:
            return None  # its sync covers every write before it too
        if writing is not None and any(executed.seq <= seq for executed in writing):
            return True
        return self._unsynced_low is not None and self._unsynced_low <= seq

    def sync_through(self, seq: int) -> None:
        """Block until every batch queued with a seq <= `seq` is written and synced (the
        node's writer, before a stable checkpoint at `seq`). Seqs never queued (skipped by
        a state transfer) need nothing."""
        with self._changed:
            while self._error is None:
                needed = self._needs_sync(seq)
                if needed is False:
                    break
                if needed:
                    self._sync = True
                    self._changed.notify_all()
                self._changed.wait()
            self._raise_failure()

    def close(self) -> None:
        """Write what is queued (durably), stop the thread, close the file. A failed last
        write is not raised here (at a stop, after whatever ended the node): recovery
        rewrites every batch after the stable checkpoint, and those before it were synced."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        self._store.close()

    # Reads: after everything queued is written, so that the thread is idle meanwhile
    # (only the node's loop queues, and it is the one reading).
    def held_from(self) -> int:
        self.flush()
        return self._store.held_from()

    def held_through(self) -> int:
        self.flush()
        return self._store.held_through()

    def request(self, client_id: int, request_id: int) -> RequestRecord | None:
        self.flush()
        return self._store.request(client_id, request_id)

    def account(
        self, account: str, after: tuple[int, int], through_seq: int, limit: int
    ) -> list[AccountEntry]:
        self.flush()
        return self._store.account(account, after, through_seq, limit)

    def hold(self, client_id: int, request_id: int) -> HoldView | None:
        self.flush()
        return self._store.hold(client_id, request_id)
