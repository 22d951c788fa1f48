"""Recovery from storage (pbft/recovery.py): a replica rebuilt from its records."""

from __future__ import annotations

from replica_harness import Cluster, apply_persists

from pbft.events import Action
from pbft.status import ViewStatus


def test_a_rebuilt_replica_has_the_executed_state_and_re_sends_nothing() -> None:
    cluster = Cluster()
    replica = cluster.replica(1)
    records: dict[tuple[str | int, ...], bytes] = {}
    chain = cluster.chain()
    for seq in (1, 2):
        chain.append([cluster.request(seq, seq)])
        apply_persists(records, cluster.drive_commit(replica, chain[seq]))
    restarted = cluster.replica(1, records)
    assert restarted.outbox == []
    assert (restarted.last_executed, restarted.ordering.chain_hash) == (2, chain[2].digest)
    assert restarted.ledger.digest() == replica.ledger.digest()


def test_a_replica_that_restarts_mid_view_change_is_still_changing_view() -> None:
    cluster = Cluster()
    replica = cluster.replica(2)
    records: dict[tuple[str | int, ...], bytes] = {}
    actions: list[Action] = cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    apply_persists(records, actions)
    restarted = cluster.replica(2, records)
    assert (restarted.view, restarted.status) == (1, ViewStatus.VIEW_CHANGE)
    assert restarted.viewchanges.own_view_change == replica.viewchanges.own_view_change


def test_own_votes_are_recovered_so_a_restart_cannot_sign_a_conflicting_one() -> None:
    cluster = Cluster()
    replica = cluster.replica(1)
    records: dict[tuple[str | int, ...], bytes] = {}
    entry = cluster.chain().append([cluster.request(1)])
    apply_persists(records, cluster.deliver(replica, entry.raw))
    restarted = cluster.replica(1, records)
    assert restarted.ordering.slots[1].own_votes[("prepare", 0)] == entry.digest
