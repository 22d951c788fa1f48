"""Checkpoints and the watermark window (pbft/checkpoints.py), one test per rule."""

from __future__ import annotations

import pytest
from replica_harness import Chain, Cluster, notes

from pbft.events import NoteKind
from pbft.replica import Replica


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def executed_chain(cluster: Cluster, replica: Replica, length: int) -> Chain:
    chain = cluster.chain()
    for seq in range(1, length + 1):
        chain.append([cluster.request(seq, seq)])
    for seq in range(1, length + 1):
        cluster.drive_commit(replica, chain[seq])
    assert replica.last_executed == length
    return chain


def test_a_replica_signs_a_checkpoint_every_checkpoint_interval_entries(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    interval = cluster.config.checkpoint_interval
    chain = executed_chain(cluster, replica, interval - 1)
    assert replica.checkpoints.own_snapshots == {}
    cluster.drive_commit(replica, chain.append([cluster.request(interval, interval)]))
    assert list(replica.checkpoints.own_snapshots) == [interval]
    own = replica.checkpoints.checkpoint_votes[interval][replica.id]
    assert own[:2] == (chain[interval].digest, replica.ledger.digest())


def test_a_checkpoint_becomes_stable_with_a_quorum_of_matching_votes_and_no_fewer(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    seq = cluster.config.checkpoint_interval
    chain = executed_chain(cluster, replica, seq)
    digest = replica.ledger.digest()
    for voter in [0, 2][: cluster.quorum - 2]:  # with our own: one short of a quorum
        cluster.deliver(replica, cluster.checkpoint(seq, voter, chain[seq].digest, digest))
    assert replica.stable.seq == 0
    actions = cluster.deliver(replica, cluster.checkpoint(seq, 3, chain[seq].digest, digest))
    assert replica.stable.seq == seq
    assert [note.kind for note in notes(actions, "checkpoint_stable")] == [
        NoteKind.CHECKPOINT_STABLE
    ]


def test_a_stable_checkpoint_moves_the_window_and_discards_the_log_below_it(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    seq = cluster.config.checkpoint_interval
    chain = executed_chain(cluster, replica, seq)
    assert replica.checkpoints.window_low() == 0
    digest = replica.ledger.digest()
    cluster.deliver(replica, *cluster.checkpoint_proof(seq, chain[seq].digest, digest, [0, 2]))
    assert replica.checkpoints.window_low() == seq
    assert all(slot_seq > seq for slot_seq in replica.ordering.slots)
    # Below the window now: dropped before its signature is even checked.
    cluster.deliver(replica, cluster.prepare(2, chain[seq]))
    assert replica.drops["stale"] == 1


def test_the_window_refuses_entries_beyond_low_plus_watermark_window(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    high = cluster.config.watermark_window
    inside = cluster.pre_prepare(high, [cluster.request(1)])
    beyond = cluster.pre_prepare(high + 1, [cluster.request(2)])
    cluster.deliver(replica, inside.raw, beyond.raw)
    assert high in replica.ordering.slots and high + 1 not in replica.ordering.slots
    assert replica.drops["above_window"] == 1


def test_state_that_differs_from_a_quorums_checkpoint_halts_the_replica(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    seq = cluster.config.checkpoint_interval
    chain = executed_chain(cluster, replica, seq)
    other_state = b"\x66" * 32
    actions = cluster.deliver(
        replica, *cluster.checkpoint_proof(seq, chain[seq].digest, other_state, [0, 2, 3])
    )
    assert replica.halted is not None and "diverged" in replica.halted
    assert notes(actions, "halt")
