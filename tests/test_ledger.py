"""Tests for pbft.ledger, each named after the rule it checks."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.merkle import merkle_root, verify_inclusion
from pbft.holds import LedgerLimits
from pbft.ledger import (
    MAX_AMOUNT,
    MAX_TOTAL,
    Account,
    Decision,
    ExecutionResult,
    GeneratedAccounts,
    Ledger,
    LedgerInvariantError,
    LedgerSnapshotError,
    Outcome,
    Payment,
    Reason,
)
from pbft.operations import Posting

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
ALICE_CLIENT = 1
BOB_CLIENT = 2


def body_digest(payment: Payment) -> bytes:
    """A stand-in for the replica's digest of the signed request body."""
    body = [payment.client_id, payment.request_id, payment.payer, payment.payee, payment.amount]
    return hashlib.sha256(repr(body).encode()).digest()


def run(ledger: Ledger, payment: Payment, seq: int = 1) -> ExecutionResult:
    return ledger.execute(payment, body_digest(payment), seq)


def make_ledger(dedup_window: int = 4096) -> Ledger:
    return Ledger(
        {
            "alice": Account(owner=ALICE_CLIENT, balance=100),
            "bob": Account(owner=BOB_CLIENT, balance=50),
            "carol": Account(owner=3, balance=0),
        },
        dedup_window=dedup_window,
    )


def assert_rejected(result: ExecutionResult, reason: Reason) -> None:
    assert result.fresh
    assert result.decision.outcome is Outcome.REJECTED
    assert result.decision.reason is reason


def tamper(snapshot: bytes, mutate: Callable[[list[Any]], None]) -> bytes:
    state = msgpack.unpackb(snapshot, raw=False)
    mutate(state)
    return msgpack.packb(state, use_bin_type=True)


# -- confirmation --------------------------------------------------------------


def test_confirmed_payment_moves_amount_and_is_stored() -> None:
    ledger = make_ledger()
    payment = Payment(ALICE_CLIENT, 7, "alice", "bob", 30)
    result = run(ledger, payment, seq=5)
    assert result == ExecutionResult(
        Decision(Outcome.CONFIRMED, Reason.NONE, 5, body_digest(payment)),
        fresh=True,
        postings=(Posting("alice", -30, 0), Posting("bob", 30, 0)),
    )
    assert ledger.balance("alice") == 70
    assert ledger.balance("bob") == 80
    assert ledger.lookup(ALICE_CLIENT, 7) == result.decision
    assert ledger.executed_count == 1
    assert ledger.total_balance() == ledger.recount_total() == ledger.initial_total == 150


def test_payment_of_entire_balance_is_confirmed() -> None:
    ledger = make_ledger()
    result = run(ledger, Payment(ALICE_CLIENT, 1, "alice", "carol", 100))
    assert result.decision.outcome is Outcome.CONFIRMED
    assert ledger.balance("alice") == 0


# -- rejection reasons, and the fixed order they are checked in -----------------


@pytest.mark.parametrize("amount", [0, -1, -(2**70), MAX_AMOUNT + 1, 2**80, True, False, 1.0, "5"])
def test_invalid_amount_rejected(amount: Any) -> None:
    ledger = make_ledger()
    before = ledger.snapshot()
    result = run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", amount))
    assert_rejected(result, Reason.INVALID_AMOUNT)
    assert ledger.accounts() == Ledger.restore(before).accounts()


def test_invalid_amount_checked_before_same_and_unknown_account() -> None:
    ledger = make_ledger()
    assert_rejected(run(ledger, Payment(9, 1, "ghost", "ghost", 0)), Reason.INVALID_AMOUNT)
    assert_rejected(run(ledger, Payment(9, 2, "ghost", "phantom", -5)), Reason.INVALID_AMOUNT)


def test_same_account_checked_before_unknown_account() -> None:
    ledger = make_ledger()
    assert_rejected(run(ledger, Payment(ALICE_CLIENT, 1, "alice", "alice", 1)), Reason.SAME_ACCOUNT)
    assert_rejected(run(ledger, Payment(9, 2, "ghost", "ghost", 1)), Reason.SAME_ACCOUNT)


@pytest.mark.parametrize(
    ("payer", "payee"),
    [("ghost", "bob"), ("alice", "ghost"), (None, "bob"), ("alice", ["unhashable"]), ("", "bob")],
)
def test_unknown_account_rejected(payer: Any, payee: Any) -> None:
    ledger = make_ledger()
    result = run(ledger, Payment(ALICE_CLIENT, 1, payer, payee, 10))
    assert_rejected(result, Reason.UNKNOWN_ACCOUNT)
    assert ledger.balance("alice") == 100


def test_unknown_account_checked_before_unauthorized() -> None:
    ledger = make_ledger()
    # Bob's client does not own alice, but the payee is missing: that is reported first.
    assert_rejected(
        run(ledger, Payment(BOB_CLIENT, 1, "alice", "ghost", 10)), Reason.UNKNOWN_ACCOUNT
    )


def test_unauthorized_checked_before_insufficient_funds() -> None:
    ledger = make_ledger()
    assert_rejected(run(ledger, Payment(BOB_CLIENT, 1, "alice", "bob", 10)), Reason.UNAUTHORIZED)
    assert_rejected(run(ledger, Payment(BOB_CLIENT, 2, "alice", "bob", 1000)), Reason.UNAUTHORIZED)
    assert ledger.balance("alice") == 100


def test_insufficient_funds_rejected() -> None:
    ledger = make_ledger()
    assert_rejected(
        run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", 101)), Reason.INSUFFICIENT_FUNDS
    )
    assert ledger.balance("alice") == 100
    assert ledger.balance("bob") == 50


def test_insufficient_funds_checked_before_payee_overflow() -> None:
    ledger = Ledger({"poor": Account(1, 5), "rich": Account(2, MAX_AMOUNT)})
    assert_rejected(run(ledger, Payment(1, 1, "poor", "rich", 6)), Reason.INSUFFICIENT_FUNDS)


def test_payee_overflow_rejected_as_invalid_amount() -> None:
    ledger = Ledger({"payer": Account(1, 10), "full": Account(2, MAX_AMOUNT - 5)})
    assert_rejected(run(ledger, Payment(1, 1, "payer", "full", 6)), Reason.INVALID_AMOUNT)
    assert ledger.balance("full") == MAX_AMOUNT - 5
    confirmed = run(ledger, Payment(1, 2, "payer", "full", 5))
    assert confirmed.decision.outcome is Outcome.CONFIRMED
    assert ledger.balance("full") == MAX_AMOUNT


def test_rejections_are_stored_and_counted() -> None:
    ledger = make_ledger()
    result = run(ledger, Payment(BOB_CLIENT, 4, "alice", "bob", 10), seq=3)
    assert ledger.lookup(BOB_CLIENT, 4) == result.decision
    assert result.decision.seq == 3
    assert ledger.executed_count == 1


# -- deduplication -------------------------------------------------------------


def test_retransmission_returns_stored_decision_and_changes_nothing() -> None:
    ledger = make_ledger()
    payment = Payment(ALICE_CLIENT, 1, "alice", "bob", 30)
    first = run(ledger, payment, seq=1)
    before = ledger.snapshot()
    retry = run(ledger, payment, seq=9)
    assert retry == ExecutionResult(first.decision, fresh=False)
    assert retry.decision.seq == 1  # the batch that really executed it
    assert ledger.snapshot() == before
    assert ledger.balance("alice") == 70
    assert ledger.executed_count == 1


def test_id_reuse_with_different_body_rejected_and_original_decision_kept() -> None:
    ledger = make_ledger()
    original = run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", 30), seq=1)
    reused = Payment(ALICE_CLIENT, 1, "alice", "carol", 60)
    result = run(ledger, reused, seq=2)
    assert result == ExecutionResult(
        Decision(Outcome.REJECTED, Reason.ID_REUSED, 2, body_digest(reused)), fresh=True
    )
    assert ledger.lookup(ALICE_CLIENT, 1) == original.decision
    assert ledger.balance("alice") == 70
    assert ledger.balance("carol") == 0
    # Retrying the reused body keeps failing: the rejection was not stored.
    assert run(ledger, reused, seq=3).decision.reason is Reason.ID_REUSED


def test_same_request_id_from_different_clients_is_not_reuse() -> None:
    ledger = make_ledger()
    run(ledger, Payment(ALICE_CLIENT, 1, "alice", "carol", 10))
    result = run(ledger, Payment(BOB_CLIENT, 1, "bob", "carol", 10))
    assert result.decision.outcome is Outcome.CONFIRMED
    assert ledger.balance("carol") == 20


def test_retry_after_insufficient_funds_returns_insufficient_funds_after_payer_funded() -> None:
    ledger = make_ledger()
    payment = Payment(ALICE_CLIENT, 1, "alice", "carol", 120)
    first = run(ledger, payment, seq=1)
    assert_rejected(first, Reason.INSUFFICIENT_FUNDS)
    funded = run(ledger, Payment(BOB_CLIENT, 1, "bob", "alice", 50), seq=2)
    assert funded.decision.outcome is Outcome.CONFIRMED
    assert ledger.balance("alice") == 150
    retry = run(ledger, payment, seq=3)
    assert retry == ExecutionResult(first.decision, fresh=False)
    assert ledger.balance("alice") == 150
    assert ledger.balance("carol") == 0


# -- bounded memory: eviction and request_expired --------------------------------


def test_eviction_forgets_smallest_request_id_and_raises_floor() -> None:
    ledger = make_ledger(dedup_window=3)
    for request_id in (1, 2, 3):
        run(ledger, Payment(ALICE_CLIENT, request_id, "alice", "bob", 1))
    assert ledger.eviction_floor(ALICE_CLIENT) is None
    run(ledger, Payment(ALICE_CLIENT, 4, "alice", "bob", 1))
    assert ledger.lookup(ALICE_CLIENT, 1) is None
    assert [ledger.lookup(ALICE_CLIENT, request_id) is not None for request_id in (2, 3, 4)] == [
        True,
        True,
        True,
    ]
    assert ledger.eviction_floor(ALICE_CLIENT) == 1


def test_request_expired_for_evicted_id_is_not_stored_and_changes_nothing() -> None:
    ledger = make_ledger(dedup_window=2)
    first = Payment(ALICE_CLIENT, 1, "alice", "bob", 10)
    for payment in (first, Payment(ALICE_CLIENT, 2, "alice", "bob", 1)):
        run(ledger, payment)
    run(ledger, Payment(ALICE_CLIENT, 3, "alice", "bob", 1))
    balances = ledger.accounts()
    count = ledger.executed_count
    # A retransmission of an evicted request must not run twice.
    result = run(ledger, first, seq=8)
    assert_rejected(result, Reason.REQUEST_EXPIRED)
    assert result.decision.seq == 8
    assert ledger.lookup(ALICE_CLIENT, 1) is None
    assert ledger.accounts() == balances
    assert ledger.executed_count == count + 1
    # Any id at or below the floor is expired, even one never seen.
    assert_rejected(
        run(ledger, Payment(ALICE_CLIENT, 0, "alice", "bob", 1)), Reason.REQUEST_EXPIRED
    )


def test_request_below_retained_ids_but_above_floor_executes_then_is_evicted() -> None:
    ledger = make_ledger(dedup_window=2)
    run(ledger, Payment(ALICE_CLIENT, 5, "alice", "bob", 1))
    run(ledger, Payment(ALICE_CLIENT, 6, "alice", "bob", 1))
    late = Payment(ALICE_CLIENT, 3, "alice", "bob", 10)
    result = run(ledger, late)
    assert result.fresh
    assert result.decision.outcome is Outcome.CONFIRMED
    assert ledger.balance("alice") == 88
    # It is the smallest, so it is the one forgotten; a retry cannot run it again.
    assert ledger.eviction_floor(ALICE_CLIENT) == 3
    assert ledger.lookup(ALICE_CLIENT, 5) is not None
    assert_rejected(run(ledger, late), Reason.REQUEST_EXPIRED)
    assert ledger.balance("alice") == 88


def test_request_id_zero_is_deduplicated_not_expired() -> None:
    ledger = make_ledger(dedup_window=2)
    payment = Payment(ALICE_CLIENT, 0, "alice", "bob", 1)
    first = run(ledger, payment)
    run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", 1))
    assert run(ledger, payment) == ExecutionResult(first.decision, fresh=False)
    assert ledger.eviction_floor(ALICE_CLIENT) is None
    assert Ledger.restore(ledger.snapshot()).lookup(ALICE_CLIENT, 0) == first.decision


def test_eviction_is_per_client() -> None:
    ledger = make_ledger(dedup_window=1)
    run(ledger, Payment(ALICE_CLIENT, 1, "alice", "carol", 1))
    run(ledger, Payment(BOB_CLIENT, 1, "bob", "carol", 1))
    run(ledger, Payment(BOB_CLIENT, 2, "bob", "carol", 1))
    assert ledger.lookup(ALICE_CLIENT, 1) is not None
    assert ledger.lookup(BOB_CLIENT, 1) is None
    assert ledger.eviction_floor(ALICE_CLIENT) is None
    assert ledger.eviction_floor(BOB_CLIENT) == 1


# -- invariants and validation ---------------------------------------------------


def test_money_not_conserved_raises_invariant_error() -> None:
    ledger = make_ledger()
    ledger._total += 1  # simulate a bug that created money
    with pytest.raises(LedgerInvariantError):
        run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", 1))


def test_recount_total_sees_balances_not_the_tracked_total() -> None:
    ledger = make_ledger()
    ledger._balances["carol"] += 1
    assert ledger.recount_total() == ledger.total_balance() + 1


@pytest.mark.parametrize(
    "accounts",
    [
        {"": Account(1, 0)},
        {"x" * 65: Account(1, 0)},
        {7: Account(1, 0)},
        {"\ud800": Account(1, 0)},
        {"a": Account(1, -1)},
        {"a": Account(1, MAX_AMOUNT + 1)},
        {"a": Account(1, True)},
        {"a": Account(1, 1.0)},
        {"a": Account(-1, 0)},
        {"a": Account(True, 0)},
        {"a": (1, 0)},
        {"a": Account(1, MAX_AMOUNT), "b": Account(1, MAX_AMOUNT), "c": Account(1, 2)},
    ],
)
def test_constructor_rejects_invalid_accounts(accounts: Any) -> None:
    with pytest.raises(ValueError):
        Ledger(accounts)


@pytest.mark.parametrize("dedup_window", [0, -1, True, 2.0])
def test_constructor_rejects_invalid_dedup_window(dedup_window: Any) -> None:
    with pytest.raises(ValueError):
        Ledger({}, dedup_window=dedup_window)


def test_constructor_accepts_total_up_to_max_total() -> None:
    ledger = Ledger({"a": Account(1, MAX_AMOUNT), "b": Account(1, MAX_AMOUNT), "c": Account(1, 1)})
    assert ledger.initial_total == MAX_TOTAL
    assert Ledger.restore(ledger.snapshot()).initial_total == MAX_TOTAL


@pytest.mark.parametrize(
    ("client_id", "request_id", "digest", "seq"),
    [
        (-1, 1, b"\0" * 32, 1),
        (1, -1, b"\0" * 32, 1),
        (1, 2**64, b"\0" * 32, 1),
        (1, True, b"\0" * 32, 1),
        (1, 1, b"\0" * 31, 1),
        (1, 1, "0" * 32, 1),
        (1, 1, b"\0" * 32, -1),
    ],
)
def test_execute_rejects_malformed_identifiers_as_caller_bug(
    client_id: Any, request_id: Any, digest: Any, seq: Any
) -> None:
    ledger = make_ledger()
    before = ledger.snapshot()
    with pytest.raises(ValueError):
        ledger.execute(Payment(client_id, request_id, "alice", "bob", 1), digest, seq)
    assert ledger.snapshot() == before


def test_accounts_returns_sorted_copy() -> None:
    ledger = Ledger({"zed": Account(1, 1), "amy": Account(2, 2), "Bob": Account(3, 3)})
    accounts = ledger.accounts()
    assert list(accounts) == ["Bob", "amy", "zed"]
    accounts["amy"] = Account(2, 999)
    assert ledger.balance("amy") == 2
    assert ledger.balance("nobody") is None


# -- digest and snapshots ----------------------------------------------------------


def test_digest_equal_for_same_state_reached_in_different_insertion_orders() -> None:
    names = {"alice": Account(1, 100), "bob": Account(2, 50), "carol": Account(3, 0)}
    # Refundable payments take record slots in execution order: keep none, so that the
    # state of commuting payments is order-free.
    no_refunds = LedgerLimits(refund_window_ms=0)
    forward = Ledger(names, dedup_window=2, limits=no_refunds)
    backward = Ledger(dict(reversed(list(names.items()))), dedup_window=2, limits=no_refunds)
    payments = [
        Payment(1, 3, "alice", "carol", 10),
        Payment(2, 8, "bob", "carol", 5),
        Payment(1, 1, "alice", "bob", 1),
        Payment(2, 2, "bob", "alice", 500),  # rejected: insufficient funds
        Payment(1, 2, "alice", "carol", 2),
    ]
    # Commuting payments, all decided in one batch, applied in opposite orders.
    for payment in payments:
        run(forward, payment, seq=4)
    for payment in reversed(payments):
        run(backward, payment, seq=4)
    assert forward.snapshot() == backward.snapshot()
    assert forward.digest() == backward.digest()
    assert forward.snapshot() == backward.snapshot()


def _ledger_with_history() -> Ledger:
    ledger = make_ledger(dedup_window=2)
    run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", 10), seq=1)
    run(ledger, Payment(ALICE_CLIENT, 2, "alice", "bob", 500), seq=1)
    run(ledger, Payment(ALICE_CLIENT, 3, "alice", "carol", 5), seq=2)
    run(ledger, Payment(BOB_CLIENT, 1, "bob", "ghost", 5), seq=2)
    run(ledger, Payment(3, 1, "alice", "bob", 5), seq=3)
    return ledger


@pytest.mark.parametrize(
    "change",
    [
        lambda ledger: run(ledger, Payment(ALICE_CLIENT, 9, "alice", "bob", 1)),
        lambda ledger: run(ledger, Payment(ALICE_CLIENT, 9, "alice", "bob", 0)),
        lambda ledger: run(ledger, Payment(ALICE_CLIENT, 1, "alice", "bob", 3)),  # only counted
    ],
)
def test_digest_changes_when_state_changes(change: Callable[[Ledger], object]) -> None:
    ledger = _ledger_with_history()
    before = ledger.digest()
    change(ledger)
    assert ledger.digest() != before


def test_digest_covers_decision_seq() -> None:
    first, second = make_ledger(), make_ledger()
    payment = Payment(ALICE_CLIENT, 1, "alice", "bob", 1)
    run(first, payment, seq=1)
    run(second, payment, seq=2)
    assert first.accounts() == second.accounts()
    assert first.digest() != second.digest()


def test_snapshot_restore_round_trip_preserves_behaviour() -> None:
    ledger = _ledger_with_history()
    snapshot = ledger.snapshot()
    restored = Ledger.restore(snapshot)
    assert restored.snapshot() == snapshot
    assert restored.digest() == ledger.digest()
    assert restored.accounts() == ledger.accounts()
    assert restored.initial_total == ledger.initial_total
    assert restored.executed_count == ledger.executed_count
    assert restored.dedup_window == 2
    assert restored.eviction_floor(ALICE_CLIENT) == 1
    # Dedup, expiry and eviction continue exactly as in the original.
    follow_up = [
        Payment(ALICE_CLIENT, 3, "alice", "carol", 5),  # retransmission
        Payment(ALICE_CLIENT, 1, "alice", "bob", 10),  # expired
        Payment(ALICE_CLIENT, 2, "alice", "bob", 7),  # id reused
        Payment(ALICE_CLIENT, 4, "alice", "bob", 7),  # evicts 2
        Payment(BOB_CLIENT, 1, "bob", "ghost", 5),  # retransmission of a rejection
    ]
    for payment in follow_up:
        assert run(restored, payment, seq=10) == run(ledger, payment, seq=10)
    assert restored.digest() == ledger.digest()


def test_empty_ledger_round_trips() -> None:
    ledger = Ledger({})
    assert Ledger.restore(ledger.snapshot()).snapshot() == ledger.snapshot()


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_restore_rejects_arbitrary_bytes_only_with_snapshot_error(data: bytes) -> None:
    try:
        ledger = Ledger.restore(data)
    except LedgerSnapshotError:
        return
    assert ledger.snapshot() == data


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=7) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(msgpack_values)
def test_restore_rejects_structured_garbage_only_with_snapshot_error(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    try:
        ledger = Ledger.restore(data)
    except LedgerSnapshotError:
        return
    assert ledger.snapshot() == data


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_restore_of_corrupted_snapshot_raises_or_round_trips(data: st.DataObject) -> None:
    snapshot = bytearray(_ledger_with_history().snapshot())
    position = data.draw(st.integers(0, len(snapshot) - 1))
    snapshot[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(snapshot)))
    corrupted = bytes(snapshot[:cut])
    try:
        ledger = Ledger.restore(corrupted)
    except LedgerSnapshotError:
        return
    assert ledger.snapshot() == corrupted


def test_history_snapshot_has_the_shape_tamperings_expect() -> None:
    state = msgpack.unpackb(_ledger_with_history().snapshot(), raw=False)
    alice_client = state[6][0]
    assert alice_client[1] == 1  # eviction floor
    assert [decision[:3] for decision in alice_client[2]] == [
        [2, "rejected", "insufficient_funds"],
        [3, "confirmed", ""],
    ]
    assert state[6][1][2][0][1:3] == ["rejected", "unknown_account"]


def _set_balance(state: list[Any], index: int, balance: int) -> None:
    state[5][index][2] = balance


TAMPERINGS: dict[str, Callable[[list[Any]], None]] = {
    "negative balance (total kept)": lambda state: (
        _set_balance(state, 0, -1),
        _set_balance(state, 2, state[5][2][2] + state[5][0][2] + 1),
    ),
    "total mismatch": lambda state: _set_balance(state, 1, state[5][1][2] + 1),
    "initial total mismatch": lambda state: state.__setitem__(2, state[2] - 1),
    "balance above max": lambda state: _set_balance(state, 1, MAX_AMOUNT + 1),
    "bool balance": lambda state: _set_balance(state, 2, False),
    "unsorted accounts": lambda state: state[5].reverse(),
    "duplicate account": lambda state: state[5].insert(1, list(state[5][0])),
    "empty account name": lambda state: state[5][0].__setitem__(0, ""),
    "account entry too long": lambda state: state[5][0].append(0),
    "unsorted clients": lambda state: state[6].reverse(),
    "duplicate client": lambda state: state[6].append(list(state[6][-1])),
    "unsorted decisions": lambda state: state[6][0][2].reverse(),
    "retained id at floor": lambda state: state[6][0][2][0].__setitem__(0, state[6][0][1]),
    "floor without full window": lambda state: state[6][0][2].pop(),
    "more decisions than window": lambda state: state[6][0][2].append(
        [99, "confirmed", "", 1, b"\0" * 32]
    ),
    "client without decisions": lambda state: state[6].append([99, -1, []]),
    "floor below nothing evicted": lambda state: state[6][1].__setitem__(1, -2),
    "unknown outcome": lambda state: state[6][0][2][0].__setitem__(1, "maybe"),
    "confirmed with reason": lambda state: state[6][0][2][1].__setitem__(2, "unauthorized"),
    "rejected without reason": lambda state: state[6][1][2][0].__setitem__(2, ""),
    "stored id_reused": lambda state: state[6][1][2][0].__setitem__(2, "id_reused"),
    "short body digest": lambda state: state[6][0][2][0].__setitem__(4, b"\0" * 31),
    "str body digest": lambda state: state[6][0][2][0].__setitem__(4, "0" * 32),
    "negative seq": lambda state: state[6][0][2][0].__setitem__(3, -1),
    "executed count below retained": lambda state: state.__setitem__(3, 1),
    "zero dedup window": lambda state: state.__setitem__(1, 0),
    "unknown version": lambda state: state.__setitem__(0, 1),
    "genesis rule on listed accounts": lambda state: state.__setitem__(4, [3, 100, "", 0, [0]]),
    "extra top-level field": lambda state: state.append(0),
    "accounts as map": lambda state: state.__setitem__(5, {"alice": [1, 85]}),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_restore_rejects_tampered_snapshot(name: str) -> None:
    snapshot = _ledger_with_history().snapshot()
    tampered = tamper(snapshot, TAMPERINGS[name])
    assert tampered != snapshot
    with pytest.raises(LedgerSnapshotError) as raised:
        Ledger.restore(tampered)
    # The encoding is canonical, so an explicit semantic check must catch it, not
    # only the final re-encoding comparison.
    assert "canonical" not in str(raised.value)


def test_restore_rejects_non_canonical_int_encoding() -> None:
    snapshot = make_ledger(dedup_window=2).snapshot()
    assert snapshot[2:3] == b"\x02"  # dedup_window as a positive fixint
    wide = snapshot[:2] + b"\xcf" + (2).to_bytes(8, "big") + snapshot[3:]
    assert msgpack.unpackb(wide) == msgpack.unpackb(snapshot)
    with pytest.raises(LedgerSnapshotError):
        Ledger.restore(wide)


@pytest.mark.parametrize("suffix", [b"\x00", b"\xc0", b"\x90"])
def test_restore_rejects_trailing_bytes(suffix: bytes) -> None:
    with pytest.raises(LedgerSnapshotError):
        Ledger.restore(make_ledger().snapshot() + suffix)


@pytest.mark.parametrize("value", [None, "snapshot", 12, [1, 2]])
def test_restore_rejects_non_bytes(value: Any) -> None:
    with pytest.raises(LedgerSnapshotError):
        Ledger.restore(value)


def test_restore_rejects_deep_nesting() -> None:
    with pytest.raises(LedgerSnapshotError):
        Ledger.restore(b"\x91" * 100_000)


# -- determinism ------------------------------------------------------------------

_CROSS_PROCESS_SCRIPT = """
import hashlib
from pbft.holds import LedgerLimits
from pbft.ledger import Account, Ledger, Payment
names = {f"account-{index}" for index in range(40)}
owner = {name: int(name.split("-")[1]) for name in sorted(names)}
# Set iteration order depends on PYTHONHASHSEED; the ledger must not. (Refundable payments
# take record slots in execution order, so this order-free comparison keeps none.)
accounts = {name: Account(owner=owner[name], balance=1000) for name in names}
ledger = Ledger(accounts, limits=LedgerLimits(refund_window_ms=0))
for name in names:
    payment = Payment(owner[name], 1, name, "account-0", 7)
    ledger.execute(payment, hashlib.sha256(name.encode()).digest(), 1)
print(ledger.digest().hex())
"""


def test_digest_is_identical_across_processes_with_different_hash_seeds() -> None:
    digests = []
    for hash_seed in ("1", "2", "987654"):
        environment = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPOSITORY_ROOT))
        completed = subprocess.run(
            [sys.executable, "-c", _CROSS_PROCESS_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            env=environment,
            cwd=REPOSITORY_ROOT,
        )
        digests.append(completed.stdout.strip())
    assert len(digests[0]) == 64
    assert digests[0] == digests[1] == digests[2]


def test_ledger_module_is_sans_io() -> None:
    allowed = {"__future__", "collections", "dataclasses", "enum", "hashlib", "heapq", "typing"}
    allowed |= {"msgpack", "collections.abc", "crypto.merkle", "array", "bisect"}
    allowed |= {"pbft.operations", "pbft.holds", "pbft.ledger_ops"}
    source = (REPOSITORY_ROOT / "pbft" / "ledger.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module)
        assert not (isinstance(node, ast.Constant) and isinstance(node.value, float))
    assert imported <= allowed, sorted(imported - allowed)


# -- property: random payment streams -----------------------------------------------

CLIENTS = [1, 2, 3, 4]
ACCOUNT_NAMES = ["a", "b", "c", "d", "ghost"]
amounts = st.one_of(
    st.integers(min_value=-5, max_value=300),
    st.sampled_from([0, -1, MAX_AMOUNT, MAX_AMOUNT + 1, -(2**70), 2**70]),
    st.integers(min_value=-(2**65), max_value=2**65),
)
payments = st.builds(
    Payment,
    client_id=st.sampled_from(CLIENTS),
    request_id=st.integers(min_value=0, max_value=10),
    payer=st.sampled_from(ACCOUNT_NAMES),
    payee=st.sampled_from(ACCOUNT_NAMES),
    amount=amounts,
)


@settings(max_examples=200, deadline=None)
@given(
    balances=st.lists(st.integers(0, 500), min_size=3, max_size=3),
    big_balance=st.integers(MAX_AMOUNT - 1000, MAX_AMOUNT),
    dedup_window=st.integers(1, 4),
    stream=st.lists(payments, max_size=60),
    restore_at=st.integers(0, 60),
)
def test_random_payments_conserve_total_and_replicas_agree(
    balances: list[int],
    big_balance: int,
    dedup_window: int,
    stream: list[Payment],
    restore_at: int,
) -> None:
    accounts = {
        "a": Account(owner=1, balance=balances[0]),
        "b": Account(owner=2, balance=balances[1]),
        "c": Account(owner=3, balance=balances[2]),
        "d": Account(owner=1, balance=big_balance),  # near the top, to reach payee overflow
    }
    replica = Ledger(accounts, dedup_window=dedup_window)
    twin = Ledger(dict(reversed(list(accounts.items()))), dedup_window=dedup_window)
    restored: Ledger | None = None
    # Every decision ever stored; a retained decision must always be the first one.
    first_decisions: dict[tuple[int, int], Decision] = {}
    for index, payment in enumerate(stream):
        if index == restore_at:
            restored = Ledger.restore(replica.snapshot())
        seq = index // 3 + 1
        digest = body_digest(payment)
        before = replica.snapshot()
        result = replica.execute(payment, digest, seq)
        assert twin.execute(payment, digest, seq) == result
        if restored is not None:
            assert restored.execute(payment, digest, seq) == result

        key = (payment.client_id, payment.request_id)
        if not result.fresh:
            assert replica.snapshot() == before
            assert result.decision == first_decisions[key]
        elif result.decision.reason not in (Reason.ID_REUSED, Reason.REQUEST_EXPIRED):
            assert key not in first_decisions  # a request never executes twice
            first_decisions[key] = result.decision
        else:
            assert replica.accounts() == Ledger.restore(before).accounts()
        retained = replica.lookup(*key)
        assert retained is None or retained == first_decisions[key]

        assert replica.recount_total() == replica.total_balance() == replica.initial_total
        assert all(0 <= account.balance <= MAX_AMOUNT for account in replica.accounts().values())

    assert replica.digest() == twin.digest()
    if restored is not None:
        assert restored.digest() == replica.digest()
    assert Ledger.restore(replica.snapshot()).digest() == replica.digest()


def test_account_proof_proves_a_balance_against_the_state_digest() -> None:
    """Checkpoints sign the ledger digest, a Merkle root: one account's leaf proves its
    balance against it without the rest of the state."""
    from crypto.merkle import verify_inclusion

    ledger = Ledger({"a": Account(0, 10), "b": Account(1, 5), "c": Account(1, 0)})
    ledger.execute(Payment(0, 1, "a", "c", 4), b"\x01" * 32, 1)
    digest = ledger.digest()
    proven = ledger.account_proof("c")
    assert proven is not None
    leaf, proof = proven
    assert verify_inclusion(digest, leaf, proof)
    assert msgpack.unpackb(leaf) == ["account", "c", 1, 4, 0]
    other = ledger.account_proof("b")
    assert other is not None
    assert not verify_inclusion(digest, other[0], proof)
    assert ledger.account_proof("missing") is None
    ledger.execute(Payment(0, 2, "a", "c", 1), b"\x02" * 32, 2)
    assert not verify_inclusion(ledger.digest(), leaf, proof)


# -- the incremental digest and a generated genesis ------------------------------------------------

_RULE = GeneratedAccounts(50, 100, "acct-", [0, 1, 2, 3, 4, 5], min_width=5)


@settings(max_examples=40, deadline=None)
@given(
    generated=st.booleans(),
    payments=st.lists(
        st.tuples(st.integers(0, 49), st.integers(0, 49), st.integers(1, 150)), max_size=30
    ),
    digest_every=st.integers(1, 5),
)
def test_the_incremental_digest_is_the_root_over_every_leaf(
    generated: bool, payments: list[tuple[int, int, int]], digest_every: int
) -> None:
    """Clients appear in any id order (a new one lands among the others), balances return
    to the rule's, decisions are evicted: the kept tree always has the from-scratch root."""
    ledger = Ledger(_RULE if generated else dict(_RULE), dedup_window=3)
    for index, (payer, payee, amount) in enumerate(payments):
        payment = Payment(payer % 6, index, _RULE.name(payer), _RULE.name(payee), amount)
        run(ledger, payment, seq=index + 1)
        if index % digest_every == 0:
            assert ledger.digest() == merkle_root(ledger._leaves())
    digest = ledger.digest()
    assert digest == merkle_root(ledger._leaves())
    assert ledger.recount_total() == ledger.total_balance() == 5000
    restored = Ledger.restore(ledger.snapshot())
    assert restored.digest() == digest and restored.accounts() == ledger.accounts()
    for name in (_RULE.name(0), _RULE.name(49)):
        proven = ledger.account_proof(name)
        assert proven is not None and verify_inclusion(digest, *proven)
    assert ledger.min_balance() == min(account.balance for account in ledger.accounts().values())


def test_a_generated_snapshot_holds_the_rule_and_the_changed_accounts_only() -> None:
    sizes = []
    for count in (100, 1_000_000):
        rule = GeneratedAccounts(count, 1000, "acct-", [0, 1], min_width=7)
        ledger = Ledger(rule)  # no per-account work: nothing is built until a digest
        run(ledger, Payment(0, 1, rule.name(0), rule.name(count - 1), 5))
        snapshot = ledger.snapshot()
        assert Ledger.restore(snapshot).balance(rule.name(count - 1)) == 1005
        assert Ledger.restore(snapshot).balance(rule.name(1)) == 1000
        sizes.append(len(snapshot))
    assert sizes[1] - sizes[0] <= 8  # the count's encoding, not a million accounts


def _generated_history() -> Ledger:
    ledger = Ledger(_RULE, dedup_window=2)
    run(ledger, Payment(0, 1, _RULE.name(0), _RULE.name(1), 10))
    run(ledger, Payment(2, 1, _RULE.name(2), _RULE.name(3), 7))
    return ledger


GENERATED_TAMPERINGS: dict[str, Callable[[list[Any]], None]] = {
    "owner not the rule's": lambda state: state[5][0].__setitem__(1, 5),
    "a changed account left out": lambda state: state[5].pop(0),
    "the rule's balance stored": lambda state: state[5].append(["acct-00049", 1, 100]),
    "account outside the rule": lambda state: state[5][0].__setitem__(0, "acct-00077"),
    "money created": lambda state: state[5][0].__setitem__(2, state[5][0][2] + 1),
    "rule with no accounts": lambda state: state[4].__setitem__(0, 0),
    "rule without owners": lambda state: state[4].__setitem__(4, []),
    "rule owners not ints": lambda state: state[4].__setitem__(4, ["x"]),
    "rule too short": lambda state: state[4].pop(),
}


@pytest.mark.parametrize("name", list(GENERATED_TAMPERINGS))
def test_restore_rejects_a_tampered_generated_snapshot(name: str) -> None:
    snapshot = _generated_history().snapshot()
    assert Ledger.restore(snapshot).digest() == _generated_history().digest()
    tampered = tamper(snapshot, GENERATED_TAMPERINGS[name])
    assert tampered != snapshot
    with pytest.raises(LedgerSnapshotError) as raised:
        Ledger.restore(tampered)
    assert "canonical" not in str(raised.value)


@pytest.mark.parametrize(
    ("prefix", "owners", "min_width"), [("acct-", [7], 0), ("ü-", [0, 1, 2], 4), ("", [3, 1], 9)]
)
def test_the_shared_genesis_tree_is_the_tree_of_the_generated_leaves(
    prefix: str, owners: list[int], min_width: int
) -> None:
    rule = GeneratedAccounts(37, 12, prefix, owners, min_width)
    ledger = Ledger(rule, dedup_window=5)
    assert ledger.digest() == merkle_root(ledger._leaves())
    assert ledger._leaves()[1:] == [
        msgpack.packb(["account", name, account.owner, 12, 0]) for name, account in rule.items()
    ]
