"""History stores (pbft/history.py): the in-memory one and SQLite's pass one suite."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pbft.codec import pack
from pbft.events import Executed, ExecutedRequest
from pbft.history import (
    CAPTURED,
    EXPIRED,
    EXPIRY,
    OPEN,
    VOIDED,
    HistoryStore,
    MemoryHistoryStore,
    prune_chunk,
)
from pbft.operations import Posting, Release
from runtime.history_store import HistoryStoreError, SqliteHistoryStore, ThreadedHistoryStore

DIGEST = bytes(32)


def request(
    client_id: int,
    request_id: int,
    op: str = "transfer",
    payer: str = "alice",
    payee: str = "bob",
    amount: int = 10,
    *,
    ref: tuple[int, int] = (0, 0),
    expires_in_ms: int = 0,
    outcome: str = "confirmed",
    reason: str = "",
    fresh: bool = True,
    postings: tuple[Posting, ...] | None = None,
) -> ExecutedRequest:
    if postings is None:
        postings = (
            (Posting(payer, -amount, 0), Posting(payee, amount, 0))
            if outcome == "confirmed" and op == "transfer"
            else ()
        )
    return ExecutedRequest(
        client_id,
        request_id,
        bytes([request_id % 256]) * 32,
        payer,
        payee,
        amount,
        outcome,
        reason,
        fresh,
        op,
        ref[0],
        ref[1],
        expires_in_ms,
        postings,
    )


def batch(
    seq: int,
    *requests: ExecutedRequest,
    released: tuple[Release, ...] = (),
    timestamp_ms: int | None = None,
    view: int = 0,
) -> Executed:
    return Executed(
        view,
        seq,
        bytes([seq % 256]) * 32,
        requests,
        1000 * seq if timestamp_ms is None else timestamp_ms,
        view % 4,
        bytes([(seq + 1) % 256]) * 32,
        released,
    )


@pytest.fixture(params=["memory", "sqlite", "threaded"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., HistoryStore]]:
    opened: list[SqliteHistoryStore | ThreadedHistoryStore] = []

    def make(retention_seqs: int = 1000) -> HistoryStore:
        if request.param == "memory":
            return MemoryHistoryStore(retention_seqs)
        store = SqliteHistoryStore(tmp_path / f"history-{len(opened)}.sqlite", retention_seqs)
        if request.param == "threaded":  # the node's: written by its own thread
            threaded = ThreadedHistoryStore(store)
            opened.append(threaded)
            return threaded
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_a_request_is_kept_attributed(make_store: Callable[..., HistoryStore]) -> None:
    store = make_store()
    assert (store.held_from(), store.held_through()) == (0, 0)
    store.record(
        batch(1, request(0, 1), request(1, 2, payer="carol", payee="dave", amount=5), view=5)
    )
    assert (store.held_from(), store.held_through()) == (1, 1)
    record = store.request(1, 2)
    assert record is not None
    assert (record.seq, record.index, record.view, record.primary) == (1, 1, 5, 1)
    assert (record.timestamp_ms, record.batch_digest) == (1000, bytes([2]) * 32)
    assert (record.op, record.payer, record.payee, record.amount) == (
        "transfer",
        "carol",
        "dave",
        5,
    )
    assert (record.outcome, record.reason, record.decides) == ("confirmed", "", 1)
    assert [(p.account, p.available_delta, p.held_delta) for p in record.postings] == [
        ("carol", -5, 0),
        ("dave", 5, 0),
    ]
    assert store.request(1, 3) is None
    assert store.request(2, 2) is None


def test_only_a_requests_decision_answers_its_status(
    make_store: Callable[..., HistoryStore],
) -> None:
    store = make_store()
    store.record(batch(1, request(0, 1, outcome="rejected", reason="insufficient_funds")))
    # A re-proposal of it, and a reuse of its id with another body: attribution only.
    store.record(
        batch(2, request(0, 1, fresh=False, outcome="rejected", reason="insufficient_funds"))
    )
    store.record(batch(3, request(0, 1, outcome="rejected", reason="id_reused")))
    record = store.request(0, 1)
    assert record is not None and (record.seq, record.reason) == (1, "insufficient_funds")


def test_account_history_pages_in_ledger_order(make_store: Callable[..., HistoryStore]) -> None:
    store = make_store()
    store.record(batch(1, request(0, 1, amount=1), request(0, 2, amount=2)))
    store.record(batch(2, request(1, 1, payer="carol", payee="alice", amount=3)))
    store.record(
        batch(
            3,
            request(0, 3, amount=4),
            released=(Release(0, 9, "alice", 7),),
        )
    )
    everything = store.account("alice", (0, 0), 3, 100)
    assert [(e.seq, e.position, e.kind, e.available_delta, e.held_delta) for e in everything] == [
        (1, 0, "transfer", -1, 0),
        (1, 2, "transfer", -2, 0),
        (2, 1, "transfer", 3, 0),
        (3, 0, EXPIRY, 7, -7),
        (3, 1, "transfer", -4, 0),
    ]
    assert (everything[3].client_id, everything[3].request_id) == (0, 9)
    first = store.account("alice", (0, 0), 3, 2)
    assert first == everything[:2]
    last = first[-1]
    assert store.account("alice", (last.seq, last.position), 3, 2) == everything[2:4]
    assert store.account("alice", (0, 0), 2, 100) == everything[:3]
    assert store.account("nobody", (0, 0), 3, 100) == []


def test_a_holds_fate_follows_what_named_it(make_store: Callable[..., HistoryStore]) -> None:
    store = make_store()

    def authorize(client: int, rid: int) -> ExecutedRequest:
        return request(
            client,
            rid,
            "authorize",
            amount=50,
            expires_in_ms=500,
            postings=(Posting("alice", -50, 50),),
        )

    store.record(batch(1, authorize(0, 1), authorize(0, 2), authorize(0, 3), authorize(0, 4)))
    hold = store.hold(0, 1)
    assert hold is not None
    assert (hold.fate, hold.amount, hold.expires_at_ms, hold.authorized_seq) == (OPEN, 50, 1500, 1)
    # A refused capture closes nothing; an accepted one does, with what it took.
    store.record(
        batch(
            2,
            request(
                1, 1, "capture", "", "", 80, ref=(0, 1), outcome="rejected", reason="exceeds_hold"
            ),
            request(1, 2, "capture", "", "", 30, ref=(0, 1), postings=(Posting("bob", 30, 0),)),
            request(0, 5, "void", "", "", 0, ref=(0, 2), postings=(Posting("alice", 50, -50),)),
        )
    )
    store.record(batch(3, released=(Release(0, 3, "alice", 50),)))
    captured, voided, expired, still = (store.hold(0, r) for r in (1, 2, 3, 4))
    assert captured is not None and (captured.fate, captured.closed_seq, captured.captured) == (
        CAPTURED,
        2,
        30,
    )
    assert voided is not None and (voided.fate, voided.closed_seq) == (VOIDED, 2)
    assert expired is not None and (expired.fate, expired.closed_seq) == (EXPIRED, 3)
    assert still is not None and still.fate == OPEN
    # Not holds: a transfer, a refused authorize, nothing.
    store.record(
        batch(
            4,
            request(0, 6),
            request(0, 7, "authorize", outcome="rejected", reason="invalid_expiry"),
        )
    )
    assert store.hold(0, 6) is None and store.hold(0, 7) is None and store.hold(5, 5) is None


def test_retention_prunes_old_seqs(make_store: Callable[..., HistoryStore]) -> None:
    retention = 16
    store = make_store(retention)
    for seq in range(1, 101):
        store.record(batch(seq, request(0, seq)))
        held = store.held_through() - store.held_from() + 1
        assert store.held_through() == seq
        assert held <= retention + prune_chunk(retention) - 1
    assert store.held_from() > 1
    assert store.request(0, 1) is None
    assert store.request(0, store.held_from()) is not None
    entries = store.account("alice", (0, 0), 100, 256)
    assert entries[0].seq == store.held_from() and len(entries) == 100 - store.held_from() + 1


def test_recording_a_seq_again_rewrites_it_and_what_follows(
    make_store: Callable[..., HistoryStore],
) -> None:
    store = make_store()
    batches = [batch(seq, request(0, seq)) for seq in range(1, 11)]
    for executed in batches:
        store.record(executed)
    before = [store.request(0, seq) for seq in range(1, 11)]
    # Recovery re-executes from the checkpoint: the same rows again.
    for executed in batches[5:]:
        store.record(executed)
    assert [store.request(0, seq) for seq in range(1, 11)] == before
    assert (store.held_from(), store.held_through()) == (1, 10)
    assert len(store.account("alice", (0, 0), 10, 256)) == 10
    # A re-execution that went otherwise (a torn log repaired): what followed is dropped.
    store.record(batch(6, request(2, 60)))
    assert store.held_through() == 6
    assert store.request(0, 6) is None and store.request(0, 7) is None
    assert store.request(2, 60) is not None and store.request(0, 5) is not None


def test_a_gap_starts_the_held_range_afresh(make_store: Callable[..., HistoryStore]) -> None:
    store = make_store()
    for seq in range(1, 6):
        store.record(batch(seq, request(0, seq)))
    # Caught up by state transfer: seqs 6..8 were never executed here.
    store.record(batch(9, request(0, 9)))
    assert (store.held_from(), store.held_through()) == (9, 9)
    assert store.request(0, 1) is None and store.request(0, 9) is not None
    assert [e.seq for e in store.account("alice", (0, 0), 9, 256)] == [9]


def test_both_stores_agree(tmp_path: Path) -> None:
    rng = random.Random(11)
    memory = MemoryHistoryStore(24)
    sqlite = SqliteHistoryStore(tmp_path / "h.sqlite", 24)
    accounts = ["alice", "bob", "carol", "dave"]
    seq = 0
    ids = iter(range(1, 10_000))
    for _ in range(150):
        choice = rng.random()
        seq = rng.randint(max(1, seq - 5), seq) if choice < 0.1 and seq else seq + 1
        if choice > 0.97:
            seq += 4
        # Each (client, request id) is decided once, as in a ledger.
        requests = tuple(
            request(
                rng.randint(0, 3),
                next(ids),
                payer=rng.choice(accounts),
                payee=rng.choice(accounts),
                amount=rng.randint(1, 9),
            )
            for _ in range(rng.randint(0, 3))
        )
        released = tuple(
            Release(0, rng.randint(0, 40), rng.choice(accounts), 3)
            for _ in range(rng.randint(0, 1))
        )
        executed = batch(seq, *requests, released=released)
        memory.record(executed)
        sqlite.record(executed)
        assert (memory.held_from(), memory.held_through()) == (
            sqlite.held_from(),
            sqlite.held_through(),
        )
        for account in accounts:
            cursor = (rng.randint(0, seq), rng.randint(0, 3))
            assert memory.account(account, cursor, seq, 7) == sqlite.account(
                account, cursor, seq, 7
            )
        for client in range(4):
            for rid in range(0, 460, 3):
                assert memory.request(client, rid) == sqlite.request(client, rid)
    sqlite.close()


def test_sqlite_history_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    store = SqliteHistoryStore(path, 50)
    for seq in range(1, 4):
        store.record(batch(seq, request(0, seq, amount=2**63 - 1)))
    store.record(batch(4, request(0, 2**64 - 1)))
    store.close()
    again = SqliteHistoryStore(path, 50)
    assert (again.held_from(), again.held_through()) == (1, 4)
    record = again.request(0, 3)
    assert record is not None and record.amount == 2**63 - 1
    assert record.postings[0].available_delta == -(2**63 - 1)
    assert again.request(0, 2**64 - 1) is not None
    again.close()


def test_sqlite_refuses_a_file_that_is_not_history(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(HistoryStoreError, match="junk.sqlite"):
        SqliteHistoryStore(path)


def test_retention_must_be_positive() -> None:
    with pytest.raises(ValueError, match="retention"):
        MemoryHistoryStore(0)


# Version 1's tables (runtime/history_store.py before version 2), as files of the previous
# release have them.
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE requests (
    seq INTEGER NOT NULL, idx INTEGER NOT NULL,
    client_id INTEGER NOT NULL, request_id INTEGER NOT NULL,
    ref_client INTEGER NOT NULL, ref_request INTEGER NOT NULL,
    closes_hold INTEGER NOT NULL, decides INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (seq, idx)
);
CREATE INDEX requests_by_id ON requests (client_id, request_id);
CREATE INDEX requests_by_ref ON requests (ref_client, ref_request);
CREATE TABLE releases (
    seq INTEGER NOT NULL, hold_client INTEGER NOT NULL, hold_request INTEGER NOT NULL,
    payer TEXT NOT NULL, amount TEXT NOT NULL,
    PRIMARY KEY (seq, hold_client, hold_request)
);
CREATE INDEX releases_by_hold ON releases (hold_client, hold_request);
CREATE TABLE entries (
    account TEXT NOT NULL, seq INTEGER NOT NULL, position INTEGER NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (account, seq, position)
) WITHOUT ROWID;
CREATE INDEX entries_by_seq ON entries (seq);
"""


def _as_version_1(source: Path, target: Path) -> None:
    """Write `source`'s history (version 2) into a version 1 file at `target`."""
    old = sqlite3.connect(str(target))
    old.executescript(_SCHEMA_V1)
    new = sqlite3.connect(str(source))
    old.executemany("INSERT INTO meta VALUES (?, ?)", new.execute("SELECT key, value FROM meta"))
    old.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    old.executemany(
        "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        new.execute("SELECT * FROM requests"),
    )
    old.executemany(
        "INSERT INTO releases VALUES (?, ?, ?, ?, ?)", new.execute("SELECT * FROM releases")
    )
    rows = new.execute("SELECT * FROM entries").fetchall()
    old.executemany(
        "INSERT INTO entries VALUES (?, ?, ?, ?)",
        [
            (row[2], row[0], row[1], pack([*row[:2], *row[3:6], row[6] % 2**64, *row[7:]]))
            for row in rows
        ],
    )
    old.commit()
    old.close()
    new.close()


def test_a_version_1_file_is_migrated_with_everything_it_held(tmp_path: Path) -> None:
    current = SqliteHistoryStore(tmp_path / "v2.sqlite", 50)
    current.record(batch(1, request(0, 1, "authorize", amount=30, expires_in_ms=10)))
    current.record(batch(2, request(0, 2**64 - 1, amount=2**63 - 1)))
    current.record(batch(3, request(1, 1, "capture", payer="", amount=20, ref=(0, 1))))
    current.record(batch(4, request(0, 3), released=(Release(0, 9, "alice", 7),)))
    current.close()
    _as_version_1(tmp_path / "v2.sqlite", tmp_path / "v1.sqlite")
    current = SqliteHistoryStore(tmp_path / "v2.sqlite", 50)
    migrated = SqliteHistoryStore(tmp_path / "v1.sqlite", 50)
    assert (migrated.held_from(), migrated.held_through()) == (1, 4)
    for client, request_id in ((0, 1), (0, 2**64 - 1), (1, 1), (0, 3), (5, 5)):
        assert migrated.request(client, request_id) == current.request(client, request_id)
    assert migrated.hold(0, 1) == current.hold(0, 1) is not None
    for account in ("alice", "bob", ""):
        assert migrated.account(account, (0, 0), 4, 100) == current.account(account, (0, 0), 4, 100)
    assert len(migrated.account("alice", (0, 0), 4, 100)) == 3
    migrated.record(batch(5, request(0, 4)))  # and goes on as version 2
    migrated.close()
    again = SqliteHistoryStore(tmp_path / "v1.sqlite", 50)
    assert again.request(0, 4) is not None and again.held_through() == 5
    assert sqlite3.connect(str(tmp_path / "v1.sqlite")).execute(
        "SELECT value FROM meta WHERE key = 'schema_version'"
    ).fetchone() == (2,)
    again.close()
    current.close()


def test_sqlite_refuses_an_unknown_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    SqliteHistoryStore(path).close()
    db = sqlite3.connect(str(path))
    db.execute("UPDATE meta SET value = 9 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(HistoryStoreError, match="schema version 9, expected 2"):
        SqliteHistoryStore(path)
