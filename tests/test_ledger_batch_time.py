"""The batch time a replica resumes from after a state transfer or a restart from its stable
checkpoint: the ledger keeps the last executed batch's stamp (in its snapshot), and the
ordering's lower bound for the next stamp reads it there (pbft/ordering.py)."""

from __future__ import annotations

from replica_harness import Cluster, Entry, apply_persists, broadcasts, persists

from pbft.events import Tick
from pbft.ledger import Ledger, Payment
from pbft.messages import Prepare, PrePrepare, Request
from pbft.replica import Replica
from pbft.signed import open_envelope

STAMP = 5_500  # the checkpointed batches' agreed time
CLOCK = 5_000  # every replica's clock: the stamps are within the skew bound of it


def _model(cluster: Cluster, entries: list[Entry]) -> Ledger:
    """The ledger after executing `entries` at their stamps, as a correct replica does."""
    ledger = cluster.genesis_ledger()
    for entry in entries:
        ledger.begin_batch(entry.seq, entry.timestamp_ms)
        for raw in entry.requests:
            opened = open_envelope(raw, cluster.keyring, cluster.cache, Request)
            request = opened.message
            assert isinstance(request, Request)
            payment = Payment(
                request.client_id, request.request_id, request.payer, request.payee, request.amount
            )
            ledger.execute(payment, opened.body_digest, entry.seq)
    return ledger


def _transferred(cluster: Cluster, replica_id: int) -> tuple[Replica, Entry, list]:
    """A replica that jumped to the checkpoint at seq 4 (stamped STAMP) by state transfer."""
    chain = cluster.chain()
    for seq in range(1, 5):
        chain.append([cluster.request(seq)], timestamp_ms=STAMP)
    model = _model(cluster, [chain[seq] for seq in range(1, 5)])
    assert model.batch_time_ms == STAMP
    proof = cluster.checkpoint_proof(4, chain[4].digest, model.digest(), [0, 1, 2])
    replica = cluster.replica(replica_id)
    cluster.tick(replica, CLOCK)
    sender = 1 if replica_id != 1 else 2
    state = cluster.checkpoint_state(4, chain[4].digest, model.snapshot(), proof, sender=sender)
    actions = cluster.deliver(replica, state)
    assert replica.last_executed == 4
    return replica, chain[4], actions


def _next(cluster: Cluster, after: Entry, stamp: int, request_id: int = 5) -> Entry:
    return cluster.pre_prepare(
        5, [cluster.request(request_id)], prev_hash=after.digest, timestamp_ms=stamp
    )


def _refuses_an_earlier_stamp(cluster: Cluster, replica: Replica, last: Entry) -> None:
    assert replica.ordering.timestamp_bounds(5) == (STAMP, None)
    early = _next(cluster, last, STAMP - 100)
    assert broadcasts(cluster.deliver(replica, early.raw), Prepare) == []
    assert replica.drops["bad_timestamp"] == 1
    on_time = _next(cluster, last, STAMP, request_id=6)
    assert [p.seq for p in broadcasts(cluster.deliver(replica, on_time.raw), Prepare)] == [5]


def test_after_a_state_transfer_a_backup_refuses_a_stamp_before_the_checkpoint() -> None:
    cluster = Cluster(max_clock_skew_ms=1_000)
    replica, last, _ = _transferred(cluster, 3)
    _refuses_an_earlier_stamp(cluster, replica, last)


def test_after_a_restart_from_the_checkpoint_a_backup_refuses_an_earlier_stamp() -> None:
    cluster = Cluster(max_clock_skew_ms=1_000)
    _, last, actions = _transferred(cluster, 3)
    records = apply_persists({}, persists(actions))
    assert ("checkpoint",) in records
    restarted = cluster.replica(3, records=records)
    assert restarted.last_executed == 4
    cluster.tick(restarted, CLOCK)
    _refuses_an_earlier_stamp(cluster, restarted, last)


def test_a_primary_after_a_state_transfer_stamps_no_earlier_than_the_checkpoint() -> None:
    cluster = Cluster(max_clock_skew_ms=1_000)
    primary, _, _ = _transferred(cluster, 0)
    primary.handle(Tick(CLOCK + 10, wall_ms=CLOCK))  # its clock is behind the stamps
    (proposed,) = broadcasts(cluster.deliver(primary, cluster.request(5)), PrePrepare)
    assert (proposed.seq, proposed.timestamp_ms) == (5, STAMP)
