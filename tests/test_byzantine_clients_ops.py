"""The Byzantine client that abuses holds and payments (sim.adversary.AbuseHolds): what it
sends for each kind on hand-made requests, and that the replicas refuse every abuse with
its reason in the shipped scenarios."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.client import ClientAction, ClientCore, Decided
from pbft.config import ClusterConfig
from pbft.events import Send
from pbft.messages import Request
from pbft.operations import Operation
from pbft.signed import open_envelope
from sim.adversary import AbuseHolds, build_client_behavior
from sim.scenario import load_scenario
from sim.simulator import Simulation
from sim.workload import genesis_accounts

SEED = 5
CONFIG = ClusterConfig()
CLIENTS = 4
# Client 0 owns acct-00000 and acct-00004; client 1 owns acct-00001 and acct-00005.
ACCOUNTS = genesis_accounts(8, CLIENTS, 1000)
KEYS = [SigningKey.derive(SEED, f"client/{client}") for client in range(CLIENTS)]
KEYRING = KeyRing({("client", client): key.verify_key for client, key in enumerate(KEYS)})
HOLD = (2, 7)
ROOT = Path(__file__).resolve().parent.parent


def abuser(kind: str) -> AbuseHolds:
    built = build_client_behavior(
        "abuse_holds", 0, KEYS[0], config=CONFIG, accounts=ACCOUNTS, params={"kind": kind}
    )
    assert isinstance(built, AbuseHolds)
    return built


def core() -> ClientCore:
    return ClientCore(0, CONFIG, KEYS[0], KEYRING, cluster_id=bytes(32))


def sent(actions: Sequence[ClientAction]) -> list[Request]:
    """The requests sent, one per replica each, opened as a replica would."""
    requests = []
    for action in actions:
        assert isinstance(action, Send)
        message = open_envelope(action.data, KEYRING, VerificationCache(), Request).message
        assert isinstance(message, Request)
        requests.append(message)
    return requests


def after(kind: str, operation: Operation, outcome: str = "confirmed") -> list[Request]:
    """What the abuser sends once its own `operation` (request 3) is decided."""
    behavior = abuser(kind)
    submitted = core().submit_operation(3, operation)
    assert behavior.actions(submitted, 0) == submitted
    decision = Decided(0, 3, outcome, "", 9, None)
    out = behavior.actions([decision], 10)
    assert out[0] is decision
    requests = sent(out[1:])
    # Each abuse goes to every replica, the same request to each.
    assert len(requests) in (0, CONFIG.replica_count)
    return requests[:1]


def test_capture_twice_captures_the_same_hold_again_under_its_own_id() -> None:
    (abuse,) = after("capture_twice", Operation.capture(HOLD, 30))
    assert (abuse.op, abuse.ref_client, abuse.ref_request, abuse.amount) == ("capture", *HOLD, 30)
    assert (abuse.client_id, abuse.request_id) == (0, AbuseHolds.OWN_ID_BASE)


def test_void_after_capture_voids_the_captured_hold() -> None:
    (abuse,) = after("void_after_capture", Operation.capture(HOLD, 30))
    assert (abuse.op, abuse.ref_client, abuse.ref_request, abuse.amount) == ("void", *HOLD, 0)


def test_refund_more_refunds_one_more_than_the_capture_paid() -> None:
    (abuse,) = after("refund_more", Operation.capture(HOLD, 30))
    assert (abuse.op, abuse.ref_client, abuse.ref_request, abuse.amount) == ("refund", *HOLD, 31)


def test_capture_others_hold_captures_its_own_authorization_of_another_clients_payee() -> None:
    (abuse,) = after(
        "capture_others_hold", Operation.authorize("acct-00000", "acct-00001", 40, 900)
    )
    assert (abuse.op, abuse.ref_client, abuse.ref_request, abuse.amount) == ("capture", 0, 3, 40)
    # A hold whose payee it owns itself is its own to capture: no abuse.
    assert (
        after("capture_others_hold", Operation.authorize("acct-00000", "acct-00004", 40, 900)) == []
    )


@pytest.mark.parametrize("kind", AbuseHolds.KINDS)
def test_nothing_follows_a_refusal_or_an_operation_it_does_not_abuse(kind: str) -> None:
    assert after(kind, Operation.capture(HOLD, 30), outcome="rejected") == []
    assert after(kind, Operation.transfer("acct-00000", "acct-00001", 5)) == []
    assert after(kind, Operation.void(HOLD)) == []


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="abuse_holds kind must be one of"):
        abuser("steal_everything")


# --- what the replicas did with the abuses --------------------------------------------------


@pytest.mark.parametrize("kind", AbuseHolds.KINDS)
def test_every_abuse_is_refused_with_its_reason_by_every_correct_replica(kind: str) -> None:
    path = ROOT / "scenarios" / f"ops-byzantine-client-{kind.replace('_', '-')}.toml"
    scenario = load_scenario(path)
    simulation = Simulation(scenario)
    result = simulation.run()
    assert result.verdict == "ok", result.summary()["check_details"]
    behavior = simulation.client_behaviors[0]
    assert isinstance(behavior, AbuseHolds) and behavior.kind == kind
    assert behavior.abuses >= 3, "the workload gave the abuser too few chances"
    decided: dict[int, set[tuple[str, str]]] = {}
    for replica in sorted(simulation.observed.correct):
        executions = simulation.observed.executed_requests.get(replica, {})
        for (client, request_id), records in executions.items():
            if client == 0 and request_id >= AbuseHolds.OWN_ID_BASE:
                for _, record in records:
                    decided.setdefault(request_id, set()).add((record.outcome, record.reason))
    # The abuses were ordered (one sent as the run ends may not be) and refused alike.
    assert 3 <= len(decided) <= behavior.abuses
    expected = ("rejected", AbuseHolds.EXPECTED_REASONS[kind])
    assert all(outcomes == {expected} for outcomes in decided.values()), decided
