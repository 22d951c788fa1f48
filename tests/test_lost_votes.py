"""A replica whose store repaired its last batch (`lost_votes=True`) must not vote again in
the view it crashed in: votes of that batch may have left before the batch was lost, and
signing again there could contradict them (equivocation, a Byzantine fault)."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_harness import (
    Cluster,
    Network,
    apply_persists,
    broadcasts,
    persists,
)

from pbft.events import Action, MessageReceived, Tick
from pbft.messages import Commit, NewView, Prepare, PrePrepare
from pbft.replica import Replica
from pbft.status import ViewStatus
from runtime.storage import DurableStore


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def restart(cluster: Cluster, replica_id: int, records: dict, *, lost_votes: bool) -> Replica:
    return Replica(
        replica_id,
        cluster.config,
        cluster.replica_keys[replica_id],
        cluster.keyring,
        cluster.accounts,
        records=dict(records),
        lost_votes=lost_votes,
    )


def lose_the_last_batch(cluster: Cluster) -> tuple[dict, Prepare, Replica]:
    """Replica 3 commits seq 1, then prepares entry A at seq 2 and sends that PREPARE; the
    batch holding it is lost. Returns the records before it, the PREPARE it sent, and the
    replica from before the crash."""
    replica = cluster.replica(3)
    records: dict = {}
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    apply_persists(records, persists(cluster.drive_commit(replica, first)))
    assert replica.last_executed == 1
    entry_a = chain.append([cluster.request(2)])
    sent = broadcasts(cluster.deliver(replica, entry_a.raw), Prepare)
    assert [vote.entry_digest for vote in sent] == [entry_a.digest]
    return records, sent[0], replica


def test_without_the_rule_a_lost_prepare_becomes_equivocation(cluster: Cluster) -> None:
    # The problem: restarted from the records without the lost batch, replica 3 prepares a
    # conflicting PRE-PREPARE (from a Byzantine primary) at the same view and seq.
    records, sent, _ = lose_the_last_batch(cluster)
    entry_b = cluster.pre_prepare(
        2, [cluster.request(3)], prev_hash=cluster.chain().append([cluster.request(1)]).digest
    )
    restarted = restart(cluster, 3, records, lost_votes=False)
    again = broadcasts(cluster.deliver(restarted, entry_b.raw), Prepare)
    assert [(vote.view, vote.seq) for vote in again] == [(sent.view, sent.seq)]
    assert again[0].entry_digest != sent.entry_digest  # two signed votes, one slot


def test_a_replica_that_lost_votes_does_not_sign_in_the_view_it_crashed_in(
    cluster: Cluster,
) -> None:
    records, _, _ = lose_the_last_batch(cluster)
    entry_b = cluster.pre_prepare(
        2, [cluster.request(3)], prev_hash=cluster.chain().append([cluster.request(1)]).digest
    )
    restarted = restart(cluster, 3, records, lost_votes=True)
    assert restarted.silent_through_view == 0
    actions = cluster.deliver(restarted, entry_b.raw, *cluster.prepares(entry_b, [1, 2]))
    actions += cluster.deliver(restarted, *cluster.commits(entry_b, [0, 1, 2]))
    assert broadcasts(actions, Prepare) == [] and broadcasts(actions, Commit) == []
    assert restarted.halted is None


def sent_by(network: Network, replica_id: int) -> list[Action]:
    """Record every action the replica returns from now on."""
    log: list[Action] = []
    core = network.replicas[replica_id]
    handle = core.handle

    def recording(event: MessageReceived | Tick) -> list[Action]:
        actions = handle(event)
        log.extend(actions)
        return actions

    core.handle = recording  # type: ignore[method-assign]
    return log


def test_it_follows_by_catch_up_and_votes_again_after_another_replicas_new_view(
    cluster: Cluster,
) -> None:
    network = Network(cluster, client_ids=(0,))
    for request_id in range(1, 4):
        network.submit(0, request_id, "alice", "carol", 10)
    network.run()
    network.replicas[3] = restart(cluster, 3, network.records[3], lost_votes=True)
    log = sent_by(network, 3)
    for request_id in range(4, 7):
        network.submit(0, request_id, "alice", "carol", 10)
    network.advance(600)
    assert len(network.decided) == 6
    # Silent in view 0, and still caught up with the others.
    assert not [m for m in broadcasts(log) if isinstance(m, Prepare | Commit | PrePrepare)]
    assert network.replicas[3].last_executed == network.replicas[0].last_executed
    assert network.replicas[3].ledger.digest() == network.replicas[0].ledger.digest()
    # The primary of view 0 goes away: view 1's primary (replica 1) makes the NEW-VIEW.
    network.down.add(0)
    network.submit(0, 7, "alice", "carol", 10)
    network.advance(5000)
    assert network.replicas[3].view >= 1
    assert network.replicas[3].silent_through_view is None
    votes = [m for m in broadcasts(log) if isinstance(m, Prepare | Commit)]
    assert votes and all(vote.view >= 1 for vote in votes)
    assert len(network.decided) == 7


def test_a_lost_primary_does_not_sign_a_new_view_or_pre_prepare(cluster: Cluster) -> None:
    # Replica 1 is the primary of view 1; if it lost its last batch in view 1 it must
    # neither propose nor send a second NEW-VIEW there: it waits for view 2.
    network = Network(cluster, client_ids=(0,))
    network.submit(0, 1, "alice", "carol", 10)
    network.run()
    network.down.add(0)
    network.submit(0, 2, "alice", "carol", 10)
    network.advance(3000)
    assert network.replicas[1].view == 1
    assert network.replicas[1].status is ViewStatus.NORMAL
    network.replicas[1] = restart(cluster, 1, network.records[1], lost_votes=True)
    log = sent_by(network, 1)
    network.submit(0, 3, "alice", "carol", 10)
    network.advance(12000)
    signed_in_view_1 = [
        m
        for m in broadcasts(log)
        if isinstance(m, Prepare | Commit | PrePrepare | NewView) and m.view == 1
    ]
    assert signed_in_view_1 == []
    assert network.replicas[1].view >= 2


def test_a_repaired_store_reports_it_for_the_driver(tmp_path: Path) -> None:
    # The driver's side of the rule: the flag comes from the store's recovery report.
    log = tmp_path / "replica.log"
    with DurableStore.open(log) as store:
        store.apply([(("view",), b"1")])
        store.apply([(("view",), b"2")])
    data = log.read_bytes()
    log.write_bytes(data[:-3])
    with DurableStore.open(log) as store:
        assert store.recovery_report.repaired
    with DurableStore.open(log) as store:
        assert not store.recovery_report.repaired
