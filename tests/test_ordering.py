"""Ordering (pbft/ordering.py): the rules of PBFT's normal case, one test per rule."""

from __future__ import annotations

import pytest
from replica_harness import Chain, Cluster, broadcasts, executed

from pbft.context import ReplicaInvariantError
from pbft.messages import Prepare, PrePrepare


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def chain_of(cluster: Cluster, length: int) -> Chain:
    chain = cluster.chain()
    for seq in range(1, length + 1):
        chain.append([cluster.request(seq, seq)])
    return chain


def test_a_commit_certificate_needs_2f_plus_1_matching_commits(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = chain_of(cluster, 1)[1]
    cluster.drive_prepared(replica, entry)  # its own COMMIT is the first of them
    others = [0, 2, 3]
    cluster.deliver(replica, *cluster.commits(entry, others[: cluster.quorum - 2]))
    assert replica.ordering.slots[1].committed is None and replica.last_executed == 0
    actions = cluster.deliver(replica, cluster.commit(others[cluster.quorum - 2], entry))
    committed = replica.ordering.slots[1].committed
    assert committed is not None and len(committed.commits) == cluster.quorum
    assert [batch.seq for batch in executed(actions)] == [1]


def test_a_prepared_certificate_needs_the_pre_prepare_and_2f_matching_prepares(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    entry = chain_of(cluster, 1)[1]
    cluster.deliver(replica, entry.raw)  # its own PREPARE is one of the 2f
    assert cluster.config.prepare_quorum == 2 * cluster.f
    assert not replica.ordering.slots[1].prepared_in_view
    cluster.deliver(replica, cluster.prepare(2, entry))
    assert replica.ordering.slots[1].prepared_in_view


def test_a_backup_prepares_an_entry_only_once_its_predecessor_is_settled(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = chain_of(cluster, 2)
    early = cluster.deliver(replica, chain[2].raw)
    assert broadcasts(early, Prepare) == []  # entry 1 is unknown: the chain rule waits
    cluster.deliver(replica, chain[1].raw)
    assert replica.ordering.slots[2].own_prepare is None  # entry 1 is not prepared yet
    actions = cluster.deliver(replica, *cluster.prepares(chain[1], [2, 3]))
    assert [prepare.seq for prepare in broadcasts(actions, Prepare)] == [2]


def test_committed_entries_execute_strictly_in_sequence_order(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = chain_of(cluster, 2)
    cluster.deliver(replica, chain[1].raw)
    later = cluster.deliver(replica, chain[2].raw)
    assert executed(later) == []
    cluster.deliver(replica, cluster.commit_certificate(chain[2]))
    assert replica.ordering.slots[2].committed is not None and replica.last_executed == 0
    actions = cluster.deliver(replica, cluster.commit_certificate(chain[1]))
    assert [batch.seq for batch in executed(actions)] == [1, 2]
    assert replica.ordering.chain_hash == chain[2].digest


def test_a_replica_never_signs_two_different_votes_of_one_kind_view_and_seq(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = chain_of(cluster, 1)
    cluster.deliver(replica, chain[1].raw)
    slot = replica.ordering.slots[1]
    assert slot.own_prepare is not None
    with pytest.raises(ReplicaInvariantError, match="second prepare"):
        replica.ordering.vote(slot, "prepare", Prepare(0, 1, 1, b"\x07" * 32))


def test_the_primary_proposes_no_further_than_the_watermark_window(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    actions = []
    for request_id in range(1, 2 * cluster.config.watermark_window + 2):
        actions += cluster.deliver(primary, cluster.request(request_id))
    seqs = [proposal.seq for proposal in broadcasts(actions, PrePrepare)]
    high = primary.checkpoints.window_low() + cluster.config.watermark_window
    assert seqs and max(seqs) <= high
