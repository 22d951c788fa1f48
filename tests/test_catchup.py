"""Catch-up (pbft/catchup.py): how a replica learns it is behind and what it is sent."""

from __future__ import annotations

import pytest
from replica_harness import Chain, Cluster, executed, send_raws, sends

from pbft.messages import CommitCertificate, Fetch
from pbft.replica import Replica


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def executed_chain(cluster: Cluster, replica: Replica, length: int) -> Chain:
    chain = cluster.chain()
    for seq in range(1, length + 1):
        chain.append([cluster.request(seq, seq)])
        cluster.drive_commit(replica, chain[seq])
    return chain


def test_one_replicas_claim_of_progress_proves_nothing_f_plus_one_claims_do(
    cluster: Cluster,
) -> None:
    catchup = cluster.replica(1).catchup
    catchup.claim_executed(0, 1_000)
    assert catchup.highest_seen_executed == 0
    catchup.claim_executed(2, 7)
    assert catchup.highest_seen_executed == 7  # the lower of the f + 1 highest claims


def test_f_plus_one_matching_commits_show_the_cluster_got_that_far(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.chain().append([cluster.request(1)])
    cluster.deliver(replica, *cluster.commits(entry, [0, 2][: cluster.f + 1]))
    assert replica.catchup.highest_seen_executed == 1
    assert replica.last_executed == 0


def test_a_fetch_is_answered_with_commit_certificates_from_the_seq_it_names(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    executed_chain(cluster, replica, 3)
    actions = cluster.deliver(replica, cluster.fetch(2, from_seq=2))
    certificates = sends(actions, ("replica", 2), CommitCertificate)
    assert len(certificates) == 2 and all(c.replica == 1 for c in certificates)


def test_a_commit_certificate_fills_a_gap_and_the_entries_after_it_execute(
    cluster: Cluster,
) -> None:
    behind = cluster.replica(3)
    ahead = cluster.replica(1)
    chain = executed_chain(cluster, ahead, 2)
    served = cluster.deliver(ahead, cluster.fetch(3, from_seq=1))
    actions = cluster.deliver(behind, *send_raws(served, ("replica", 3)))
    assert [batch.seq for batch in executed(actions)] == [1, 2]
    assert behind.ordering.chain_hash == chain[2].digest


def test_a_replica_fetches_at_most_once_per_retransmit_interval(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    interval = cluster.config.retransmit_interval_ms
    cluster.tick(replica, 0)
    replica.catchup.claim_executed(0, 5)
    replica.catchup.claim_executed(2, 5)
    fetches = []
    for now in range(interval, 3 * interval, 10):
        fetches += [now for _ in sends(cluster.tick(replica, now), None, Fetch)]
    assert fetches == [interval, 2 * interval]
