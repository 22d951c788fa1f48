"""Teeth for the checkers of issue 11's operations (tests/test_teeth.py's pattern): each
test injects one ledger bug with monkeypatch, runs a scenario under a bounded number of
seeds and asserts the checkers report it; with the bug taken out, the same run is safe."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from pbft.certificates import Proposal
from pbft.ledger import Payment
from pbft.ledger_ops import OperationRules, Outcome
from pbft.operations import Posting, Reason
from pbft.ordering import Ordering
from sim.checkers import SAFETY_CHECKS, run_checks
from sim.scenario import Scenario, parse_scenario
from sim.simulator import Simulation

Inject = Callable[[pytest.MonkeyPatch], None]


def safety_violations(scenario: Scenario, seed: int) -> tuple[str, ...]:
    """The safety checks one run violates (what was observed up to a crash, if the bug
    trips one of the core's own invariants)."""
    simulation = Simulation(scenario, seed)
    try:
        checks = simulation.run().checks
    except Exception:  # the checkers still judge what happened before
        checks = dict(run_checks(simulation.observed, simulation.keyring, simulation.cluster_id))
    return tuple(name for name in SAFETY_CHECKS if not checks[name].ok)


def assert_bug_is_found(
    monkeypatch: pytest.MonkeyPatch, inject: Inject, text: str, seeds: Sequence[int], expected: str
) -> int:
    scenario = parse_scenario(text, "<teeth>")
    inject(monkeypatch)
    for seed in seeds:
        violated = safety_violations(scenario, seed)
        if violated:
            break
    else:
        pytest.fail(f"no safety violation found in seeds {seeds[0]}..{seeds[-1]}")
    assert expected in violated, violated
    monkeypatch.undo()
    assert safety_violations(scenario, seed) == (), "the scenario is unsafe without the bug too"
    return seed


# --- a capture that keeps the remainder held ------------------------------------------------


def capture_keeps_the_remainder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture posts the captured amount to the payee but leaves the rest of the hold
    held instead of giving it back to the payer: money is conserved (available + held), so
    only the holds check, comparing held balances with the open holds, can see it."""
    capture = OperationRules._capture

    def keeping_capture(self: OperationRules, payment: Payment) -> Outcome:
        reason, postings = capture(self, payment)
        if reason is not Reason.NONE:
            return reason, postings
        payer, payee = postings
        rest = payer.available_delta
        self._set_balance(payer.account, self._available(payer.account) - rest)
        self._set_held(payer.account, self._held_of(payer.account) + rest)
        kept = Posting(payer.account, 0, payer.held_delta + rest)
        return reason, (kept, payee)

    monkeypatch.setattr(OperationRules, "_capture", keeping_capture)


HOLDS_CAPTURED_IN_PART = """
name = "teeth-capture-remainder"
description = "Holds captured in part, no faults."

[workload]
clients = 4
accounts = 8
payments = 120
rate_per_s = 100
overdraw = 0.0
mix = { transfer = 0.2, authorize = 0.5, capture = 0.3 }
expires_in_ms = { min = 5000, max = 9000 }
wrong_ref = 0.0
"""


def test_a_capture_that_keeps_the_remainder_held_breaks_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found at seed 0 (each of the first ten seeds finds it: each captures a hold in part)."""
    assert_bug_is_found(
        monkeypatch, capture_keeps_the_remainder, HOLDS_CAPTURED_IN_PART, range(3), "holds"
    )


# --- an expiry decided on one replica's own clock ------------------------------------------


def expire_by_own_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica 1 hands its ledger its own clock as the batch time instead of the agreed
    batch timestamp, so it releases expired holds when its clock says so."""
    agreed = Ordering._batch_time_ms

    def own_clock(self: Ordering, proposal: Proposal) -> int:
        if self.ctx.id == 1:
            return self.ctx.now_ms
        return agreed(self, proposal)

    monkeypatch.setattr(Ordering, "_batch_time_ms", own_clock)


HOLDS_EXPIRING_UNDER_SKEW = """
name = "teeth-expiry-own-clock"
description = "Short holds, replica 1's clock runs twice too fast."

[workload]
clients = 4
accounts = 8
payments = 150
rate_per_s = 100
overdraw = 0.0
mix = { transfer = 0.2, authorize = 0.5, capture = 0.2, void = 0.1 }
expires_in_ms = { min = 100, max = 600 }
wrong_ref = 0.0

[[faults]]
at_ms = 0
action = "clock_skew"
replica = 1
factor = 2.0
"""


def test_an_expiry_decided_on_a_replicas_own_clock_breaks_hold_fates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found at seed 0 (nine of the first ten seeds): replica 1 releases holds at other
    batches than the others."""
    assert_bug_is_found(
        monkeypatch, expire_by_own_clock, HOLDS_EXPIRING_UNDER_SKEW, range(3), "hold_fates"
    )
