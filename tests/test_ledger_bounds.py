"""What bounds the ledger's records by configuration (pbft/holds.py): every hold and
refundable payment counts against one client's cap, the oldest closed hold or payment makes
room, and pbft/checkpoint_size.py counts every record a checkpoint can hold."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from pbft.checkpoint_size import records_size_bound, snapshot_size_bound
from pbft.holds import HoldState, LedgerLimits
from pbft.ledger import Account, Ledger, LedgerSnapshotError, Payment
from pbft.ledger_leaves import LedgerBuilder
from pbft.operations import Operation

SHOP, ALICE, BOB = 1, 2, 3
LIMITS = LedgerLimits(
    max_hold_duration_ms=10_000,
    max_holds_per_client=3,
    max_accounts_per_client=1,
    closed_hold_retention_ms=5_000,
    refund_window_ms=5_000,
    max_refundable_per_client=2,
)


class _Driver:
    def __init__(self, limits: LedgerLimits = LIMITS) -> None:
        accounts = {
            "alice": Account(ALICE, 10_000),
            "bob": Account(BOB, 10_000),
            "shop": Account(SHOP, 0),
        }
        self.ledger = Ledger(accounts, dedup_window=4096, limits=limits)
        self.seq = 0
        self.at(100)

    def at(self, now_ms: int) -> None:
        self.seq += 1
        self.ledger.begin_batch(self.seq, now_ms)

    def reason(self, client: int, request_id: int, operation: Operation) -> str:
        payment = Payment(
            client,
            request_id,
            operation.payer,
            operation.payee,
            operation.amount,
            operation.op,
            operation.ref_client,
            operation.ref_request,
            operation.expires_in_ms,
        )
        body = hashlib.sha256(repr(payment).encode()).digest()
        result = self.ledger.execute(payment, body, self.seq)
        assert self.ledger.total_balance() == self.ledger.recount_total()
        return result.decision.reason.value


def test_closed_holds_count_against_the_cap_and_the_oldest_makes_room() -> None:
    driver = _Driver()
    for request in (1, 2, 3):
        assert driver.reason(ALICE, request, Operation.authorize("alice", "shop", 1, 9000)) == ""
    # Three open holds: a fourth is refused, as before.
    assert driver.reason(ALICE, 4, Operation.authorize("alice", "shop", 1, 9000)) == (
        "too_many_holds"
    )
    driver.at(200)
    assert driver.reason(SHOP, 1, Operation.capture((ALICE, 2), 1)) == ""
    driver.at(300)
    assert driver.reason(ALICE, 5, Operation.void((ALICE, 1))) == ""
    # Closed holds do not block an authorize: the oldest closed one (2, closed at 200, not
    # 1, closed at 300) is forgotten to make room, well before its retention ends.
    assert driver.reason(ALICE, 6, Operation.authorize("alice", "shop", 1, 9000)) == ""
    holds = driver.ledger.records.holds
    assert sorted(holds) == [(ALICE, 1), (ALICE, 3), (ALICE, 6)]
    assert driver.reason(SHOP, 2, Operation.capture((ALICE, 2), 1)) == "hold_not_found"
    assert driver.reason(SHOP, 3, Operation.capture((ALICE, 1), 1)) == "hold_already_voided"
    assert driver.reason(ALICE, 7, Operation.authorize("alice", "shop", 1, 9000)) == ""
    assert sorted(holds) == [(ALICE, 3), (ALICE, 6), (ALICE, 7)]
    assert driver.reason(SHOP, 4, Operation.void((ALICE, 1))) == "hold_not_found"
    # Another client's holds are its own: bob still has his full cap.
    for request in (1, 2, 3):
        assert driver.reason(BOB, request, Operation.authorize("bob", "shop", 1, 9000)) == ""


def test_refundable_payments_are_capped_per_client_oldest_forgotten_first() -> None:
    driver = _Driver()
    for request in (1, 2, 3):
        assert driver.reason(ALICE, request, Operation.transfer("alice", "shop", 10)) == ""
    assert driver.reason(BOB, 1, Operation.transfer("bob", "shop", 10)) == ""
    payments = driver.ledger.records.payments
    assert sorted(payments) == [(ALICE, 2), (ALICE, 3), (BOB, 1)]
    assert driver.reason(SHOP, 1, Operation.refund((ALICE, 1), 1)) == "payment_not_found"
    assert driver.reason(SHOP, 2, Operation.refund((ALICE, 2), 1)) == ""
    # A capture is a payment of its hold's client, and pushes out that client's oldest.
    assert driver.reason(ALICE, 4, Operation.authorize("alice", "shop", 5, 9000)) == ""
    driver.at(200)
    assert driver.reason(SHOP, 3, Operation.capture((ALICE, 4), 5)) == ""
    assert sorted(payments) == [(ALICE, 3), (ALICE, 4), (BOB, 1)]
    assert driver.reason(SHOP, 4, Operation.refund((ALICE, 2), 1)) == "payment_not_found"
    # The window still applies: everything paid at 100 goes at 5100, the capture at 5200.
    driver.at(5100)
    assert sorted(payments) == [(ALICE, 4)]
    driver.at(5200)
    assert payments == {}


def test_no_refunds_when_the_cap_is_zero() -> None:
    driver = _Driver(LedgerLimits(max_refundable_per_client=0))
    assert driver.reason(ALICE, 1, Operation.transfer("alice", "shop", 10)) == ""
    assert driver.ledger.records.payments == {}
    assert driver.reason(SHOP, 1, Operation.refund((ALICE, 1), 1)) == "payment_not_found"


def test_records_and_their_heaps_stay_bounded_whatever_the_request_rate() -> None:
    driver = _Driver()
    records = driver.ledger.records
    request = 0
    for batch in range(300):  # all within one retention: only the caps bound them
        driver.at(200 + batch)
        for _ in range(4):
            request += 1
            driver.reason(ALICE, request, Operation.transfer("alice", "shop", 1))
        request += 1
        assert driver.reason(ALICE, request, Operation.authorize("alice", "shop", 1, 50)) == ""
        assert driver.reason(SHOP, request, Operation.capture((ALICE, request), 1)) == ""
    assert len(records.payments) == LIMITS.max_refundable_per_client
    assert len(records.holds) == LIMITS.max_holds_per_client
    assert len(records) <= LIMITS.max_refundable_per_client + LIMITS.max_holds_per_client
    for heap in (records._refundable, records._closed, records._expiry):
        assert len(heap) <= 2 * len(records) + 64
    # The newest survive: a refund of the last capture still works.
    assert driver.reason(SHOP, 10**6, Operation.refund((ALICE, request), 1)) == ""


def _busy() -> _Driver:
    driver = _Driver()
    for request in range(1, 7):
        driver.reason(ALICE, request, Operation.transfer("alice", "shop", 3))
        driver.reason(ALICE, 100 + request, Operation.authorize("alice", "bob", 2, 700))
        driver.reason(BOB, request, Operation.capture((ALICE, 100 + request), 1))
        driver.at(100 + 50 * request)
    driver.reason(BOB, 50, Operation.authorize("bob", "alice", 4, 900))
    return driver


def test_a_restored_or_transferred_ledger_evicts_the_same_records_next() -> None:
    driver = _busy()
    snapshot = driver.ledger.snapshot()
    restored = Ledger.restore(snapshot)
    builder = LedgerBuilder()
    for leaf in driver.ledger.leaves(0, driver.ledger.leaf_count()):
        builder.add(leaf)
    twins = [driver]
    for ledger in (restored, builder.finish()):
        assert ledger.snapshot() == snapshot
        twin = _Driver()
        twin.ledger, twin.seq = ledger, driver.seq
        twins.append(twin)
    for each in twins:
        for request in range(200, 204):
            each.reason(ALICE, request, Operation.transfer("alice", "shop", 1))
            each.reason(ALICE, request + 10, Operation.authorize("alice", "shop", 1, 100))
        each.at(3000)
        each.at(6000)
    final = driver.ledger.snapshot()
    assert all(twin.ledger.snapshot() == final for twin in twins)
    assert all(twin.ledger.digest() == driver.ledger.digest() for twin in twins)


def test_restore_refuses_more_records_of_a_client_than_its_caps() -> None:
    driver = _busy()
    state = msgpack.unpackb(driver.ledger.snapshot())
    rows = state[10]
    kinds = [row[1] for row in rows]
    assert kinds.count("payment") >= 2 and kinds.count("hold") >= 3
    for field, fewer in ((5, 1), (1, 2)):  # max_refundable_per_client, max_holds_per_client
        tight = msgpack.unpackb(driver.ledger.snapshot())
        tight[7][field] = fewer
        with pytest.raises(LedgerSnapshotError, match="refundable payments|holds"):
            Ledger.restore(msgpack.packb(tight))


def test_closed_holds_of_a_retention_longer_than_the_cap_keep_to_the_cap() -> None:
    driver = _Driver()
    for request in range(1, 20):
        driver.at(100 + request)
        assert driver.reason(ALICE, request, Operation.authorize("alice", "shop", 1, 9000)) == ""
        assert driver.reason(ALICE, 1000 + request, Operation.void((ALICE, request))) == ""
        held = driver.ledger.records.holds
        assert len(held) <= LIMITS.max_holds_per_client
        assert all(hold.state is HoldState.VOIDED for hold in held.values())


@pytest.mark.parametrize("clients", [1, 3])
def test_the_checkpoint_bound_counts_every_record_at_every_cap(clients: int) -> None:
    limits = LedgerLimits(
        max_holds_per_client=4, max_accounts_per_client=2, max_refundable_per_client=3
    )
    accounts = {f"g{client}": Account(client, 10**12) for client in range(clients)}
    ledger = Ledger(accounts, dedup_window=1, limits=limits)
    ledger.begin_batch(1, 2**40)
    request = 0

    def run(client: int, operation: Operation) -> None:
        nonlocal request
        request += 1
        payment = Payment(
            client,
            request,
            operation.payer,
            operation.payee,
            operation.amount,
            operation.op,
            operation.ref_client,
            operation.ref_request,
            operation.expires_in_ms,
        )
        result = ledger.execute(payment, bytes(32), 1)
        assert result.decision.reason.value == ""

    for client in range(clients):
        # Opened accounts with the longest names: 64 four-byte characters.
        names = [chr(0x10000 + client * 2 + index) * 64 for index in range(2)]
        for name in names:
            run(client, Operation.open_account(name))
        run(client, Operation.transfer(f"g{client}", names[0], 10**10))
        for _ in range(3):
            run(client, Operation.transfer(names[0], names[1], 10**9))
        for _ in range(4):
            run(client, Operation.authorize(names[0], names[1], 10**9, 3_600_000))
    records = ledger.records
    assert len(records.payments) == 3 * clients and len(records.holds) == 4 * clients
    actual = len(ledger.snapshot())
    bound = snapshot_size_bound(accounts, clients, 1, limits)
    assert actual <= bound
    # Slack: ints below their widest (a few bytes each) and the dedup windows, not records.
    slack = bound - actual
    assert slack <= 200 + 80 * clients + 40 * len(records)
    # ... and the records' own part covers the rows (the bound without it would not).
    rows = len(msgpack.packb(records.rows()))
    assert rows <= records_size_bound(accounts, clients, limits)
    assert actual > snapshot_size_bound(accounts, clients, 1)
