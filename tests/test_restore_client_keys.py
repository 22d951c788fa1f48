"""Restoring a snapshot knows how many client keys the cluster has (issue 10's leftover from
the snapshot-bounds review): only requests signed by a client key execute, so a real ledger
has dedup entries for at most that many clients, and a doctored snapshot listing fake ones
(each may own up to its caps in record slots) is refused before anything is sized by its
count, in catch-up and in recovery."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from replica_harness import CLIENT_COUNT, Cluster

from pbft.codec import pack
from pbft.context import ReplicaInvariantError
from pbft.drops import DropReason
from pbft.events import Note, Tick
from pbft.holds import LedgerLimits, slot_bound
from pbft.ledger import Account, Ledger, LedgerSnapshotError, Payment
from pbft.operations import Operation

LIMITS = LedgerLimits(
    max_holds_per_client=3, max_accounts_per_client=1, max_refundable_per_client=2
)
EXECUTED, CLIENTS, SLOT_COUNT = 3, 6, 9


def _ledger(clients: int) -> Ledger:
    """A real ledger: each of `clients` clients authorized once (a record slot each)."""
    accounts = {f"acct-{owner}": Account(owner, 100) for owner in range(clients)}
    ledger = Ledger({**accounts, "shop": Account(clients, 0)}, dedup_window=16, limits=LIMITS)
    ledger.begin_batch(1, 100)
    for owner in range(clients):
        operation = Operation.authorize(f"acct-{owner}", "shop", 5, 1000)
        payment = Payment(
            owner, 1, operation.payer, operation.payee, operation.amount, operation.op,
            operation.ref_client, operation.ref_request, operation.expires_in_ms,
        )  # fmt: skip
        digest = hashlib.sha256(bytes([owner])).digest()
        assert ledger.execute(payment, digest, 1).decision.reason.value == ""
    return ledger


def _with_fake_clients(snapshot: bytes, fakes: int) -> bytes:
    """The snapshot with `fakes` more clients (copies of the first one's decisions under new
    ids) and room for every client at every cap: valid on its own."""
    state = msgpack.unpackb(snapshot)
    first = state[CLIENTS][0]
    top = state[CLIENTS][-1][0]
    state[CLIENTS] += [[top + 1 + i, first[1], first[2]] for i in range(fakes)]
    state[EXECUTED] += fakes * len(first[2])
    state[SLOT_COUNT] = slot_bound(LIMITS, len(state[CLIENTS]))
    return msgpack.packb(state)


def test_a_snapshot_with_more_clients_than_client_keys_is_refused() -> None:
    doctored = _with_fake_clients(_ledger(1).snapshot(), 99)
    # On its own count, restore would size 100 clients' slots for a 1-client cluster ...
    assert len(Ledger.restore(doctored).records) == slot_bound(LIMITS, 100)
    # ... told the cluster's client keys, it refuses before sizing anything.
    with pytest.raises(LedgerSnapshotError, match="100 clients, more than the cluster's 1"):
        Ledger.restore(doctored, LIMITS, max_clients=1)


@pytest.mark.parametrize("clients", [1, 3])
def test_a_real_snapshot_restores_with_its_clusters_client_count(clients: int) -> None:
    snapshot = _ledger(clients).snapshot()
    assert Ledger.restore(snapshot, LIMITS, max_clients=clients).snapshot() == snapshot
    assert Ledger.restore(snapshot, LIMITS, max_clients=clients + 5).snapshot() == snapshot
    with pytest.raises(LedgerSnapshotError, match="client keys"):
        Ledger.restore(snapshot, LIMITS, max_clients=clients - 1)


def test_catch_up_refuses_a_snapshot_with_fake_clients_under_a_real_proof() -> None:
    cluster = Cluster(checkpoint_interval=1)
    first = cluster.chain().append([cluster.request(1)], timestamp_ms=0)
    model = cluster.model_ledger([first])
    proof = cluster.checkpoint_proof(1, first.digest, model.digest(), [0, 2, 3])
    state = msgpack.unpackb(model.snapshot(), raw=False)
    entry = state[CLIENTS][0]
    state[CLIENTS] += [[100 + i, entry[1], entry[2]] for i in range(CLIENT_COUNT)]
    doctored = msgpack.packb(state, use_bin_type=True)
    for snapshot, refused in ((doctored, True), (model.snapshot(), False)):
        victim = cluster.replica(3)
        victim.handle(Tick(10))
        message = cluster.checkpoint_state(
            1, first.digest, snapshot, proof, sender=0, ledger_digest=model.digest()
        )
        actions = cluster.deliver(victim, message)
        if refused:
            assert victim.drops[DropReason.BAD_SNAPSHOT] == 1
            assert victim.ordering.last_executed == 0
            drops = [a.detail for a in actions if isinstance(a, Note) and a.kind == "drop"]
            assert any("more than the cluster's 3 client keys" in drop for drop in drops), drops
        else:
            assert victim.drops[DropReason.BAD_SNAPSHOT] == 0
            assert victim.ordering.last_executed == 1


def test_recovery_refuses_a_stored_checkpoint_with_fake_clients() -> None:
    cluster = Cluster(checkpoint_interval=1)
    first = cluster.chain().append([cluster.request(1)], timestamp_ms=0)
    model = cluster.model_ledger([first])
    proof = cluster.checkpoint_proof(1, first.digest, model.digest(), [0, 1, 2])

    def records(snapshot: bytes) -> dict[tuple[str | int, ...], bytes]:
        return {("checkpoint",): pack([1, first.digest, model.digest(), snapshot, list(proof)])}

    assert cluster.replica(3, records(model.snapshot())).last_executed == 1
    state = msgpack.unpackb(model.snapshot(), raw=False)
    entry = state[CLIENTS][0]
    state[CLIENTS] += [[100 + i, entry[1], entry[2]] for i in range(CLIENT_COUNT)]
    doctored = msgpack.packb(state, use_bin_type=True)
    with pytest.raises(ReplicaInvariantError, match="client keys"):
        cluster.replica(3, records(doctored))
