"""Issue 11's operations: the request's wire fields, the ops through the replicas, and the
Executed records observers read."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replica_harness import Cluster, Network

from crypto.merkle import merkle_root, verify_inclusion
from pbft.client import ClientError
from pbft.codec import DecodeError, pack
from pbft.config import ClusterConfig, ConfigError
from pbft.events import Note
from pbft.holds import HoldState, LedgerLimits
from pbft.ledger import (
    Account,
    ExecutionResult,
    Ledger,
    LedgerInvariantError,
    LedgerSnapshotError,
    Outcome,
    Payment,
    Reason,
)
from pbft.ledger_leaves import LedgerBuilder
from pbft.messages import MessageType, Request
from pbft.operations import OP_CODES, Operation, Posting, Release
from pbft.signed import _DOMAINS, PROTOCOL_VERSION, Envelope

# --- the wire ------------------------------------------------------------------------------


def test_every_op_code_round_trips_and_an_unknown_one_is_malformed() -> None:
    for code in OP_CODES:
        request = Request(7, 1, code, "a", "b", 2, 3, 4, 5)
        assert Request.decode(request.encode()) == request
    with pytest.raises(DecodeError) as caught:
        Request(7, 1, "mint", "a", "b", 2)
    assert caught.value.reason == "out_of_range"


def test_a_request_with_an_unknown_op_is_dropped_and_counted_by_the_replica() -> None:
    cluster = Cluster()
    replica = cluster.replica(0)
    # Bytes a peer could send: signed by the client, op "mint". (Built by hand: seal would
    # refuse such a Request, and caches what it seals for receivers in this process.)
    body = pack([0, 1, "mint", "alice", "carol", 5, 0, 0, 0])
    signature = cluster.client_keys[0].sign(_DOMAINS[MessageType.REQUEST], body)
    raw = pack([PROTOCOL_VERSION, int(MessageType.REQUEST), 0, body, signature])
    actions = Cluster.deliver(replica, raw)
    assert [(note.kind, note.reason) for note in actions if isinstance(note, Note)] == [
        ("drop", "malformed_out_of_range")
    ]
    assert not [action for action in actions if not isinstance(action, Note)]
    assert replica.drops == {"malformed_out_of_range": 1}
    assert not replica.requests.pending


# --- the client ----------------------------------------------------------------------------


def test_the_client_builds_each_op_with_exactly_its_fields() -> None:
    client = Cluster().client(0)
    operations = {
        "transfer": Operation.transfer("alice", "carol", 5),
        "authorize": Operation.authorize("alice", "carol", 5, 1000),
        "capture": Operation.capture((0, 1), 5),
        "void": Operation.void((0, 1)),
        "refund": Operation.refund((0, 1), 5),
        "open_account": Operation.open_account("shop"),
    }
    for request_id, (code, operation) in enumerate(operations.items(), start=1):
        (send,) = client.submit_operation(request_id, operation)
        request = Request.decode(_body(send.data))
        assert request.op == code
        assert request.operation() == operation


def test_the_client_refuses_what_cannot_go_on_the_wire() -> None:
    client = Cluster().client(0)
    with pytest.raises(ClientError, match="unknown operation"):
        client.submit_operation(1, Operation("mint", "alice", "carol", 5))
    with pytest.raises(ClientError, match="payee account"):
        client.submit_operation(1, Operation.authorize("alice", "", 5, 1000))
    with pytest.raises(ClientError, match="referenced client id"):
        client.submit_operation(1, Operation.void((2**32, 1)))
    with pytest.raises(ClientError, match="payer account"):
        client.submit_operation(1, Operation.open_account("x" * 65))


# --- through the replicas ------------------------------------------------------------------


def test_executed_records_carry_the_op_its_postings_and_the_batch() -> None:
    network = Network(Cluster())
    network.submit(0, 1, "alice", "carol", 10)
    network.run()
    (decided,) = network.decided
    assert (decided.outcome, decided.reason) == ("confirmed", "")
    for replica, batches in network.executed.items():
        (batch,) = batches
        assert batch.primary == 0 and batch.released == ()
        assert len(batch.batch_digest) == 32, replica
        (record,) = batch.requests
        assert (record.op, record.ref_client, record.ref_request, record.expires_in_ms) == (
            "transfer",
            0,
            0,
            0,
        )
        assert record.postings == (Posting("alice", -10, 0), Posting("carol", 10, 0))


def test_a_field_the_op_does_not_use_is_rejected_as_invalid_request() -> None:
    network = Network(Cluster())
    bad = Operation("transfer", "alice", "carol", 10, ref_client=0, ref_request=3)
    network._client_actions(network.clients[0].submit_operation(1, bad))
    network.run()
    (decided,) = network.decided
    assert (decided.outcome, decided.reason) == ("rejected", "invalid_request")
    for batches in network.executed.values():
        assert batches[0].requests[0].postings == ()


def _body(raw: bytes) -> bytes:
    return Envelope.decode(raw).body


# --- the ledger's operations -----------------------------------------------------------------

SHOP, ALICE, BOB = 1, 2, 3  # client ids
LIMITS = LedgerLimits(
    max_hold_duration_ms=1000,
    max_holds_per_client=2,
    max_accounts_per_client=2,
    closed_hold_retention_ms=500,
    refund_window_ms=2000,
)


def _ledger(limits: LedgerLimits = LIMITS) -> Ledger:
    accounts = {
        "alice": Account(ALICE, 100),
        "bob": Account(BOB, 50),
        "shop": Account(SHOP, 0),
    }
    return Ledger(accounts, dedup_window=64, limits=limits)


class _Driver:
    """Executes operations one batch at a time, at a given batch time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.seq = 0
        self.released: list[Release] = []

    def at(self, now_ms: int) -> None:
        self.seq += 1
        self.released += self.ledger.begin_batch(self.seq, now_ms)

    def run(self, client: int, request_id: int, operation: Operation) -> ExecutionResult:
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
        return result

    def reason(self, client: int, request_id: int, operation: Operation) -> str:
        return self.run(client, request_id, operation).decision.reason.value


def _driver(limits: LedgerLimits = LIMITS) -> _Driver:
    driver = _Driver(_ledger(limits))
    driver.at(100)
    return driver


def _balances(ledger: Ledger, name: str) -> tuple[int | None, int | None]:
    return ledger.balance(name), ledger.held(name)


def test_authorize_holds_and_capture_posts_and_releases_the_rest() -> None:
    driver = _driver()
    authorized = driver.run(ALICE, 1, Operation.authorize("alice", "shop", 30, 1000))
    assert authorized.decision.outcome is Outcome.CONFIRMED
    assert authorized.postings == (Posting("alice", -30, 30),)
    assert _balances(driver.ledger, "alice") == (70, 30)
    captured = driver.run(SHOP, 1, Operation.capture((ALICE, 1), 20))
    assert captured.decision.outcome is Outcome.CONFIRMED
    assert captured.postings == (Posting("alice", 10, -30), Posting("shop", 20, 0))
    assert _balances(driver.ledger, "alice") == (80, 0)
    assert _balances(driver.ledger, "shop") == (20, 0)
    assert driver.ledger.records.holds[(ALICE, 1)].state is HoldState.CAPTURED


def test_capture_and_void_happen_at_most_once() -> None:
    driver = _driver()
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 30, 1000))
    driver.run(ALICE, 2, Operation.authorize("alice", "shop", 10, 1000))
    assert driver.reason(SHOP, 1, Operation.capture((ALICE, 1), 30)) == ""
    assert driver.reason(SHOP, 2, Operation.capture((ALICE, 1), 1)) == "hold_already_captured"
    assert driver.reason(ALICE, 3, Operation.void((ALICE, 1))) == "hold_already_captured"
    assert driver.reason(ALICE, 4, Operation.void((ALICE, 2))) == ""
    assert driver.reason(SHOP, 3, Operation.void((ALICE, 2))) == "hold_already_voided"
    assert driver.reason(SHOP, 4, Operation.capture((ALICE, 2), 1)) == "hold_already_voided"
    assert _balances(driver.ledger, "alice") == (70, 0)
    assert _balances(driver.ledger, "shop") == (30, 0)


def test_either_party_may_void_and_nobody_else() -> None:
    driver = _driver()
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 5, 1000))
    driver.run(ALICE, 2, Operation.authorize("alice", "shop", 5, 1000))
    # To a stranger the hold is absent (no probing of other clients' request ids).
    assert driver.reason(BOB, 1, Operation.void((ALICE, 1))) == "hold_not_found"
    assert driver.reason(SHOP, 2, Operation.void((ALICE, 1))) == ""
    assert driver.reason(ALICE, 3, Operation.void((ALICE, 2))) == ""
    assert _balances(driver.ledger, "alice") == (100, 0)


def test_expiry_is_decided_at_the_batch_time_in_a_fixed_order() -> None:
    driver = _driver()
    driver.run(ALICE, 2, Operation.authorize("alice", "shop", 7, 500))  # expires at 600
    driver.run(ALICE, 1, Operation.authorize("alice", "bob", 5, 500))  # expires at 600
    driver.run(BOB, 1, Operation.authorize("bob", "shop", 3, 200))  # expires at 300
    driver.at(299)
    assert driver.released == []
    driver.at(600)
    # (expires_at, hold id) order: bob's first, then alice's holds by request id.
    assert driver.released == [
        Release(BOB, 1, "bob", 3),
        Release(ALICE, 1, "alice", 5),
        Release(ALICE, 2, "alice", 7),
    ]
    assert _balances(driver.ledger, "alice") == (100, 0)
    assert driver.reason(SHOP, 1, Operation.capture((ALICE, 2), 1)) == "hold_expired"
    assert driver.reason(ALICE, 3, Operation.void((ALICE, 1))) == "hold_expired"


def test_batch_time_never_goes_backwards() -> None:
    driver = _driver()
    driver.at(1000)
    driver.at(10)  # a proposal from the past: execution stays at 1000
    assert driver.ledger.batch_time_ms == 1000
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 7, 100))
    assert driver.ledger.records.holds[(ALICE, 1)].expires_at == 1100


def test_a_closed_hold_is_remembered_for_its_retention_then_not_found() -> None:
    driver = _driver()
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 7, 1000))
    driver.run(ALICE, 2, Operation.void((ALICE, 1)))  # closed at 100, kept until 600
    driver.at(599)
    assert driver.reason(SHOP, 1, Operation.capture((ALICE, 1), 1)) == "hold_already_voided"
    driver.at(600)
    assert driver.reason(SHOP, 2, Operation.capture((ALICE, 1), 1)) == "hold_not_found"
    assert len(driver.ledger.records.holds) == 0


def test_refunds_never_exceed_the_payment_and_end_with_the_window() -> None:
    driver = _driver()
    assert driver.reason(ALICE, 1, Operation.transfer("alice", "shop", 40)) == ""
    refund = driver.run(SHOP, 1, Operation.refund((ALICE, 1), 25))
    assert refund.postings == (Posting("shop", -25, 0), Posting("alice", 25, 0))
    assert driver.reason(SHOP, 2, Operation.refund((ALICE, 1), 16)) == "exceeds_refundable"
    assert driver.reason(ALICE, 2, Operation.refund((ALICE, 1), 1)) == "unauthorized"
    assert driver.reason(SHOP, 3, Operation.refund((ALICE, 1), 15)) == ""
    assert driver.reason(SHOP, 4, Operation.refund((ALICE, 1), 1)) == "exceeds_refundable"
    assert _balances(driver.ledger, "alice") == (100, 0)
    # A capture is refundable under its hold's id; the window runs from the capture.
    driver.run(ALICE, 3, Operation.authorize("alice", "shop", 30, 1000))
    driver.run(SHOP, 5, Operation.capture((ALICE, 3), 30))
    assert driver.reason(SHOP, 6, Operation.refund((ALICE, 3), 10)) == ""
    driver.at(100 + 2000)
    assert driver.reason(SHOP, 7, Operation.refund((ALICE, 3), 10)) == "payment_not_found"


def test_a_stranger_cannot_tell_a_hold_or_payment_of_others_from_an_absent_one() -> None:
    driver = _driver()
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 5, 1000))
    driver.run(ALICE, 2, Operation.transfer("alice", "shop", 5))
    driver.run(ALICE, 3, Operation.authorize("alice", "shop", 5, 1000))
    driver.run(ALICE, 4, Operation.void((ALICE, 3)))  # a closed hold: its fate is not told
    stranger = {
        "capture": [driver.reason(BOB, r, Operation.capture((ALICE, h), 1)) for r, h in
                    ((1, 1), (2, 3), (3, 99))],
        "void": [driver.reason(BOB, r, Operation.void((ALICE, h))) for r, h in
                 ((4, 1), (5, 3), (6, 99))],
        "refund": [driver.reason(BOB, r, Operation.refund((ALICE, p), 1)) for r, p in
                   ((7, 2), (8, 99))],
    }  # fmt: skip
    assert stranger == {
        "capture": ["hold_not_found"] * 3,
        "void": ["hold_not_found"] * 3,
        "refund": ["payment_not_found"] * 2,
    }
    # A party without the right is told so: the payer may neither capture nor refund.
    assert driver.reason(ALICE, 5, Operation.capture((ALICE, 1), 1)) == "unauthorized"
    assert driver.reason(ALICE, 6, Operation.refund((ALICE, 2), 1)) == "unauthorized"
    assert _balances(driver.ledger, "alice") == (90, 5)


def test_a_refund_needs_the_payee_to_have_the_money() -> None:
    driver = _driver()
    driver.run(ALICE, 1, Operation.transfer("alice", "shop", 40))
    driver.run(SHOP, 1, Operation.transfer("shop", "bob", 30))
    assert driver.reason(SHOP, 2, Operation.refund((ALICE, 1), 20)) == "insufficient_funds"


def test_open_account_makes_an_owned_empty_account() -> None:
    driver = _driver()
    opened = driver.run(BOB, 1, Operation.open_account("bob-savings"))
    assert opened.decision.outcome is Outcome.CONFIRMED
    assert _balances(driver.ledger, "bob-savings") == (0, 0)
    assert driver.reason(BOB, 2, Operation.transfer("bob", "bob-savings", 20)) == ""
    assert driver.reason(BOB, 3, Operation.transfer("bob-savings", "alice", 5)) == ""
    assert driver.reason(ALICE, 1, Operation.transfer("bob-savings", "alice", 5)) == (
        "unauthorized"
    )
    assert driver.reason(BOB, 4, Operation.authorize("bob-savings", "shop", 5, 100)) == ""
    assert _balances(driver.ledger, "bob-savings") == (10, 5)


def test_each_refusal_reason_of_the_new_operations() -> None:
    driver = _driver()
    reasons = {
        "invalid_request": driver.reason(ALICE, 1, Operation("capture", "alice", "", 1, ALICE, 9)),
        "invalid_expiry": driver.reason(ALICE, 2, Operation.authorize("alice", "shop", 1, 0)),
        "invalid_account_name": driver.reason(BOB, 1, Operation.open_account("")),
        "account_exists": driver.reason(BOB, 2, Operation.open_account("alice")),
        "hold_not_found": driver.reason(SHOP, 1, Operation.capture((ALICE, 99), 1)),
        "payment_not_found": driver.reason(SHOP, 2, Operation.refund((ALICE, 99), 1)),
    }
    long_expiry = Operation.authorize("alice", "shop", 1, LIMITS.max_hold_duration_ms + 1)
    reasons["invalid_expiry (too long)"] = driver.reason(ALICE, 3, long_expiry)
    driver.run(ALICE, 4, Operation.authorize("alice", "shop", 10, 1000))
    driver.run(ALICE, 5, Operation.authorize("alice", "shop", 10, 1000))
    reasons["too_many_holds"] = driver.reason(ALICE, 6, Operation.authorize("alice", "shop", 1, 9))
    reasons["exceeds_hold"] = driver.reason(SHOP, 3, Operation.capture((ALICE, 4), 11))
    reasons["unauthorized (capture)"] = driver.reason(ALICE, 7, Operation.capture((ALICE, 4), 1))
    driver.run(BOB, 3, Operation.open_account("b1"))
    driver.run(BOB, 4, Operation.open_account("b2"))
    reasons["too_many_accounts"] = driver.reason(BOB, 5, Operation.open_account("b3"))
    driver.run(ALICE, 8, Operation.transfer("alice", "shop", 5))
    reasons["exceeds_refundable"] = driver.reason(SHOP, 4, Operation.refund((ALICE, 8), 6))
    assert reasons == {
        "invalid_request": "invalid_request",
        "invalid_expiry": "invalid_expiry",
        "invalid_account_name": "invalid_account_name",
        "account_exists": "account_exists",
        "hold_not_found": "hold_not_found",
        "payment_not_found": "payment_not_found",
        "invalid_expiry (too long)": "invalid_expiry",
        "too_many_holds": "too_many_holds",
        "exceeds_hold": "exceeds_hold",
        "unauthorized (capture)": "unauthorized",
        "too_many_accounts": "too_many_accounts",
        "exceeds_refundable": "exceeds_refundable",
    }
    # The rejected ones changed nothing: alice has 20 held, 5 paid.
    assert _balances(driver.ledger, "alice") == (75, 20)


def test_every_reason_code_is_answerable_on_the_wire() -> None:
    codes = [reason.value for reason in Reason]
    assert codes[codes.index("insufficient_funds") + 1 :] == [
        "invalid_request",
        "invalid_expiry",
        "invalid_account_name",
        "account_exists",
        "too_many_accounts",
        "hold_not_found",
        "hold_already_captured",
        "hold_already_voided",
        "hold_expired",
        "exceeds_hold",
        "too_many_holds",
        "payment_not_found",
        "exceeds_refundable",
    ]


# --- snapshots, digests, proofs ----------------------------------------------------------------


def _mixed(driver: _Driver) -> None:
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 30, 1000))
    driver.run(ALICE, 2, Operation.authorize("alice", "bob", 5, 300))
    driver.run(SHOP, 1, Operation.capture((ALICE, 1), 20))
    driver.run(BOB, 1, Operation.open_account("bob-2"))
    driver.run(BOB, 2, Operation.transfer("bob", "bob-2", 9))
    driver.run(SHOP, 2, Operation.refund((ALICE, 1), 5))
    driver.run(ALICE, 3, Operation.authorize("alice", "bob-2", 4, 900))


def test_a_snapshot_with_holds_restores_to_the_same_ledger() -> None:
    driver = _driver()
    _mixed(driver)
    snapshot = driver.ledger.snapshot()
    restored = Ledger.restore(snapshot)
    assert restored.snapshot() == snapshot
    assert restored.digest() == driver.ledger.digest()
    # ... and behaves the same from there on: the expiry heap came back too.
    twin = _Driver(restored)
    twin.seq = driver.seq
    for each in (driver, twin):
        each.at(400)
    assert driver.released == [Release(ALICE, 2, "alice", 5)]
    assert twin.released == driver.released
    assert restored.digest() == driver.ledger.digest()


def test_restore_rejects_records_that_do_not_add_up() -> None:
    driver = _driver()
    _mixed(driver)
    state = msgpack.unpackb(driver.ledger.snapshot())
    for index, row in enumerate(state[10]):
        if row[1] == "hold" and row[8] == "open":
            state[10][index][6] += 1  # more held than the account holds
            break
    with pytest.raises(LedgerSnapshotError):
        Ledger.restore(msgpack.packb(state))
    state = msgpack.unpackb(driver.ledger.snapshot())
    state[9] -= 1  # a record beyond the slot count
    with pytest.raises(LedgerSnapshotError):
        Ledger.restore(msgpack.packb(state))


def test_state_transfer_rebuilds_holds_from_the_leaves() -> None:
    driver = _driver()
    _mixed(driver)
    builder = LedgerBuilder()
    for leaf in driver.ledger.leaves(0, driver.ledger.leaf_count()):
        builder.add(leaf)
    rebuilt = builder.finish()
    assert rebuilt.snapshot() == driver.ledger.snapshot()


def test_an_opened_account_has_a_balance_proof() -> None:
    driver = _driver()
    _mixed(driver)
    digest = driver.ledger.digest()
    proven = driver.ledger.account_proof("bob-2")
    assert proven is not None
    leaf, proof = proven
    assert verify_inclusion(digest, leaf, proof)
    assert msgpack.unpackb(leaf) == ["opened", "bob-2", BOB, 9, 0]
    held = driver.ledger.account_proof("alice")
    assert held is not None and msgpack.unpackb(held[0]) == ["account", "alice", ALICE, 76, 9]


_OPS = st.sampled_from(["transfer", "authorize", "capture", "void", "refund", "open", "time"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_OPS, st.integers(0, 3), st.integers(1, 60)), max_size=40))
def test_the_incremental_digest_equals_a_rebuild_after_mixed_operations(
    steps: list[tuple[str, int, int]],
) -> None:
    """Differential: after any mix of operations, the incrementally updated digest is the
    Merkle root of all leaves computed afresh, and the snapshot restores to it."""
    driver = _driver()
    names = ["alice", "bob", "shop"]
    owners = {"alice": ALICE, "bob": BOB, "shop": SHOP}
    holds: list[tuple[int, int]] = []
    now = 100
    for request_id, (kind, pick, amount) in enumerate(steps, start=1):
        payer, payee = names[pick % 3], names[(pick + 1) % 3]
        client = owners[payer]
        if kind == "transfer":
            driver.run(client, request_id, Operation.transfer(payer, payee, amount))
        elif kind == "authorize":
            driver.run(client, request_id, Operation.authorize(payer, payee, amount, 10 * amount))
            holds.append((client, request_id))
        elif kind in ("capture", "void", "refund") and holds:
            ref = holds[pick % len(holds)]
            operation = {
                "capture": Operation.capture(ref, amount),
                "void": Operation.void(ref),
                "refund": Operation.refund(ref, amount),
            }[kind]
            driver.run(pick % 4, request_id, operation)
        elif kind == "open":
            driver.run(pick, request_id, Operation.open_account(f"acct-{amount}"))
        elif kind == "time":
            now += 7 * amount
            driver.at(now)
        if request_id % 5 == 0:
            assert driver.ledger.digest() == merkle_root(driver.ledger._leaves())
    ledger = driver.ledger
    assert ledger.digest() == merkle_root(ledger._leaves())
    assert Ledger.restore(ledger.snapshot()).digest() == ledger.digest()
    assert ledger.total_balance() == ledger.recount_total() == ledger.initial_total


def test_money_is_conserved_over_available_and_held_or_the_ledger_stops() -> None:
    driver = _driver()
    _mixed(driver)
    ledger = driver.ledger
    assert ledger.total_balance() == ledger.recount_total() == ledger.initial_total == 150
    assert sum(hold.amount for hold in ledger.records.holds.values() if hold.state == "open") == (
        sum(ledger.held(name) or 0 for name in ("alice", "bob", "shop", "bob-2"))
    )
    ledger._held["alice"] += 1  # a bug that creates held money
    ledger._total += 1
    with pytest.raises(LedgerInvariantError):
        driver.run(BOB, 9, Operation.transfer("bob", "shop", 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_hold_duration_ms", 0),
        ("max_holds_per_client", -1),
        ("max_accounts_per_client", 10**7),
        ("closed_hold_retention_ms", -1),
        ("refund_window_ms", 2**41),
        ("max_refundable_per_client", -1),
    ],
)
def test_the_record_limits_are_validated_in_the_config(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=field):
        ClusterConfig(**{field: value})
    assert ClusterConfig().ledger_limits() == LedgerLimits()


def test_a_hold_closed_in_this_batch_restores_even_with_no_retention() -> None:
    driver = _driver(LedgerLimits(closed_hold_retention_ms=0, refund_window_ms=0))
    driver.run(ALICE, 1, Operation.authorize("alice", "shop", 7, 1000))
    driver.run(ALICE, 2, Operation.void((ALICE, 1)))
    assert Ledger.restore(driver.ledger.snapshot()).digest() == driver.ledger.digest()
    driver.at(101)
    assert driver.ledger.records.holds == {}
    assert driver.reason(SHOP, 1, Operation.capture((ALICE, 1), 1)) == "hold_not_found"
