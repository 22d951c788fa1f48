"""Byzantine clients (sim.adversary's client behaviours): each rewrite of a client core's
actions on hand-made requests, the checkers' rule for a Byzantine client's extra requests,
and what the correct replicas did with them in the shipped scenarios."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.client import ClientAction, ClientCore, Decided
from pbft.config import ClusterConfig
from pbft.events import ExecutedRequest, Send
from pbft.ledger import Ledger, Payment
from pbft.messages import Request
from pbft.signed import open_envelope
from sim import adversary as byzantine
from sim.adversary import ClientBehavior, build_client_behavior
from sim.checkers import SAFETY_CHECKS, Observations, check_receipts, check_validity
from sim.scenario import load_scenario
from sim.simulator import Simulation
from sim.workload import genesis_accounts

SEED = 31
CONFIG = ClusterConfig()
CLIENTS = 4
ACCOUNTS = genesis_accounts(8, CLIENTS, 1000)
TOTAL = sum(account.balance for account in ACCOUNTS.values())
CLIENT_KEYS = [SigningKey.derive(SEED, f"client/{client}") for client in range(CLIENTS)]
KEYRING = KeyRing()
for _client, _key in enumerate(CLIENT_KEYS):
    KEYRING.add(("client", _client), _key.verify_key)
ROOT = Path(__file__).resolve().parent.parent
# No replica answers these cores (the key ring holds no replica keys): any id will do.
CLUSTER_ID = bytes(32)


def client_behavior(name: str, client: int = 0, **kwargs: object) -> ClientBehavior:
    params = kwargs.pop("params", None)
    return build_client_behavior(
        name,
        client,
        CLIENT_KEYS[client],
        config=CONFIG,
        accounts=ACCOUNTS,
        params=params,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def core(client: int = 0) -> ClientCore:
    return ClientCore(client, CONFIG, CLIENT_KEYS[client], KEYRING, cluster_id=CLUSTER_ID)


def requests_in(actions: Sequence[ClientAction]) -> list[tuple[int, Request]]:
    """(replica, request) for each Send, opened as a replica would (the client's signature)."""
    out = []
    for action in actions:
        assert isinstance(action, Send)
        message = open_envelope(action.data, KEYRING, VerificationCache(), Request).message
        assert isinstance(message, Request)
        out.append((action.to[1], message))
    return out


def decided(request_id: int, client: int = 0) -> Decided:
    return Decided(client, request_id, "confirmed", "", 3, None)


# --- the rewrites ---------------------------------------------------------------------------


def test_reuse_request_id_after_decision_sends_two_other_bodies_to_the_two_halves() -> None:
    liar = client_behavior("reuse_request_id")
    client = core()
    submitted = client.submit(5, "acct-00000", "acct-00001", 10)
    assert liar.actions(submitted, 0) == submitted  # nothing extra before the decision
    outcome = decided(5)
    out = liar.actions([outcome], 20)
    assert out[0] is outcome
    sent = requests_in(out[1:])
    assert [replica for replica, _ in sent] == [0, 1, 2, 3]
    first, second = sent[0][1], sent[2][1]
    assert sent[1][1] == first and sent[3][1] == second and first != second
    original = Request(0, 5, "transfer", "acct-00000", "acct-00001", 10)
    for other in (first, second):
        assert (other.client_id, other.request_id, other.payer) == (0, 5, "acct-00000")
        assert other != original and other.amount <= 12
    # A decision for a request it never saw, or outside its window: nothing.
    assert liar.actions([decided(9)], 30) == [decided(9)]
    timed = client_behavior("reuse_request_id", until_ms=10)
    timed.actions(submitted, 0)
    assert timed.actions([outcome], 10) == [outcome]


def test_reuse_request_id_concurrent_races_unpayable_bodies_through_the_backups() -> None:
    liar = client_behavior("reuse_request_id", params={"kind": "concurrent"})
    client = core()
    submitted = client.submit(5, "acct-00000", "acct-00001", 10)
    out = liar.actions(submitted, 0)
    assert out[0] == submitted[0]
    sent = requests_in(out[1:])
    assert [replica for replica, _ in sent] == [1, 2, 3]  # not the primary it went to
    bodies = {message for _, message in sent}
    assert len(bodies) == 2
    for other in bodies:
        assert (other.client_id, other.request_id) == (0, 5)
        assert other.amount > TOTAL  # can never be confirmed
    # The core's retransmissions of the same request add nothing.
    assert liar.actions(submitted, 500) == submitted
    assert liar.actions([decided(5)], 600) == [decided(5)]


def test_replay_resends_earlier_requests_byte_for_byte() -> None:
    replayer = client_behavior("replay")
    assert isinstance(replayer, byzantine.ClientReplay)
    client = core()
    first = client.submit(1, "acct-00000", "acct-00001", 10)
    assert replayer.actions(first, 0) == first
    second = client.submit(2, "acct-00000", "acct-00001", 11)
    out = replayer.actions(second, 10)
    assert out[0] == second[0]
    assert out[1:] == [Send(("replica", replica), first[0].data) for replica in range(4)]  # type: ignore[union-attr]
    for request_id in range(3, 100):
        out = replayer.actions(client.submit(request_id, "acct-00000", "acct-00001", 1), request_id)
        assert len(out) == 5
        client.outstanding.clear()
    assert len(replayer.sent) == byzantine.ClientReplay.REMEMBERED


def test_steal_signs_payments_out_of_accounts_the_client_does_not_own() -> None:
    thief = client_behavior("steal", 1)
    client = core(1)
    ledger = Ledger(ACCOUNTS, CONFIG.dedup_window)
    payers = []
    for request_id in range(1, 9):
        submitted = client.submit(request_id, "acct-00001", "acct-00002", 5)
        out = thief.actions(submitted, request_id)
        assert out[0] == submitted[0]
        sent = requests_in(out[1:])
        assert [replica for replica, _ in sent] == [0, 1, 2, 3]
        theft = sent[0][1]
        assert all(message == theft for _, message in sent)
        assert theft.client_id == 1 and theft.request_id >= ClientBehavior.OWN_ID_BASE
        assert ACCOUNTS[theft.payer].owner != 1 and ACCOUNTS[theft.payee].owner == 1
        payers.append(theft.payer)
        payment = Payment(1, theft.request_id, theft.payer, theft.payee, theft.amount)
        body = hashlib.sha256(theft.encode()).digest()
        result = ledger.execute(payment, body, request_id)
        assert (result.decision.outcome.value, result.decision.reason.value) == (
            "rejected",
            "unauthorized",
        )
    assert set(payers) == {name for name, account in ACCOUNTS.items() if account.owner != 1}
    assert len(thief.extra) == 8


# --- the checkers' rule ---------------------------------------------------------------------


def record(request_id: int, digest: bytes, outcome: str, reason: str) -> ExecutedRequest:
    return ExecutedRequest(
        0, request_id, digest, "a", "b", 1, outcome, reason, True, "transfer", 0, 0, 0, ()
    )


@pytest.mark.parametrize(
    ("byzantine_clients", "outcome", "reason", "ok"),
    [
        (frozenset({0}), "rejected", "id_reused", True),
        (frozenset({0}), "rejected", "unauthorized", True),
        (frozenset({0}), "confirmed", "", False),
        (frozenset(), "rejected", "id_reused", False),
    ],
)
def test_validity_lets_a_byzantine_clients_other_requests_be_rejected_only(
    byzantine_clients: frozenset[int], outcome: str, reason: str, ok: bool
) -> None:
    submitted = b"\x01" * 32
    other = b"\x02" * 32
    observed = Observations(
        correct=frozenset({1}),
        initial_total=0,
        submitted={(0, 1): submitted},
        byzantine_clients=byzantine_clients,
    )
    observed.executed_requests[1] = {
        (0, 1): [
            (1, record(1, submitted, "confirmed", "")),
            (2, record(1, other, outcome, reason)),
        ],
        (0, 99): [(3, record(99, other, outcome, reason))],
    }
    assert check_validity(observed).ok is ok


def test_receipts_are_compared_with_the_submitted_body_only_for_a_byzantine_client() -> None:
    """A Byzantine client's other body, executed (rejected) under the id of its submitted
    payment, is not what the submitted payment's receipt speaks about."""
    scenario = load_scenario(
        ROOT / "scenarios" / "byzantine-client-reuse-request-id-concurrent.toml"
    )
    simulation = Simulation(scenario)
    result = simulation.run()
    assert result.checks["receipts"].ok
    observed = simulation.observed
    # Without the rule, the race the other bodies won would count as receipt mismatches.
    stripped = Observations(
        correct=observed.correct,
        initial_total=observed.initial_total,
        executed_requests=observed.executed_requests,
        submitted=observed.submitted,
        decided=observed.decided,
    )
    assert not check_receipts(stripped, simulation.keyring, simulation.cluster_id).ok


# --- what the correct replicas did, in the shipped scenarios ----------------------------------


def run_shipped(name: str) -> tuple[Simulation, ClientBehavior]:
    simulation = Simulation(load_scenario(ROOT / "scenarios" / f"{name}.toml"))
    result = simulation.run()
    assert result.verdict == "ok", result.summary()["check_details"]
    assert all(result.checks[check].ok for check in SAFETY_CHECKS)
    assert result.undecided == 0
    return simulation, simulation.client_behaviors[0]


def other_bodies(simulation: Simulation, client: int = 0) -> dict[int, list[ExecutedRequest]]:
    """Per correct replica: what it executed of the client's requests it never submitted."""
    observed = simulation.observed
    out: dict[int, list[ExecutedRequest]] = {}
    for replica in sorted(observed.correct):
        for payment, executions in observed.executed_requests.get(replica, {}).items():
            for _, executed in executions:
                if payment[0] == client and observed.submitted.get(payment) != (
                    executed.request_digest
                ):
                    out.setdefault(replica, []).append(executed)
    return out


def test_reused_ids_after_the_decision_are_refused_as_id_reused_everywhere() -> None:
    simulation, liar = run_shipped("byzantine-client-reuse-request-id")
    assert len(liar.extra) > 50
    others = other_bodies(simulation)
    assert set(others) == set(simulation.observed.correct)
    for executions in others.values():
        assert executions
        assert {(e.outcome, e.reason) for e in executions} == {("rejected", "id_reused")}
    # Every submitted payment of client 0 kept its outcome and its receipt.
    for payment, outcome in simulation.observed.decided.items():
        if payment[0] == 0:
            assert outcome.receipt is not None and outcome.reason != "id_reused"


def test_reused_ids_racing_the_original_never_confirm_anything_unsubmitted() -> None:
    simulation, _ = run_shipped("byzantine-client-reuse-request-id-concurrent")
    others = other_bodies(simulation)
    assert others
    won = set()
    for executions in others.values():
        for executed in executions:
            assert executed.outcome == "rejected"
            assert executed.reason in ("insufficient_funds", "id_reused")
            if executed.reason == "insufficient_funds":
                won.add(executed.request_id)
    # Some other bodies won the race: those submitted payments were refused as id_reused,
    # with a receipt, and everywhere the same way.
    assert won
    for request_id in won:
        outcome = simulation.observed.decided[(0, request_id)]
        assert (outcome.outcome, outcome.reason) == ("rejected", "id_reused")
        assert outcome.receipt is not None


def test_stolen_payments_are_rejected_as_unauthorized_at_every_correct_replica() -> None:
    simulation, thief = run_shipped("byzantine-client-steal")
    thefts = {request_id for request_id, _ in thief.extra}
    assert len(thefts) > 20
    observed = simulation.observed
    for replica in sorted(observed.correct):
        executed = observed.executed_requests[replica]
        for request_id in thefts:
            fresh = [e for _, e in executed[(0, request_id)] if e.fresh]
            assert [(e.outcome, e.reason) for e in fresh] == [("rejected", "unauthorized")]


def test_replayed_requests_take_effect_once() -> None:
    simulation, replayer = run_shipped("byzantine-client-replay")
    assert isinstance(replayer, byzantine.ClientReplay) and replayer.replayed > 20
    assert other_bodies(simulation) == {}
    observed = simulation.observed
    for replica in sorted(observed.correct):
        for payment, executions in observed.executed_requests[replica].items():
            if payment[0] == 0:
                assert sum(executed.fresh for _, executed in executions) == 1
