"""A NEW-VIEW survives a restart (issue 7, section 2).

The hole: a backup that restarted while view v was active kept v's NEW-VIEW only as a
message and rebuilt its slots only from its own pre-prepares. At a sequence number the
NEW-VIEW re-proposed but where the backup had not prepared yet (the chain rule held it back
behind s - 1), it accepted a fresh PRE-PREPARE from v's primary. A Byzantine primary of v
plus one-at-a-time restarts of 2f backups then commits a second batch at a sequence number
a correct replica had already executed in an earlier view.
"""

from __future__ import annotations

from replica_harness import (
    Cluster,
    apply_persists,
    broadcasts,
    notes,
)

from pbft.messages import Prepare
from pbft.status import ViewStatus


def _new_view_with_two_reproposals(cluster: Cluster):  # type: ignore[no-untyped-def]
    """View 0 prepared entries 1 and 2 at replicas 0, 2, 3; view 1's NEW-VIEW (primary 1)
    re-proposes both. Returns (NEW-VIEW raw, the view-1 re-proposals, view-0 entries)."""
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    certificates = [cluster.prepared_certificate(entry, [2, 3]) for entry in (first, second)]
    changes = [cluster.view_change(1, replica, certificates) for replica in (1, 2, 3)]
    # The re-proposals in view 1: same batches, re-chained from genesis (same digests).
    again = cluster.chain()
    reproposed = [
        again.append(first.requests, view=1),
        again.append(second.requests, view=1),
    ]
    raw = cluster.new_view(1, changes, [entry.raw for entry in reproposed])
    return raw, reproposed


def test_restarted_backup_refuses_a_fork_at_a_sequence_the_new_view_assigned() -> None:
    cluster = Cluster()
    new_view, (first, second) = _new_view_with_two_reproposals(cluster)
    backup = cluster.replica(2)
    actions = cluster.deliver(backup, new_view)
    # It prepared entry 1 at once; entry 2 waits for entry 1 to be prepared (chain rule).
    prepared = {(p.seq, p.entry_digest) for p in broadcasts(actions, Prepare)}
    assert prepared == {(1, first.digest)}
    records = apply_persists({}, actions)

    # It restarts from its durable records, still in view 1 (active).
    restarted = cluster.replica(2, records=records)
    assert (restarted.view, restarted.status) == (1, ViewStatus.NORMAL)
    cluster.tick(restarted, 10)

    # The Byzantine primary of view 1 now sends another batch at seq 2, chained correctly.
    fork = cluster.pre_prepare(2, [cluster.request(99)], view=1, prev_hash=first.digest)
    assert fork.digest != second.digest
    actions = cluster.deliver(restarted, fork.raw)
    assert not broadcasts(actions, Prepare)
    assert any("pre_prepare" in note.detail for note in notes(actions, "drop")), notes(actions)

    # Once entry 1 prepares, the backup prepares entry 2 as the NEW-VIEW assigned it.
    actions = cluster.deliver(restarted, first.raw)
    actions += cluster.deliver(restarted, *cluster.prepares(first, [3]))
    votes = {(p.seq, p.entry_digest) for p in broadcasts(actions, Prepare)}
    assert (2, second.digest) in votes
    assert (2, fork.digest) not in votes


def test_restarted_backup_reinstalls_the_new_view_plan_into_its_slots() -> None:
    cluster = Cluster()
    new_view, reproposed = _new_view_with_two_reproposals(cluster)
    backup = cluster.replica(3)
    records = apply_persists({}, cluster.deliver(backup, new_view))
    restarted = cluster.replica(3, records=records)
    for entry in reproposed:
        slot = restarted.ordering.slots[entry.seq]
        assert slot.proposal is not None
        assert slot.proposal.entry_digest == entry.digest
        assert slot.proposal.view == 1
    # A proposal at a planned seq with no slot left (say, pruned) is still refused.
    assert restarted.ordering.new_view_planned_high == 2


def test_restart_with_a_tampered_new_view_record_refuses_to_start() -> None:
    """The recorded NEW-VIEW is verified again on recovery, like one from the network."""
    import pytest

    from pbft.replica import ReplicaInvariantError

    cluster = Cluster()
    new_view, _ = _new_view_with_two_reproposals(cluster)
    backup = cluster.replica(3)
    records = apply_persists({}, cluster.deliver(backup, new_view))
    key = ("vote", "new_view", 1, 0)
    assert key in records
    # A NEW-VIEW signed by a replica that is not view 1's primary.
    records[key] = cluster.new_view(1, [], [], replica=2)
    with pytest.raises(ReplicaInvariantError):
        cluster.replica(3, records=records)
