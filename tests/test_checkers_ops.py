"""Tests for the checkers of holds, refunds and their agreement (sim.checkers): each passes
a consistent history of executed batches and reports a fabricated counterexample."""

from __future__ import annotations

import dataclasses
import hashlib

from pbft.events import Executed, ExecutedRequest
from pbft.operations import Posting, Release
from sim.checkers import (
    Observations,
    check_conservation,
    check_effects_agree,
    check_holds_and_refunds,
)

ALL = frozenset(range(4))
PAYER = "acct-00000"
PAYEE = "acct-00001"
HOLD = (0, 1)


def record(
    client: int,
    request: int,
    op: str,
    *postings: Posting,
    amount: int = 0,
    ref: tuple[int, int] = (0, 0),
    expires_in_ms: int = 0,
    outcome: str = "confirmed",
    reason: str = "",
    payer: str = "",
    payee: str = "",
) -> ExecutedRequest:
    return ExecutedRequest(
        client_id=client,
        request_id=request,
        request_digest=hashlib.sha256(f"{client}/{request}".encode()).digest(),
        payer=payer,
        payee=payee,
        amount=amount,
        outcome=outcome,
        reason=reason,
        fresh=True,
        op=op,
        ref_client=ref[0],
        ref_request=ref[1],
        expires_in_ms=expires_in_ms,
        postings=postings if outcome == "confirmed" else (),
    )


def batch(
    seq: int, *requests: ExecutedRequest, at_ms: int = 0, released: tuple[Release, ...] = ()
) -> Executed:
    return Executed(
        view=0,
        seq=seq,
        entry_digest=hashlib.sha256(bytes([seq])).digest(),
        requests=requests,
        timestamp_ms=at_ms,
        primary=0,
        batch_digest=b"",
        released=released,
    )


def authorize(request: int, amount: int, expires_in_ms: int = 1000) -> ExecutedRequest:
    return record(
        0,
        request,
        "authorize",
        Posting(PAYER, -amount, amount),
        amount=amount,
        expires_in_ms=expires_in_ms,
        payer=PAYER,
        payee=PAYEE,
    )


def capture(request: int, hold: tuple[int, int], amount: int, held: int) -> ExecutedRequest:
    """The payee's owner (client 1) captures `amount` of a hold of `held`."""
    return record(
        1,
        request,
        "capture",
        Posting(PAYER, held - amount, -held),
        Posting(PAYEE, amount, 0),
        amount=amount,
        ref=hold,
    )


def void(request: int, hold: tuple[int, int], held: int) -> ExecutedRequest:
    return record(0, request, "void", Posting(PAYER, held, -held), ref=hold)


def refund(request: int, payment: tuple[int, int], amount: int) -> ExecutedRequest:
    return record(
        1,
        request,
        "refund",
        Posting(PAYEE, -amount, 0),
        Posting(PAYER, amount, 0),
        amount=amount,
        ref=payment,
    )


def transfer(request: int, amount: int) -> ExecutedRequest:
    return record(
        0,
        request,
        "transfer",
        Posting(PAYER, -amount, 0),
        Posting(PAYEE, amount, 0),
        amount=amount,
        payer=PAYER,
        payee=PAYEE,
    )


# A consistent history: a hold captured in part then refunded in part, a transfer refunded
# in full, a hold voided, a hold that expires at batch time 1500 and is released then.
GOOD = (
    batch(1, authorize(1, 100), authorize(2, 30, expires_in_ms=1500), at_ms=0),
    batch(2, capture(1, HOLD, 60, 100), transfer(3, 20), at_ms=10),
    batch(3, refund(2, HOLD, 25), refund(3, (0, 3), 20), authorize(4, 5), at_ms=20),
    batch(4, void(5, (0, 4), 5), refund(4, HOLD, 35), at_ms=1000),
    batch(5, at_ms=1500, released=(Release(0, 2, PAYER, 30),)),
)


def observed(*batches: Executed, replicas: frozenset[int] = ALL) -> Observations:
    observations = Observations(correct=ALL, initial_total=0)
    for replica in replicas:
        observations.executed_batches[replica] = {executed.seq: executed for executed in batches}
    return observations


def failures(*batches: Executed) -> tuple[list[str], list[str]]:
    holds, refunds = check_holds_and_refunds(observed(*batches))
    assert holds.ok == (not holds.details) and refunds.ok == (not refunds.details)
    return holds.details, refunds.details


def test_a_consistent_history_passes_every_check() -> None:
    assert failures(*GOOD) == ([], [])
    assert check_effects_agree(observed(*GOOD)).ok
    assert check_conservation(observed(*GOOD)).ok


def test_a_hold_captured_twice_is_reported() -> None:
    twice = batch(5, capture(9, HOLD, 10, 100), at_ms=30)
    holds, _ = failures(*GOOD[:4], twice)
    assert any(
        "captured hold (0, 1)" in detail and "after it was captured" in detail for detail in holds
    )


def test_a_hold_captured_and_voided_is_reported() -> None:
    voided = batch(5, void(9, HOLD, 100), at_ms=30)
    holds, _ = failures(*GOOD[:4], voided)
    assert any("voided hold (0, 1)" in detail and "captured at seq 2" in detail for detail in holds)


def test_a_capture_that_keeps_the_remainder_held_is_reported() -> None:
    keeps = record(
        1, 1, "capture", Posting(PAYER, 0, -60), Posting(PAYEE, 60, 0), amount=60, ref=HOLD
    )
    holds, _ = failures(GOOD[0], batch(2, keeps, at_ms=10))
    assert (
        holds[0]
        == f"replica 0 seq 2: account {PAYER!r} holds 70 by its postings, its open holds 30"
    )


def test_a_capture_of_more_than_is_held_is_reported() -> None:
    holds, _ = failures(GOOD[0], batch(2, capture(1, HOLD, 101, 100), at_ms=10))
    assert any("captured 101 of hold (0, 1), which holds 100" in detail for detail in holds)


def test_a_capture_after_expiry_is_reported() -> None:
    late = batch(6, capture(9, (0, 2), 30, 30), at_ms=1600)
    holds, _ = failures(*GOOD, late)
    assert any("after it was expired at seq 5" in detail for detail in holds)


def test_a_hold_released_before_its_expiry_is_reported() -> None:
    early = dataclasses.replace(GOOD[4], timestamp_ms=1499)
    holds, _ = failures(*GOOD[:4], early)
    assert any("before it expires at 1500 ms" in detail for detail in holds)


def test_a_hold_not_released_when_its_time_has_come_is_reported() -> None:
    kept = dataclasses.replace(GOOD[4], released=())
    holds, _ = failures(*GOOD[:4], kept)
    assert any("expired at 1500 ms but was not released" in detail for detail in holds)


def test_batch_time_never_goes_backwards_for_expiry() -> None:
    # A later batch stamped earlier does not undo the time the ledger reached.
    earlier = batch(6, at_ms=5)
    assert failures(*GOOD, earlier) == ([], [])


def test_refunds_beyond_what_was_paid_are_reported() -> None:
    more = batch(5, refund(9, (0, 3), 1), at_ms=1499)
    _, refunds = failures(*GOOD[:4], more)
    assert any("payment (0, 3) paid 20, refunded 21 in all" in detail for detail in refunds)


def test_a_refund_of_a_payment_nobody_made_is_reported() -> None:
    _, refunds = failures(GOOD[0], batch(2, refund(1, (3, 3), 1)))
    assert any("of payment (3, 3), which nobody paid" in detail for detail in refunds)


def test_a_refund_that_moves_money_the_wrong_way_is_reported() -> None:
    backwards = record(
        1, 9, "refund", Posting(PAYEE, 5, 0), Posting(PAYER, -5, 0), amount=5, ref=HOLD
    )
    _, refunds = failures(*GOOD[:2], batch(3, backwards, at_ms=20))
    assert any("posted" in detail for detail in refunds)


def test_refused_requests_change_nothing_the_checks_see() -> None:
    refused = record(
        1, 9, "capture", amount=10, ref=HOLD, outcome="rejected", reason="hold_already_captured"
    )
    assert failures(*GOOD, batch(6, refused, at_ms=1600)) == ([], [])


def test_replay_stops_at_a_gap_left_by_state_transfer() -> None:
    # Replica 0 fetched the state at seq 3: seqs 4 and 5 alone cannot be replayed.
    observations = observed(*GOOD)
    observations.executed_batches[0] = {4: GOOD[3], 5: GOOD[4]}
    holds, refunds = check_holds_and_refunds(observations)
    assert holds.ok and refunds.ok


def test_an_operation_that_creates_money_breaks_conservation() -> None:
    minted = record(0, 9, "transfer", Posting(PAYER, -5, 0), Posting(PAYEE, 6, 0), amount=5)
    result = check_conservation(observed(batch(1, minted)))
    assert not result.ok
    assert "changed the total by 1" in result.details[0]


def test_replicas_that_release_a_hold_at_different_batches_disagree() -> None:
    observations = observed(*GOOD)
    # Replica 2 expired the hold by its own clock, a batch early.
    early = dataclasses.replace(GOOD[3], released=(Release(0, 2, PAYER, 30),))
    late = dataclasses.replace(GOOD[4], released=())
    observations.executed_batches[2] = {**observations.executed_batches[2], 4: early, 5: late}
    result = check_effects_agree(observations)
    assert not result.ok
    assert result.details[0].startswith("seq 4: correct replicas did different things")
    assert "[2]" in result.details[0]


def test_byzantine_replicas_may_do_anything() -> None:
    observations = observed(*GOOD)
    observations.correct = frozenset({0, 1, 3})
    observations.executed_batches[2] = {1: batch(1, capture(1, HOLD, 999, 0))}
    assert check_effects_agree(observations).ok
    holds, refunds = check_holds_and_refunds(observations)
    assert holds.ok and refunds.ok


def test_replicas_that_read_other_times_but_release_the_same_holds_agree() -> None:
    observations = observed(*GOOD)
    later = dataclasses.replace(GOOD[4], timestamp_ms=1700)
    observations.executed_batches[3] = {**observations.executed_batches[3], 5: later}
    assert check_effects_agree(observations).ok
