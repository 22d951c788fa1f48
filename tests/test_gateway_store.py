"""The gateway's SQLite store (gateway/store.py) and API keys (gateway/keys.py, and the
`pbft gateway-key` command): durability settings, hashed tokens, monotonic request ids,
decisions written in one transaction with their event, bounded retention."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio

from cli.exits import EXIT_OK, EXIT_USAGE
from cli.main import main
from gateway.keys import Caller, bearer_token, token_hash
from gateway.store import (
    DEFAULT_RETENTION_MS,
    Database,
    Decision,
    EventRow,
    GatewayStore,
    IdempotencyRecord,
    OperationRow,
    PaymentRow,
    StoreError,
    connect,
)


def _record(key: str, request_id: int, target: str = "pay_0_1") -> IdempotencyRecord:
    return IdempotencyRecord(
        client_id=0,
        key=key,
        route="POST /v1/payments",
        body_sha256=b"\x01" * 32,
        request_id=request_id,
        target=target,
        operation={"op": "transfer", "payer": "a", "payee": "b", "amount": 5},
        state="in_flight",
        status_code=None,
        response=None,
        created_ms=1,
    )


def _payment(pid: str, request_id: int, status: str = "pending") -> PaymentRow:
    return PaymentRow(
        id=pid,
        client_id=0,
        request_id=request_id,
        from_account="a",
        to_account="b",
        from_owner=0,
        to_owner=1,
        amount=5,
        capture=True,
        status=status,
        reason="",
        captured_amount=0,
        refunded_amount=0,
        expires_in_ms=None,
        expires_at_ms=None,
        metadata={"order": "42"},
        seq=0,
        receipt=None,
        created_ms=1,
        updated_ms=1,
    )


def test_connect_sets_wal_and_full_sync(tmp_path: Path) -> None:
    db = connect(tmp_path / "g.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"api_keys", "idempotency", "payments", "payment_operations", "events"} <= tables
    assert "request_ids" in tables


def test_connect_refuses_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        connect(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        connect(tmp_path / "missing" / "g.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a gateway database"):
        connect(tmp_path / "junk.db")


def test_keys_are_stored_hashed_and_revocable(tmp_path: Path) -> None:
    database = Database(tmp_path / "g.db")
    key, token = database.create_key(3)
    assert token.startswith("gk_") and len(token) == 3 + 43
    assert database.lookup_token(token) == Caller(client_id=3, key_id=key.key_id)
    stored = database.db.execute("SELECT token_sha256 FROM api_keys").fetchall()
    assert stored == [(token_hash(token),)]
    raw = (tmp_path / "g.db").read_bytes() + (tmp_path / "g.db-wal").read_bytes()
    assert token.encode() not in raw
    other, other_token = database.create_key(4)
    assert [k.client_id for k in database.list_keys()] == [3, 4]
    assert [k.key_id for k in database.list_keys(4)] == [other.key_id]
    assert database.revoke_key(key.key_id).revoked_ms is not None
    assert database.lookup_token(token) is None
    assert database.lookup_token(other_token) is not None
    assert database.lookup_token("gk_" + "A" * 43) is None


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer gk_abc") == "gk_abc"
    assert bearer_token("bearer  gk_abc ") == "gk_abc"
    for bad in (None, "", "Basic gk_abc", "Bearer sk_abc", "Bearer", "Bearer gk_" + "x" * 200):
        assert bearer_token(bad) is None
    assert bearer_token("Bearer gk_é") is None


def test_request_ids_are_monotonic_across_reopen(tmp_path: Path) -> None:
    first = Database(tmp_path / "g.db")
    assert first.next_request_id(0, 1000) == 1000
    assert first.next_request_id(0, 10) == 1001  # the clock went back: still increasing
    assert first.next_request_id(1, 10) == 10  # per client
    first.close()
    again = Database(tmp_path / "g.db")
    assert again.next_request_id(0, 5) == 1002


def test_begin_writes_once_and_returns_the_existing_record(tmp_path: Path) -> None:
    database = Database(tmp_path / "g.db")
    payment = _payment("pay_0_7", 7)
    operation = OperationRow("pay_0_7", 0, 7, "transfer", 5, "pending", "", 0, None, 1)
    assert database.begin(_record("k1", 7, "pay_0_7"), payment, operation) is None
    again = database.begin(_record("k1", 8, "pay_0_8"), _payment("pay_0_8", 8), None)
    assert again is not None and again.request_id == 7 and again.state == "in_flight"
    assert database.payment("pay_0_8") is None  # nothing of the second attempt was written
    assert database.payment("pay_0_7") == payment
    assert [o.request_id for o in database.operations("pay_0_7")] == [7]
    assert [r.key for r in database.in_flight(10)] == ["k1"]


def test_a_decision_is_one_transaction_with_its_event(tmp_path: Path) -> None:
    database = Database(tmp_path / "g.db")
    database.begin(_record("k1", 7, "pay_0_7"), _payment("pay_0_7", 7), None)
    decided = _payment("pay_0_7", 7, "confirmed")
    decided.seq = 12
    event_ids = database.decide(
        Decision(
            payment=decided,
            events=[EventRow("payment.confirmed", "pay_0_7", 0, {"id": "pay_0_7"})],
            answer=(0, "k1", 200, b'{"id":"pay_0_7"}'),
        )
    )
    assert len(event_ids) == 1
    record = database.idempotency(0, "k1")
    assert record is not None and (record.state, record.status_code) == ("done", 200)
    assert record.response == b'{"id":"pay_0_7"}'
    stored = database.payment("pay_0_7")
    assert stored is not None and (stored.status, stored.seq) == ("confirmed", 12)
    [(event_id, body)] = database.events_after(0, 10)
    event = json.loads(body)
    assert event == {
        "object": "event",
        "id": f"evt_{event_id}",
        "type": "payment.confirmed",
        "created_ms": event["created_ms"],
        "data": {"id": "pay_0_7"},
    }
    assert database.in_flight(10) == []
    # A decision failing after its event was written leaves nothing: no event without
    # its answer (the answer's bytes cannot be bound here).
    bad = Decision(
        events=[EventRow("payment.refunded", "pay_0_7", 0, {})],
        answer=(0, "k1", 201, object()),  # type: ignore[arg-type]
    )
    with pytest.raises(sqlite3.Error):
        database.decide(bad)
    assert len(database.events_after(0, 10)) == 1
    record = database.idempotency(0, "k1")
    assert record is not None and record.status_code == 200


def test_prune_keeps_unanswered_records_and_recent_ones(tmp_path: Path) -> None:
    database = Database(tmp_path / "g.db")
    for key, request_id in (("old", 1), ("new", 2), ("open", 3)):
        database.begin(_record(key, request_id, f"pay_0_{request_id}"), None, None)
    database.decide(Decision(answer=(0, "old", 200, b"{}")))
    database.decide(Decision(answer=(0, "new", 200, b"{}")))
    database.db.execute("UPDATE idempotency SET done_ms = 0 WHERE key = 'old'")
    database.db.commit()
    now = 10 * DEFAULT_RETENTION_MS
    database.db.execute("UPDATE idempotency SET done_ms = ? WHERE key = 'new'", (now - 1000,))
    database.db.commit()
    assert database.prune(now, DEFAULT_RETENTION_MS, DEFAULT_RETENTION_MS) == (1, 0)
    assert database.idempotency(0, "old") is None
    assert database.idempotency(0, "new") is not None
    assert database.idempotency(0, "open") is not None


def test_the_async_store_runs_off_the_loop_and_refuses_short_retention(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="24 hours"):
        GatewayStore(tmp_path / "g.db", retention_ms=1000)
    store = GatewayStore(tmp_path / "g.db")

    async def use() -> list[int]:
        ids: list[int] = []

        async def take() -> None:
            ids.append(await store.next_request_id(0, 1))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(take)
        return ids

    assert sorted(trio.run(use)) == list(range(1, 21))  # one lock: no id handed out twice
    store.close()


def test_gateway_key_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "g.db")
    assert main(["gateway-key", "create", "--db", db, "--client", "1"]) == EXIT_OK
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("gk_") and "shown only now" in err
    assert Database(db).lookup_token(token) == Caller(1, 1)
    assert main(["gateway-key", "list", "--db", db]) == EXIT_OK
    listed = json.loads(capsys.readouterr()[0])
    assert (listed["id"], listed["client"], listed["revoked"]) == (1, 1, False)
    assert token not in json.dumps(listed)
    assert main(["gateway-key", "revoke", "--db", db, "--id", "1"]) == EXIT_OK
    assert json.loads(capsys.readouterr()[0])["revoked"] is True
    assert Database(db).lookup_token(token) is None
    (tmp_path / "junk").write_bytes(b"junk" * 1000)
    for argv, problem in (
        (["revoke", "--db", db, "--id", "9"], "--id: no API key with id 9"),
        (["list", "--db", str(tmp_path / "none.db")], "--db: no gateway database at"),
        (["create", "--db", str(tmp_path / "no" / "g.db"), "--client", "0"], "does not exist"),
        (["create", "--db", str(tmp_path), "--client", "0"], "is a directory"),
        (["list", "--db", str(tmp_path / "junk")], "not a gateway database"),
        (["create", "--db", db, "--client", "-1"], "--client: -1 is not a client id"),
    ):
        assert main(["gateway-key", *argv]) == EXIT_USAGE
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("pbft: ") and problem in err, err
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM api_keys").fetchone() == (1,)


def test_claim_writes_the_id_key_and_payment_in_one_step(tmp_path: Path) -> None:
    database = Database(tmp_path / "g.db")
    database.next_request_id(0, 500)
    built: list[int] = []

    def build(request_id: int) -> tuple[IdempotencyRecord, PaymentRow, None]:
        built.append(request_id)
        pid = f"pay_0_{request_id}"
        return _record("k", request_id, pid), _payment(pid, request_id), None

    record, fresh = database.claim(0, "k", 100, build)
    assert fresh and record.request_id == 501 and built == [501]  # past the stored id
    assert database.payment("pay_0_501") is not None
    again, fresh = database.claim(0, "k", 100, build)
    assert not fresh and again.request_id == 501 and built == [501]  # not built again
    assert database.next_request_id(0, 1) == 502

    def wrong(request_id: int) -> tuple[IdempotencyRecord, None, None]:
        return _record("other", request_id), None, None

    with pytest.raises(ValueError, match="another key"):
        database.claim(0, "k2", 1, wrong)
    assert database.idempotency(0, "other") is None and database.next_request_id(0, 1) == 503


def test_the_database_and_its_wal_are_private_to_the_owner(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.db"
        database = Database(fresh)
        database.create_key(0)
        for path in (fresh, tmp_path / "fresh.db-wal"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        database.close()
        # A database left world-readable (before this fix) loses its group/other bits.
        existing = tmp_path / "old.db"
        Database(existing).close()
        existing.chmod(0o644)
        Database(existing).close()
        assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_listing_walks_indexes_and_pages_every_partys_payments(tmp_path: Path) -> None:
    from dataclasses import replace

    database = Database(tmp_path / "g.db")
    rows = [
        # made by client 0 / paid from client 2's account / paid to client 2's account
        replace(
            _payment(f"pay_{i % 3}_{i}", i),
            client_id=i % 3,
            from_owner=[0, 2, 1][i % 3],
            to_owner=[1, 0, 2][i % 3],
            from_account=f"a{i % 2}",
            to_account="m",
        )
        for i in range(1, 31)
    ]
    with database.db:
        for row in rows:
            database._put_payment(row)
    for client in (0, 1, 2):
        for account in (None, "a1", "m"):
            expected = [
                row.id
                for row in reversed(rows)
                if client in (row.client_id, row.from_owner, row.to_owner)
                and account in (None, row.from_account, row.to_account)
            ]
            seen: list[str] = []
            before = None
            while True:
                page = database.payments_of(client, account, 4, before)
                seen += [row.id for row in page]
                if len(page) < 4:
                    break
                before = page[-1].row
            assert seen == expected, (client, account)
    # No walk over the whole table: each party (or side of the account) is an index search.
    for account in (None, "m"):
        statements: list[str] = []
        database.db.set_trace_callback(statements.append)  # the SQL with its values
        database.payments_of(0, account, 10, 20)
        database.db.set_trace_callback(None)
        (query,) = [sql for sql in statements if "UNION" in sql]
        plans = [p[3] for p in database.db.execute("EXPLAIN QUERY PLAN " + query)]
        assert plans and not any(plan.startswith("SCAN payments") for plan in plans), plans
        assert sum("USING COVERING INDEX" in p or "USING INDEX" in p for p in plans) >= 2


def test_a_payment_shows_metadata_to_its_creator_and_only_recent_operations() -> None:
    from gateway.payments_json import MAX_RENDERED_OPERATIONS, payment_json

    def op(request_id: int, op: str, outcome: str) -> OperationRow:
        return OperationRow("pay_0_1", 0, request_id, op, 1, outcome, "", request_id, None, 1)

    payment = _payment("pay_0_1", 1, "confirmed")
    operations = [op(1, "transfer", "confirmed")]
    operations += [op(i, "refund", "rejected") for i in range(2, 40)]
    assert payment_json(payment, operations, 0)["metadata"] == {"order": "42"}
    assert payment_json(payment, operations)["metadata"] == {"order": "42"}
    assert payment_json(payment, operations, 1)["metadata"] == {}
    # Rejected attempts are not the payment's operations (their answer is the key's).
    shown = payment_json(payment, operations)
    assert [o["op"] for o in shown["operations"]] == ["transfer"]
    assert shown["operations_has_more"] is False
    operations += [op(i, "refund", "confirmed") for i in range(40, 70)]
    shown = payment_json(payment, operations)
    assert len(shown["operations"]) == MAX_RENDERED_OPERATIONS
    assert shown["operations"][-1]["request_id"] == 69 and shown["operations_has_more"]
    latest = payment_json(payment, operations, recent=1)
    assert [o["request_id"] for o in latest["operations"]] == [69]
