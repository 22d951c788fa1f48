"""Tests for sim.checkers: each checker passes a consistent history and reports a violation
for a fabricated counterexample, so a green simulation run means something."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import KeyRing, SigningKey
from pbft.client import Decided
from pbft.events import ExecutedRequest
from pbft.messages import Request
from pbft.receipt import RECEIPT_VERSION, Receipt
from pbft.replies import ReplyResult, sign_replies
from pbft.signed import seal
from sim.checkers import (
    SAFETY_CHECKS,
    Observations,
    PaymentId,
    check_agreement,
    check_conservation,
    check_integrity,
    check_liveness,
    check_receipts,
    check_validity,
    run_checks,
)

SEED = 77
REPLICAS = 4
CLIENT = 2
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{replica}") for replica in range(REPLICAS)]
CLIENT_KEY = SigningKey.derive(SEED, f"client/{CLIENT}")
KEYRING = KeyRing(
    {("replica", replica): key.verify_key for replica, key in enumerate(REPLICA_KEYS)}
    | {("client", CLIENT): CLIENT_KEY.verify_key}
)
ALL = frozenset(range(REPLICAS))
# The checkers take the id as given (the simulator computes it from the genesis).
CLUSTER_ID = hashlib.sha256(b"the checkers' cluster").digest()
TOTAL = 8000

ENTRY_A = hashlib.sha256(b"entry a").digest()
ENTRY_B = hashlib.sha256(b"entry b").digest()

PAYMENT: PaymentId = (CLIENT, 1)
REQUEST = Request(CLIENT, 1, "transfer", "acct-00002", "acct-00003", 50)
REQUEST_RAW = seal(REQUEST, CLIENT_KEY)
REQUEST_DIGEST = hashlib.sha256(REQUEST.encode()).digest()
SEQ = 3


def _record(
    *,
    payment: PaymentId = PAYMENT,
    digest: bytes = REQUEST_DIGEST,
    outcome: str = "confirmed",
    reason: str = "",
    fresh: bool = True,
) -> ExecutedRequest:
    return ExecutedRequest(
        client_id=payment[0],
        request_id=payment[1],
        request_digest=digest,
        payer=REQUEST.payer,
        payee=REQUEST.payee,
        amount=REQUEST.amount,
        outcome=outcome,
        reason=reason,
        fresh=fresh,
        op="transfer",
        ref_client=0,
        ref_request=0,
        expires_in_ms=0,
        postings=(),
    )


def _receipt(
    *,
    replicas: tuple[int, ...] = (0, 1),
    seq: int = SEQ,
    outcome: str = "confirmed",
    reason: str = "",
    keys: list[SigningKey] | None = None,
    cluster_id: bytes = CLUSTER_ID,
) -> Receipt:
    keys = keys if keys is not None else REPLICA_KEYS
    result = ReplyResult(CLIENT, REQUEST.request_id, REQUEST_DIGEST, seq, outcome, reason)
    replies = tuple(
        sign_replies(keys[replica], replica, 0, seq, cluster_id, [result])[0]
        for replica in replicas
    )
    return Receipt(RECEIPT_VERSION, cluster_id, REQUEST_RAW, replies)


def _decided(receipt: Receipt, *, seq: int = SEQ, outcome: str = "confirmed") -> Decided:
    return Decided(CLIENT, REQUEST.request_id, outcome, "", seq, receipt)


def consistent_history(correct: frozenset[int] = ALL) -> Observations:
    """One payment, submitted, executed once at seq 3 by every replica and decided."""
    observed = Observations(correct=correct, initial_total=TOTAL)
    for replica in range(REPLICAS):
        observed.executed_entries[replica] = {SEQ: ENTRY_A}
        observed.executed_requests[replica] = {PAYMENT: [(SEQ, _record())]}
        observed.final_ledgers[replica] = (TOTAL, TOTAL, 0)
    observed.submitted[PAYMENT] = REQUEST_DIGEST
    observed.decided[PAYMENT] = _decided(_receipt())
    return observed


def test_a_consistent_history_passes_every_check() -> None:
    results = run_checks(consistent_history(), KEYRING, CLUSTER_ID)
    assert set(results) == {*SAFETY_CHECKS, "liveness"}
    for name, result in results.items():
        assert result.name == name
        assert result.ok, (name, result.details)
        assert result.details == []


def test_an_empty_history_passes_every_check() -> None:
    results = run_checks(Observations(correct=ALL, initial_total=TOTAL), KEYRING, CLUSTER_ID)
    assert all(result.ok for result in results.values())


# --- agreement ------------------------------------------------------------------------------


def test_agreement_flags_different_entries_at_one_seq() -> None:
    observed = consistent_history()
    observed.executed_entries[2] = {SEQ: ENTRY_B}
    result = check_agreement(observed)
    assert not result.ok
    assert len(result.details) == 1
    assert f"seq {SEQ}" in result.details[0]
    assert ENTRY_B.hex()[:12] in result.details[0]


def test_agreement_flags_one_replica_executing_two_batches_at_one_seq() -> None:
    """Even if its last batch matches everyone else's, a replica that executed another
    batch at the same seq first has diverged."""
    observed = consistent_history()
    observed.self_conflicts.append((1, SEQ, ENTRY_B, ENTRY_A))
    result = check_agreement(observed)
    assert not result.ok
    assert "replica 1 executed two batches" in result.details[0]
    byzantine_only = consistent_history(correct=frozenset({0, 2, 3}))
    byzantine_only.self_conflicts.append((1, SEQ, ENTRY_B, ENTRY_A))
    assert check_agreement(byzantine_only).ok


def test_agreement_allows_replicas_to_have_executed_different_prefixes() -> None:
    observed = consistent_history()
    observed.executed_entries[0][SEQ + 1] = ENTRY_B
    assert check_agreement(observed).ok


def test_agreement_flags_different_outcomes_for_one_payment() -> None:
    observed = consistent_history()
    observed.executed_requests[1][PAYMENT] = [
        (SEQ, _record(outcome="rejected", reason="insufficient_funds"))
    ]
    result = check_agreement(observed)
    assert not result.ok
    assert any(str(PAYMENT) in detail for detail in result.details)


def test_agreement_flags_one_payment_executed_at_different_seqs() -> None:
    observed = consistent_history()
    observed.executed_requests[3][PAYMENT] = [(SEQ + 5, _record())]
    assert not check_agreement(observed).ok


@pytest.mark.parametrize("reason", ["id_reused", "request_expired"])
def test_agreement_ignores_unstored_rejections(reason: str) -> None:
    observed = consistent_history()
    # A retransmission with a reused id answered without touching the ledger.
    observed.executed_requests[1][PAYMENT].append(
        (SEQ + 2, _record(outcome="rejected", reason=reason))
    )
    assert check_agreement(observed).ok


def test_agreement_ignores_replayed_executions() -> None:
    observed = consistent_history()
    observed.executed_requests[1][PAYMENT].append(
        (SEQ + 2, _record(outcome="rejected", reason="insufficient_funds", fresh=False))
    )
    assert check_agreement(observed).ok


def test_agreement_ignores_byzantine_replicas() -> None:
    observed = consistent_history(correct=frozenset({0, 1, 2}))
    observed.executed_entries[3] = {SEQ: ENTRY_B}
    observed.executed_requests[3] = {
        PAYMENT: [(SEQ + 1, _record(outcome="rejected", reason="unauthorized"))]
    }
    assert check_agreement(observed).ok
    # The same history with replica 3 counted as correct is a violation.
    observed.correct = ALL
    assert not check_agreement(observed).ok


# --- validity -------------------------------------------------------------------------------


def test_validity_flags_a_payment_that_was_never_submitted() -> None:
    observed = consistent_history()
    del observed.submitted[PAYMENT]
    result = check_validity(observed)
    assert not result.ok
    assert len(result.details) == REPLICAS


def test_validity_flags_a_body_other_than_the_one_submitted() -> None:
    observed = consistent_history()
    forged = hashlib.sha256(b"another body").digest()
    observed.executed_requests[0][PAYMENT] = [(SEQ, _record(digest=forged))]
    result = check_validity(observed)
    assert not result.ok
    assert result.details == [f"replica 0 seq {SEQ}: executed unsubmitted {PAYMENT}"]


def test_validity_ignores_byzantine_replicas() -> None:
    observed = consistent_history(correct=frozenset({0, 1, 2}))
    observed.executed_requests[3][(CLIENT, 99)] = [(SEQ, _record(payment=(CLIENT, 99)))]
    assert check_validity(observed).ok


# --- integrity ------------------------------------------------------------------------------


def test_integrity_flags_a_payment_taking_effect_twice_at_one_replica() -> None:
    observed = consistent_history()
    observed.executed_requests[2][PAYMENT].append((SEQ + 4, _record()))
    result = check_integrity(observed)
    assert not result.ok
    assert result.details == [f"replica 2: payment {PAYMENT} executed at seqs [3, 7]"]


def test_integrity_allows_a_replayed_execution() -> None:
    observed = consistent_history()
    observed.executed_requests[2][PAYMENT].append((SEQ + 4, _record(fresh=False)))
    assert check_integrity(observed).ok


@pytest.mark.parametrize("reason", ["id_reused", "request_expired"])
def test_integrity_does_not_count_unstored_rejections(reason: str) -> None:
    observed = consistent_history()
    observed.executed_requests[2][PAYMENT].append(
        (SEQ + 4, _record(outcome="rejected", reason=reason))
    )
    assert check_integrity(observed).ok


def test_integrity_counts_a_stored_rejection_as_an_effect() -> None:
    observed = consistent_history()
    observed.executed_requests[2][PAYMENT].append(
        (SEQ + 4, _record(outcome="rejected", reason="insufficient_funds"))
    )
    assert not check_integrity(observed).ok


# --- conservation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ledger",
    [(TOTAL + 1, TOTAL + 1, 0), (TOTAL, TOTAL - 5, 0), (TOTAL - 5, TOTAL, 0)],
    ids=["both-totals-wrong", "recount-differs", "tracked-differs"],
)
def test_conservation_flags_a_total_that_differs(ledger: tuple[int, int, int]) -> None:
    observed = consistent_history()
    observed.final_ledgers[1] = ledger
    result = check_conservation(observed)
    assert not result.ok
    assert result.details[0].startswith("replica 1: total")


def test_conservation_flags_a_negative_balance() -> None:
    observed = consistent_history()
    observed.final_ledgers[3] = (TOTAL, TOTAL, -1)
    result = check_conservation(observed)
    assert not result.ok
    assert result.details == ["replica 3: a balance went negative (-1)"]


def test_conservation_ignores_byzantine_and_crashed_replicas() -> None:
    observed = consistent_history(correct=frozenset({0, 1, 2}))
    observed.final_ledgers[3] = (0, 1, -100)
    del observed.final_ledgers[2]  # down at the end: no ledger to check
    assert check_conservation(observed).ok


@settings(max_examples=50, deadline=None)
@given(
    tracked=st.integers(0, 2 * TOTAL),
    recounted=st.integers(0, 2 * TOTAL),
    smallest=st.integers(-10, 10),
)
def test_conservation_holds_exactly_when_totals_match_and_no_balance_is_negative(
    tracked: int, recounted: int, smallest: int
) -> None:
    observed = consistent_history()
    observed.final_ledgers[0] = (tracked, recounted, smallest)
    expected = tracked == recounted == TOTAL and smallest >= 0
    assert check_conservation(observed).ok is expected


# --- receipts -------------------------------------------------------------------------------


def test_receipts_accept_a_real_receipt_matching_the_replicas() -> None:
    assert check_receipts(consistent_history(), KEYRING, CLUSTER_ID).ok


def test_receipts_flag_an_outcome_other_than_the_correct_replicas() -> None:
    observed = consistent_history()
    # A valid, verifying receipt that says "rejected" when every replica confirmed it.
    lying = _receipt(outcome="rejected", reason="insufficient_funds")
    observed.decided[PAYMENT] = _decided(lying, outcome="rejected")
    result = check_receipts(observed, KEYRING, CLUSTER_ID)
    assert not result.ok
    assert len(result.details) == REPLICAS
    assert "receipt says ('rejected', 'insufficient_funds', 3)" in result.details[0]


def test_receipts_flag_a_seq_other_than_the_correct_replicas() -> None:
    observed = consistent_history()
    observed.decided[PAYMENT] = _decided(_receipt(seq=SEQ + 1), seq=SEQ + 1)
    assert not check_receipts(observed, KEYRING, CLUSTER_ID).ok


def test_receipts_compare_only_with_correct_replicas() -> None:
    observed = consistent_history(correct=frozenset({0, 1, 2}))
    observed.executed_requests[3][PAYMENT] = [
        (SEQ, _record(outcome="rejected", reason="insufficient_funds"))
    ]
    assert check_receipts(observed, KEYRING, CLUSTER_ID).ok


def test_receipts_flag_too_few_replies() -> None:
    observed = consistent_history()
    observed.decided[PAYMENT] = _decided(_receipt(replicas=(0,)))
    result = check_receipts(observed, KEYRING, CLUSTER_ID)
    assert not result.ok
    assert "does not verify" in result.details[0]


def test_receipts_flag_a_reply_signed_with_a_key_outside_the_cluster() -> None:
    outsider_keys = [SigningKey.derive(SEED + 1, f"replica/{replica}") for replica in range(4)]
    observed = consistent_history()
    observed.decided[PAYMENT] = _decided(_receipt(keys=outsider_keys))
    result = check_receipts(observed, KEYRING, CLUSTER_ID)
    assert not result.ok
    assert "does not verify" in result.details[0]


def test_receipts_flag_a_receipt_from_another_cluster() -> None:
    # Same keys, same request, same replies, but signed as another cluster's (another
    # genesis): the receipt proves nothing about this one.
    observed = consistent_history()
    other = hashlib.sha256(b"another cluster").digest()
    observed.decided[PAYMENT] = _decided(_receipt(cluster_id=other))
    result = check_receipts(observed, KEYRING, CLUSTER_ID)
    assert not result.ok
    assert "from another cluster" in result.details[0]


def test_receipts_flag_one_replica_counted_twice() -> None:
    observed = consistent_history()
    observed.decided[PAYMENT] = _decided(_receipt(replicas=(1, 1)))
    assert not check_receipts(observed, KEYRING, CLUSTER_ID).ok


# --- liveness -------------------------------------------------------------------------------


def test_liveness_flags_a_submitted_but_undecided_payment() -> None:
    observed = consistent_history()
    del observed.decided[PAYMENT]
    result = check_liveness(observed)
    assert not result.ok
    assert result.details == [f"payment {PAYMENT} undecided at the end"]


def test_liveness_is_not_a_safety_check() -> None:
    observed = consistent_history()
    del observed.decided[PAYMENT]
    results = run_checks(observed, KEYRING, CLUSTER_ID)
    assert "liveness" not in SAFETY_CHECKS
    assert not results["liveness"].ok
    assert all(results[name].ok for name in SAFETY_CHECKS)


def test_check_details_are_bounded() -> None:
    observed = consistent_history()
    for request_id in range(2, 40):
        observed.submitted[(CLIENT, request_id)] = REQUEST_DIGEST
    result = check_liveness(observed)
    assert not result.ok
    assert 0 < len(result.details) <= 10
