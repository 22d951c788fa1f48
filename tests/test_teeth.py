"""Teeth: the simulator's adversary and checkers find known protocol bugs.

Each test injects one classic BFT bug into the core with pytest's monkeypatch (so it is
never active in a normal run), runs a scenario within the fault bound under a bounded
number of seeds, and asserts that the checkers report a safety violation; then, with the
bug taken out again, the same scenario and seed are safe, so the violation is the bug's.
The last tests run the fuzzer itself (`sim.fuzz`) against injected bugs.

Each docstring records how many seeds it took when measured (and how many of the first
ten seeds expose the bug), so a change that blunts the adversary shows up here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import pbft.viewchanges as viewchanges_module
from pbft.chain import entry_digest
from pbft.ledger import ExecutionResult, Ledger, Payment
from pbft.log import Slot
from pbft.messages import NewView, PrePrepare
from pbft.ordering import Ordering
from pbft.recovery import Recovery
from pbft.signed import Opened, peek
from pbft.viewchange import NewViewPlan, PlannedEntry, VerifiedViewChange, plan_new_view
from pbft.viewchanges import ViewChanges
from sim.checkers import SAFETY_CHECKS, run_checks
from sim.fuzz import fuzz, run_case
from sim.scenario import BEHAVIORS as SCENARIO_BEHAVIORS
from sim.scenario import Scenario, load_scenario, parse_scenario
from sim.shrink import evaluate
from sim.simulator import Simulation

Inject = Callable[[pytest.MonkeyPatch], None]


def safety_violations(scenario: Scenario, seed: int) -> tuple[str, ...]:
    """The safety checks one run violates. An injected bug may also trip one of the core's
    own assertions and end the run with an exception: then what was observed up to that
    point is checked."""
    simulation = Simulation(scenario, seed)
    try:
        checks = simulation.run().checks
    except Exception:  # the checkers still judge what happened before
        checks = dict(run_checks(simulation.observed, simulation.keyring, simulation.cluster_id))
    return tuple(name for name in SAFETY_CHECKS if not checks[name].ok)


def first_violation(scenario: Scenario, seeds: Sequence[int]) -> tuple[int, tuple[str, ...]]:
    for seed in seeds:
        violated = safety_violations(scenario, seed)
        if violated:
            return seed, violated
    pytest.fail(f"no safety violation found in seeds {seeds[0]}..{seeds[-1]}")


def assert_bug_is_found(
    monkeypatch: pytest.MonkeyPatch, inject: Inject, text: str, seeds: int, expected: str
) -> int:
    """Inject the bug, find a violation of `expected` within `seeds` seeds, then check the
    same run is safe without the bug. Returns the seed that found it."""
    scenario = parse_scenario(text, "<teeth>")
    inject(monkeypatch)
    seed, violated = first_violation(scenario, range(seeds))
    assert expected in violated, violated
    monkeypatch.undo()
    assert safety_violations(scenario, seed) == (), "the scenario is unsafe without the bug too"
    return seed


# --- (a) a NEW-VIEW that loses a prepared entry is accepted --------------------------------


def drop_last_planned_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan_new_view` (as pbft.viewchanges uses it, for the new primary's NEW-VIEW and for every
    backup's check of it) leaves out the last re-proposal: the new primary forgets a
    prepared entry and the backups, recomputing with the same mistake, accept it."""

    def lossy_plan(view: int, view_changes: Sequence[VerifiedViewChange]) -> NewViewPlan:
        plan = plan_new_view(view, view_changes)
        return dataclasses.replace(plan, entries=plan.entries[:-1])

    monkeypatch.setattr(viewchanges_module, "plan_new_view", lossy_plan)


LAGGING_QUORUM = """
name = "teeth-lagging-quorum"
description = '''Replica 3 alone receives COMMITs (to everyone else they are lost, and so is
catch-up), so it alone executes; then it is cut off. The other three change view: the NEW-VIEW
must re-propose exactly what they prepared, or they decide differently from replica 3. No
replica is faulty: only the network is.'''

[cluster]
batch_size = 4

[workload]
clients = 4
accounts = 4
initial_balance = 10
payments = 30
rate_per_s = 200

[[faults]]
at_ms = 0
until_ms = 1500
action = "drop"
to = [0, 1, 2]
messages = ["COMMIT", "COMMIT_CERTIFICATE", "CHECKPOINT_STATE"]
probability = 1.0

[[faults]]
at_ms = 100
until_ms = 2500
action = "partition"
groups = [[3], [0, 1, 2]]
"""


def test_new_view_that_drops_a_prepared_entry_breaks_agreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured: found at seed 0; all of seeds 0..9 break agreement, none of them without the
    bug. The fuzzer's random scenarios found it too, at case seed 43 (44 cases, 10 s on one
    core; case seed 185 before commit 9bb18c0 changed the replica): found, but too slowly
    and too unsteadily for this suite."""
    assert_bug_is_found(monkeypatch, drop_last_planned_entry, LAGGING_QUORUM, 10, "agreement")


def trust_the_primarys_new_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup checking a NEW-VIEW no longer recomputes the re-proposals: `plan_new_view`, as
    ViewChanges.on_new_view calls it, returns the honest plan's checkpoint with the entries
    the primary sent (so the comparison that follows always agrees). The new primary's own
    plan is unchanged: a wrapper around on_new_view tells the two calls apart."""
    receiving: list[NewView] = []
    on_new_view = ViewChanges.on_new_view

    def on_new_view_trusting(self: ViewChanges, message: NewView, opened: Opened) -> None:
        receiving.append(message)
        try:
            on_new_view(self, message, opened)
        finally:
            receiving.pop()

    def primarys_plan(view: int, view_changes: Sequence[VerifiedViewChange]) -> NewViewPlan:
        plan = plan_new_view(view, view_changes)
        if not receiving:
            return plan
        entries = []
        for raw in receiving[-1].pre_prepares:
            _, proposal = peek(raw, PrePrepare)
            assert isinstance(proposal, PrePrepare)
            digest = entry_digest(
                proposal.seq, proposal.prev_hash, proposal.batch_digest, proposal.timestamp_ms
            )
            entries.append(
                PlannedEntry(
                    proposal.seq,
                    proposal.prev_hash,
                    proposal.batch_digest,
                    proposal.timestamp_ms,
                    digest,
                    tuple(proposal.requests),
                )
            )
        return dataclasses.replace(plan, entries=tuple(entries))

    monkeypatch.setattr(ViewChanges, "on_new_view", on_new_view_trusting)
    monkeypatch.setattr(viewchanges_module, "plan_new_view", primarys_plan)


BAD_NEW_VIEW = """
name = "teeth-bad-new-view"
description = '''As in teeth-lagging-quorum, replica 6 alone executes, then is cut off. The
primary of view 1 is Byzantine and turns the first prepared re-proposal of its NEW-VIEW into a
null batch. Seven replicas, so the five correct ones left can commit without its votes.'''

[cluster]
replicas = 7
batch_size = 4

[workload]
clients = 4
accounts = 4
initial_balance = 10
payments = 30
rate_per_s = 200

[[faults]]
at_ms = 0
until_ms = 1500
action = "drop"
to = [0, 1, 2, 3, 4, 5]
messages = ["COMMIT", "COMMIT_CERTIFICATE", "CHECKPOINT_STATE"]
probability = 1.0

[[faults]]
at_ms = 100
until_ms = 2500
action = "partition"
groups = [[6], [0, 1, 2, 3, 4, 5]]

[[byzantine]]
replica = 1
behavior = "bad_new_view"
kind = "omit_prepared"
"""


@pytest.mark.skipif(
    "bad_new_view" not in SCENARIO_BEHAVIORS, reason="needs the bad_new_view behaviour"
)
def test_new_view_accepted_without_recomputing_breaks_agreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured: found at seed 0; all of seeds 0..9 break agreement (and receipts), none of
    them without the bug (the backups then refuse the NEW-VIEW and view 2 re-proposes the
    entry)."""
    assert_bug_is_found(monkeypatch, trust_the_primarys_new_view, BAD_NEW_VIEW, 10, "agreement")


# --- (b) commit with 2f instead of 2f + 1 matching commits --------------------------------


class _CommitQuorumOf2f:
    """A ClusterConfig whose `quorum` is 2f instead of 2f + 1; everything else delegates."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)

    @property
    def quorum(self) -> int:
        return 2 * self._config.fault_tolerance


def commit_with_2f(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only inside Ordering._step_slot, the replica's config says quorum = 2f. The commit rule
    is the one use of `quorum` there (prepared uses 2f prepares plus the pre-prepare), so
    view changes, checkpoints and certificates elsewhere keep their 2f + 1."""
    step_slot = Ordering._step_slot

    def step_slot_with_weak_commit(self: Ordering, slot: Slot) -> bool:
        config = self.ctx.config
        self.ctx.config = _CommitQuorumOf2f(config)  # type: ignore[assignment]
        try:
            return step_slot(self, slot)
        finally:
            self.ctx.config = config

    monkeypatch.setattr(Ordering, "_step_slot", step_slot_with_weak_commit)


WEAK_COMMIT = """
name = "teeth-weak-commit-quorum"
description = '''PREPAREs (and commits, and catch-up) to replicas 1 and 2 are lost, so only the
primary and replica 3 prepare; replica 3 commits with the primary's commit and its own (2f).
Then the primary loses its disk (the one faulty replica) and replica 3 is cut off: the new
view's quorum holds nobody who remembers the entry.'''

[cluster]
batch_size = 4

[workload]
clients = 4
accounts = 4
initial_balance = 10
payments = 30
rate_per_s = 200

[[faults]]
at_ms = 0
until_ms = 1000
action = "drop"
to = [1, 2]
messages = ["PREPARE", "COMMIT", "COMMIT_CERTIFICATE", "CHECKPOINT_STATE"]
probability = 1.0

[[faults]]
at_ms = 200
action = "restart"
replica = 0
wipe = true

[[faults]]
at_ms = 200
until_ms = 3000
action = "partition"
groups = [[3], [0, 1, 2]]
"""


def test_commit_with_2f_matching_commits_breaks_agreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured: found at seed 0; all of seeds 0..9 break agreement, none of them without the
    bug. Within the bound: the wiped primary is the one faulty replica; the rest is the
    network. The fuzzer finds this bug at case seed 7 (see below), but through the core's own
    check of its stored commit certificates on restart; in its first 300 random scenarios
    the checkers never see a safety check break (an earlier generator's did, at case 172)."""
    assert_bug_is_found(monkeypatch, commit_with_2f, WEAK_COMMIT, 10, "agreement")


# --- (c) a prepare counted for a different digest than the pre-prepare ---------------------


def match_any_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slot.matching counts every vote in the slot, whatever digest it is for."""

    def any_digest(self: Slot, votes: dict[int, tuple[bytes, bytes]], digest: bytes) -> list[bytes]:
        return [raw for _, (_, raw) in sorted(votes.items())]

    monkeypatch.setattr(Slot, "matching", any_digest)


EQUIVOCATING_PRIMARY = """
name = "teeth-equivocating-primary"
description = "The primary shows replica 1 one batch and replicas 2 and 3 another."

[workload]
payments = 30
rate_per_s = 200

[[byzantine]]
replica = 0
behavior = "equivocate"
"""


def test_votes_for_another_digest_break_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured: found at seed 0; all of seeds 0..9 break agreement, none of them without the
    bug. (A replica's own check of its prepared certificates then stops the run at the next
    view change; the checkers judge what was executed before.) The fuzzer found it at case
    seed 3 (4 cases), through that invariant error."""
    assert_bug_is_found(monkeypatch, match_any_digest, EQUIVOCATING_PRIMARY, 10, "agreement")


# --- (d) execution out of sequence order ---------------------------------------------------


def execute_out_of_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordering.execute_ready runs the lowest committed entry above the last executed one,
    without waiting for a gap below it to commit (and without the chain check)."""

    def execute_ready(self: Ordering) -> None:
        executed_before = self.last_executed
        while True:
            ready = [
                seq
                for seq, slot in self.slots.items()
                if seq > self.last_executed and slot.committed is not None
            ]
            if not ready:
                break
            committed = self.slots[min(ready)].committed
            assert committed is not None
            self._execute(committed.proposal)
        if self.last_executed > executed_before:
            self.maybe_propose()

    monkeypatch.setattr(Ordering, "execute_ready", execute_ready)


REORDERED_COMMITS = """
name = "teeth-reordered-commits"
description = "COMMITs overtake each other; two accounts of 2 units make outcomes order-dependent."

[cluster]
batch_size = 2

[network]
latency_ms = { dist = "exponential", mean = 5, min = 1 }

[workload]
clients = 2
accounts = 2
initial_balance = 2
payments = 40
rate_per_s = 200

[[faults]]
at_ms = 0
action = "reorder"
messages = ["COMMIT"]
window_ms = 20
"""


def test_execution_out_of_order_breaks_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured: found at seed 0; all of seeds 0..9 break agreement (and receipts), none of
    them without the bug. The fuzzer found it at case seed 7 (8 cases)."""
    assert_bug_is_found(monkeypatch, execute_out_of_order, REORDERED_COMMITS, 10, "agreement")


# --- (e) no request-id dedup ------------------------------------------------------------------


def forget_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's exactly-once rule is off: a retransmitted request is never answered from
    the stored decision (lookup finds nothing) and executes again (execute forgets it)."""
    execute = Ledger.execute

    def execute_again(
        self: Ledger, payment: Payment, body_digest: bytes, seq: int
    ) -> ExecutionResult:
        record = self._clients.get(payment.client_id)
        if record is not None:
            record.decisions.pop(payment.request_id, None)
        return execute(self, payment, body_digest, seq)

    monkeypatch.setattr(Ledger, "lookup", lambda self, client_id, request_id: None)
    monkeypatch.setattr(Ledger, "execute", execute_again)


LOST_REPLIES = """
name = "teeth-lost-replies"
description = "Half the replies are lost, so clients time out and send their requests again."

[cluster]
client_timeout_ms = 100

[workload]
clients = 2
accounts = 4
payments = 20
rate_per_s = 100

[[faults]]
at_ms = 0
action = "drop"
to = "clients"
messages = ["REPLY"]
probability = 0.5
"""


def test_retransmissions_without_dedup_break_integrity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured: found at seed 0; all of seeds 0..9 break integrity (and agreement and
    receipts), none of them without the bug. The fuzzer found it at case seed 3 (4 cases;
    it was case seed 1 before commit 9bb18c0 changed the replica)."""
    assert_bug_is_found(monkeypatch, forget_decisions, LOST_REPLIES, 10, "integrity")


# --- the fuzzer against injected bugs --------------------------------------------------------


@pytest.mark.parametrize(
    ("inject", "cases"),
    [
        # Measured: the first failing case seeds are 7, 3, 13 and 3 (out-of-order was 7
        # until unsolicited catch-up help shrank to one certificate). A case fails with a
        # violated safety check, or (2f commits: a restarted replica refuses its own stored
        # commit certificate; other digests: its own view change is invalid) with the core's
        # own invariant error, which the fuzzer reports as a failure too. Some slack is left,
        # since any change to the generator reshuffles the cases.
        pytest.param(commit_with_2f, 12, id="commit-with-2f"),
        pytest.param(match_any_digest, 8, id="votes-for-another-digest"),
        pytest.param(execute_out_of_order, 18, id="out-of-order-execution"),
        pytest.param(forget_decisions, 8, id="no-dedup"),
    ],
)
def test_fuzzer_finds_injected_bugs_in_a_few_cases(
    monkeypatch: pytest.MonkeyPatch, inject: Inject, cases: int
) -> None:
    """The fuzzer's own cases (case seeds 0, 1, ...), run in this process so the patch
    applies; a liveness failure on the way does not count, a safety one or a crash does."""
    inject(monkeypatch)
    for seed in range(cases):
        signature = run_case(seed, 4).signature
        if any(part.startswith(("safety:", "exception:")) for part in signature):
            return
    pytest.fail(f"the fuzzer's first {cases} cases missed the injected bug")


def test_fuzzer_finds_shrinks_and_writes_an_injected_bug(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With dedup off, `fuzz` (one process, so the patch applies) finds a failing case within
    a few cases (measured: case seed 3, the fourth), shrinks it, and writes a file that
    replays the failure with the bug and is safe without it."""
    forget_decisions(monkeypatch)
    report = fuzz(0, 4, budget_s=60, jobs=1, out_dir=tmp_path, max_runs=10, shrink_runs=30)
    assert report.failures, "the fuzzer missed the injected bug"
    assert report.path is not None and report.path.exists()
    assert report.reproduced
    signature = report.failures[0].signature
    assert "safety:integrity" in signature
    shrunk = load_scenario(report.path)
    original = parse_scenario(report.original_text)
    assert len(shrunk.faults) + len(shrunk.byzantine) <= len(original.faults) + len(
        original.byzantine
    )
    assert shrunk.workload.payments <= original.workload.payments
    assert evaluate(shrunk).signature == signature
    monkeypatch.undo()
    assert not any(part.startswith("safety:") for part in evaluate(shrunk).signature)


# --- a NEW-VIEW forgotten on restart (issue 7, section 2) -----------------------------------


def forget_new_view_on_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery keeps the NEW-VIEW only as a message, as the replica once did: its plan is
    not re-installed into the slots, so a restarted backup takes a fresh PRE-PREPARE from the
    primary at a sequence number the NEW-VIEW assigned."""
    monkeypatch.setattr(Recovery, "_recover_new_view", lambda self, raw: None)


def test_new_view_forgotten_on_restart_is_found() -> None:
    """Measured: the shipped scenario restart-storm-new-view (n = 7, within the fault bound)
    finds it at seed 25 (check new_view_kept: a restarted backup prepares the Byzantine
    primary's fork at a sequence number its NEW-VIEW assigned); safe without the bug. It was
    seed 0 until unsolicited catch-up help became one CHECKPOINT or one certificate (the
    scenario now loses those too), then seed 7 until a primary with nothing in flight
    proposed at once (adaptive batching)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        text = (
            Path(__file__).parent.parent / "scenarios" / "restart-storm-new-view.toml"
        ).read_text()
        assert_bug_is_found(monkeypatch, forget_new_view_on_recovery, text, 30, "new_view_kept")


def test_fuzzer_finds_a_new_view_forgotten_on_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fuzzer's own cases at n = 7: restart storms (a Byzantine primary of view 1, up to
    2f one-at-a-time restarts) find the bug. Measured: case seed 33 (the 34th case, the 15th
    with a storm; 24 s). Without the bug, case seeds 0..254 at n = 7 all pass."""
    forget_new_view_on_recovery(monkeypatch)
    for seed in range(45):
        signature = run_case(seed, 7).signature
        if any(part.startswith(("safety:", "exception:")) for part in signature):
            assert "safety:new_view_kept" in signature or "safety:agreement" in signature
            return
    pytest.fail("the fuzzer's first 45 cases at n = 7 missed a NEW-VIEW forgotten on restart")
