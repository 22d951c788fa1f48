"""A snapshot or a state transfer from a Byzantine replica never sizes an allocation by a
count it claims: the record slot count is bounded by the clients it carries times the
per-client caps (pbft/holds.py slot_bound), and a catching-up replica refuses record limits
other than its cluster's before anything is sized by them."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from replica_harness import Cluster

from pbft.drops import DropReason
from pbft.events import Tick
from pbft.holds import MAX_SLOTS, MIN_RECORD_ROW_BYTES, LedgerLimits, slot_bound
from pbft.ledger import MAX_SNAPSHOT_SIZE_BYTES, Account, Ledger, LedgerSnapshotError, Payment
from pbft.ledger_leaves import LedgerBuilder
from pbft.operations import Operation

ALICE, SHOP = 2, 1
LIMITS = LedgerLimits(
    max_holds_per_client=3, max_accounts_per_client=1, max_refundable_per_client=2
)
PER_CLIENT = 3 + 2 + 1
SLOT_COUNT, ROWS, CLIENTS, LIMITS_ROW = 9, 10, 6, 7


def _one_client_ledger() -> Ledger:
    ledger = Ledger(
        {"alice": Account(ALICE, 100), "shop": Account(SHOP, 0)}, dedup_window=16, limits=LIMITS
    )
    ledger.begin_batch(1, 100)
    operation = Operation.authorize("alice", "shop", 5, 1000)
    payment = Payment(
        ALICE, 1, operation.payer, operation.payee, operation.amount, operation.op,
        operation.ref_client, operation.ref_request, operation.expires_in_ms,
    )  # fmt: skip
    assert ledger.execute(payment, hashlib.sha256(b"1").digest(), 1).decision.reason.value == ""
    return ledger


def _doctored(slot_count: int) -> bytes:
    state = msgpack.unpackb(_one_client_ledger().snapshot())
    assert len(state[CLIENTS]) == 1 and state[SLOT_COUNT] == 1
    state[SLOT_COUNT] = slot_count
    return msgpack.packb(state)


def test_max_slots_fits_the_snapshot_size_limit() -> None:
    assert MAX_SLOTS * MIN_RECORD_ROW_BYTES <= MAX_SNAPSHOT_SIZE_BYTES
    assert slot_bound(LIMITS, 1) == PER_CLIENT
    assert slot_bound(LedgerLimits(refund_window_ms=0), 2) == 2 * (256 + 16)
    assert slot_bound(LedgerLimits(max_holds_per_client=10**6), 10**6) == MAX_SLOTS


@pytest.mark.parametrize("slot_count", [PER_CLIENT + 1, 2**26, 2**32])
def test_a_slot_count_beyond_every_client_at_every_cap_is_refused(slot_count: int) -> None:
    data = _doctored(slot_count)
    assert len(data) < 200
    with pytest.raises(LedgerSnapshotError, match="slot count"):
        Ledger.restore(data)


def test_a_slot_count_of_every_client_at_every_cap_restores() -> None:
    ledger = Ledger.restore(_doctored(PER_CLIENT))
    assert len(ledger.records) == PER_CLIENT


def test_restore_with_the_clusters_limits_refuses_other_limits() -> None:
    snapshot = _one_client_ledger().snapshot()
    assert Ledger.restore(snapshot, LIMITS).snapshot() == snapshot
    state = msgpack.unpackb(snapshot)
    state[LIMITS_ROW][1] = 10**6  # max_holds_per_client
    looser = msgpack.packb(state)
    Ledger.restore(looser)  # valid on its own ...
    with pytest.raises(LedgerSnapshotError, match="not the cluster's"):
        Ledger.restore(looser, LIMITS)  # ... but not this cluster's


def test_state_transfer_refuses_record_leaves_beyond_the_slot_bound() -> None:
    ledger = _one_client_ledger()
    leaves = ledger.leaves(0, ledger.leaf_count())
    free = msgpack.packb(["free"])
    builder = LedgerBuilder()
    for leaf in [*leaves, *[free] * (PER_CLIENT - 1)]:
        builder.add(leaf)
    assert len(builder.finish().records) == PER_CLIENT
    builder = LedgerBuilder()
    for leaf in [*leaves, *[free] * (PER_CLIENT - 1)]:
        builder.add(leaf)
    with pytest.raises(LedgerSnapshotError, match="record slots"):
        builder.add(free)


def test_a_replica_drops_and_counts_a_doctored_snapshot_under_a_real_proof() -> None:
    cluster = Cluster(checkpoint_interval=1)
    first = cluster.chain().append([cluster.request(1)], timestamp_ms=0)
    model = cluster.model_ledger([first])
    proof = cluster.checkpoint_proof(1, first.digest, model.digest(), [0, 2, 3])
    state = msgpack.unpackb(model.snapshot(), raw=False)
    state[SLOT_COUNT] = 2**32
    bad = msgpack.packb(state, use_bin_type=True)
    message = cluster.checkpoint_state(
        1, first.digest, bad, proof, sender=0, ledger_digest=model.digest()
    )
    victim = cluster.replica(3)
    victim.handle(Tick(10))
    cluster.deliver(victim, message)
    assert victim.drops[DropReason.BAD_SNAPSHOT] == 1
    assert victim.ordering.last_executed == 0
