"""Failure detection and view change at one replica: SUSPECT with the f + 1 threshold,
VIEW-CHANGE, NEW-VIEW built and checked against the recomputed plan, joining higher
views and the doubling view-change timeout."""

from __future__ import annotations

import pytest
from replica_harness import (
    Cluster,
    Network,
    apply_persists,
    broadcast_raws,
    broadcasts,
    first_index,
    is_broadcast_of,
    is_persist_of,
    notes,
    sends,
)

from pbft.chain import batch_digest, entry_digest
from pbft.messages import (
    Commit,
    Fetch,
    NewView,
    Prepare,
    PrePrepare,
    Suspect,
    ViewChange,
)
from pbft.replica import Replica
from pbft.status import ViewStatus
from pbft.viewchange import verify_view_change

TIMEOUT = 300


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(view_change_timeout_ms=TIMEOUT)


def view_changes(actions: list, new_view: int | None = None) -> list[ViewChange]:
    return [
        message
        for message in broadcasts(actions, ViewChange)
        if new_view is None or message.new_view == new_view
    ]


# --- suspicion ------------------------------------------------------------------------------


def test_backup_without_heartbeat_suspects_primary_but_does_not_change_view_alone(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    cluster.tick(replica, 0)
    assert broadcasts(cluster.tick(replica, TIMEOUT - 1), Suspect) == []

    actions = cluster.tick(replica, TIMEOUT)

    (suspect,) = broadcasts(actions, Suspect)
    assert (suspect.view, suspect.replica) == (0, 1)
    assert notes(actions, "suspect")
    assert view_changes(actions) == []
    assert (replica.view, replica.status) == (0, ViewStatus.NORMAL)
    # It does not repeat the suspicion before another timeout has passed.
    assert broadcasts(cluster.tick(replica, TIMEOUT + 100), Suspect) == []
    assert view_changes(cluster.tick(replica, 2 * TIMEOUT)) == []
    assert (replica.view, replica.status) == (0, ViewStatus.NORMAL)


def test_heartbeats_from_primary_keep_backup_from_suspecting(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    cluster.tick(replica, 200)
    cluster.deliver(replica, cluster.heartbeat(0))
    assert broadcasts(cluster.tick(replica, TIMEOUT), Suspect) == []
    assert broadcasts(cluster.tick(replica, 200 + TIMEOUT - 1), Suspect) == []
    assert len(broadcasts(cluster.tick(replica, 200 + TIMEOUT), Suspect)) == 1


def test_heartbeat_from_non_primary_does_not_count(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    cluster.tick(replica, 200)
    cluster.deliver(replica, cluster.heartbeat(0, replica=3))
    assert replica.drops["not_primary"] == 1
    assert len(broadcasts(cluster.tick(replica, TIMEOUT), Suspect)) == 1


def test_backup_suspects_primary_when_work_does_not_complete(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    cluster.deliver(replica, cluster.request(1))  # relayed; now there is work to finish
    for now in range(50, TIMEOUT, 50):
        # The primary is alive but idle: the request's own timer runs out all the same.
        assert broadcasts(cluster.tick(replica, now), Suspect) == []
        cluster.deliver(replica, cluster.heartbeat(0))
    (suspect,) = broadcasts(cluster.tick(replica, TIMEOUT), Suspect)
    assert suspect.view == 0


def test_one_other_suspect_alone_does_not_start_view_change(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    actions = cluster.deliver(replica, cluster.suspect(0, 3))
    assert view_changes(actions) == []
    assert (replica.view, replica.status) == (0, ViewStatus.NORMAL)


def test_f_plus_one_suspects_start_view_change_with_prepared_certificates(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.drive_prepared(replica, entry)
    assert broadcasts(cluster.tick(replica, TIMEOUT), Suspect)

    actions = cluster.deliver(replica, cluster.suspect(0, 3))

    (change,) = view_changes(actions)
    assert (change.new_view, change.replica) == (1, 2)
    assert (change.checkpoint_seq, change.checkpoint_chain_hash) == (0, cluster.genesis_chain_hash)
    assert change.checkpoint_ledger_digest == cluster.genesis_ledger_digest
    assert change.checkpoint_proof == ()
    (certificate,) = change.prepared
    assert certificate.pre_prepare == entry.raw
    voters = sorted(
        cluster.replica(0).verifier.open(raw, Prepare).message.replica
        for raw in certificate.prepares
    )
    assert voters == [1, 2]
    verified = verify_view_change(broadcast_raws(actions, ViewChange)[0], replica.verifier)
    assert verified.prepared[1].entry_digest == entry.digest
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)
    assert replica.statistics().view_changes_started == 1
    # The view change is durable before it is sent.
    assert first_index(actions, is_persist_of(("vote", "view_change", 1, 0))) < first_index(
        actions, is_broadcast_of(ViewChange)
    )


def test_old_suspicions_fade_and_do_not_add_up(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    cluster.deliver(replica, cluster.suspect(0, 3))
    # Long after 3's suspicion the replica's own timer expires: 3's word is too old.
    cluster.tick(replica, 9 * TIMEOUT)
    cluster.deliver(replica, cluster.heartbeat(0))
    actions = cluster.tick(replica, 10 * TIMEOUT)
    assert broadcasts(actions, Suspect)
    assert view_changes(actions) == []
    assert replica.status is ViewStatus.NORMAL


def test_suspect_for_an_older_view_does_not_count(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    changes = [cluster.view_change(1, i) for i in (0, 1, 3)]
    cluster.deliver(replica, cluster.new_view(1, changes, []))
    assert (replica.view, replica.status) == (1, ViewStatus.NORMAL)
    cluster.deliver(replica, cluster.suspect(0, 3))
    actions = cluster.tick(replica, TIMEOUT)
    assert broadcasts(actions, Suspect)
    assert view_changes(actions) == []
    assert (replica.view, replica.status) == (1, ViewStatus.NORMAL)


def test_replica_already_in_later_view_counts_as_suspicion(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    cluster.deliver(replica, cluster.view_change(1, 3))  # 3 has given up on view 0
    assert replica.status is ViewStatus.NORMAL
    actions = cluster.tick(replica, TIMEOUT)
    assert {(v.new_view, v.replica) for v in view_changes(actions)} == {(1, 2)}
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)


def test_replica_in_view_change_does_not_prepare_new_view_proposals_before_new_view(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(2)
    cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)
    entry = cluster.pre_prepare(1, [cluster.request(1)], view=1)
    assert broadcasts(cluster.deliver(replica, entry.raw), Prepare) == []
    assert replica.drops["wrong_view"] == 1


# --- the new primary builds NEW-VIEW --------------------------------------------------------


def test_new_primary_with_quorum_of_view_changes_reproposes_prepared_batches_and_fills_gaps(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)  # primary of view 1
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    third = chain.append([cluster.request(3), cluster.request(4)])
    # Replica 2 prepared seqs 1 and 3; nobody in the quorum reports seq 2.
    from_2 = cluster.view_change(
        1, 2, [cluster.prepared_certificate(first), cluster.prepared_certificate(third)]
    )
    from_3 = cluster.view_change(1, 3, [cluster.prepared_certificate(first)])

    assert broadcasts(cluster.deliver(replica, from_2), ViewChange) == []
    assert replica.status is ViewStatus.NORMAL  # one view change alone does not move it
    actions = cluster.deliver(replica, from_3)

    # It joined view 1 (f + 1 view changes), sent its own, then the NEW-VIEW.
    assert [v.replica for v in view_changes(actions, 1)] == [1]
    (new_view,) = broadcasts(actions, NewView)
    assert (new_view.view, new_view.replica) == (1, 1)
    senders = sorted(
        replica.verifier.open(raw, ViewChange).message.replica for raw in new_view.view_changes
    )
    assert senders == [1, 2, 3]
    proposals = [replica.verifier.proposal(raw) for raw in new_view.pre_prepares]
    assert [(p.view, p.seq) for p in proposals] == [(1, 1), (1, 2), (1, 3)]
    assert [p.batch_digest for p in proposals] == [
        first.batch_digest,
        batch_digest([]),
        third.batch_digest,
    ]
    assert [tuple(r.raw for r in p.requests) for p in proposals] == [
        first.requests,
        (),
        third.requests,
    ]
    assert proposals[1].batch_digest != second.batch_digest  # seq 2 was never reported
    # Re-chained from the checkpoint: seq 1 keeps its digest, 3 follows the null batch.
    assert proposals[0].prev_hash == cluster.genesis_chain_hash
    assert proposals[0].entry_digest == first.digest
    assert proposals[1].prev_hash == first.digest
    assert proposals[2].prev_hash == proposals[1].entry_digest
    assert proposals[2].entry_digest == entry_digest(
        3, proposals[1].entry_digest, third.batch_digest, third.timestamp_ms
    )
    # Its re-proposals are persisted before the NEW-VIEW goes out.
    for seq in (1, 2, 3):
        assert first_index(actions, is_persist_of(("vote", "pre_prepare", 1, seq))) < (
            first_index(actions, is_broadcast_of(NewView))
        )
    assert (replica.view, replica.status, replica.next_seq) == (1, ViewStatus.NORMAL, 4)
    assert replica.statistics().new_views_installed == 1
    assert notes(actions, "new_view")


def test_new_primary_reproposes_unbroken_prepared_chain_with_same_digests(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    actions = cluster.deliver(
        replica,
        cluster.view_change(1, 0, [cluster.prepared_certificate(first)]),
        cluster.view_change(
            1, 3, [cluster.prepared_certificate(first), cluster.prepared_certificate(second)]
        ),
    )
    (new_view,) = broadcasts(actions, NewView)
    proposals = [replica.verifier.proposal(raw) for raw in new_view.pre_prepares]
    assert [(p.seq, p.batch_digest, p.entry_digest) for p in proposals] == [
        (1, first.batch_digest, first.digest),
        (2, second.batch_digest, second.digest),
    ]


def test_new_primary_waits_for_two_f_plus_one_view_changes(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)  # own view change only
    actions = cluster.deliver(replica, cluster.view_change(1, 3))
    assert broadcasts(actions, NewView) == []
    actions = cluster.deliver(replica, cluster.view_change(1, 0))
    (new_view,) = broadcasts(actions, NewView)
    assert new_view.pre_prepares == ()
    assert replica.status is ViewStatus.NORMAL


def test_new_primary_proposes_pending_requests_after_new_view(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    request = cluster.request(1)
    cluster.deliver(replica, request)  # as a backup: relayed to replica 0, kept pending
    actions = cluster.deliver(replica, cluster.view_change(1, 2), cluster.view_change(1, 3))
    assert first_index(actions, is_broadcast_of(NewView)) < first_index(
        actions, is_broadcast_of(PrePrepare)
    )
    (pre_prepare,) = broadcasts(actions, PrePrepare)
    assert (pre_prepare.view, pre_prepare.seq, pre_prepare.requests) == (1, 1, (request,))


def test_new_primary_resends_new_view_to_replica_that_missed_it(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    actions = cluster.deliver(replica, cluster.view_change(1, 2), cluster.view_change(1, 3))
    (new_view_raw,) = broadcast_raws(actions, NewView)
    actions = cluster.deliver(replica, cluster.view_change(1, 0))
    assert [a.data for a in actions if getattr(a, "to", None) == ("replica", 0)] == [new_view_raw]


def test_new_primary_persists_new_view_before_broadcasting_it(cluster: Cluster) -> None:
    """events.py: a Persist precedes the sends that depend on it. The record that this view
    is installed with this NEW-VIEW must be durable before the NEW-VIEW goes out."""
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    changes = [
        cluster.view_change(1, 2),
        cluster.view_change(1, 3, [cluster.prepared_certificate(entry)]),
    ]
    actions = cluster.deliver(replica, *changes)
    broadcast_at = first_index(actions, is_broadcast_of(NewView))
    assert first_index(actions, is_persist_of(("vote", "new_view", 1, 0))) < broadcast_at


def test_new_primary_restarted_right_after_new_view_does_not_sign_a_different_one(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    from_2 = cluster.view_change(1, 2)
    from_3 = cluster.view_change(1, 3, [cluster.prepared_certificate(entry)])
    actions = cluster.deliver(replica, from_2, from_3)
    broadcast_at = first_index(actions, is_broadcast_of(NewView))
    (first_new_view,) = broadcast_raws(actions, NewView)
    # It crashes right after the NEW-VIEW left: only the writes before it are durable.
    records = apply_persists({}, actions[: broadcast_at + 1])
    restarted = cluster.replica(1, records=records)
    cluster.tick(restarted, 0)

    actions = cluster.deliver(restarted, cluster.view_change(1, 0), from_2)

    # Never two different signed NEW-VIEWs for one view from one primary.
    assert all(raw == first_new_view for raw in broadcast_raws(actions, NewView))
    # And it keeps working: a new request is proposed after the re-proposed seq 1.
    proposed = broadcasts(cluster.deliver(restarted, cluster.request(5)), PrePrepare)
    assert [(p.view, p.seq) for p in proposed] == [(1, 2)]


def test_replica_restarted_during_view_change_resumes_it(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    actions = cluster.drive_prepared(replica, entry)
    actions += cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    (own,) = broadcast_raws(actions, ViewChange)
    records = apply_persists({}, actions)

    restarted = cluster.replica(2, records=records)

    assert (restarted.view, restarted.status) == (1, ViewStatus.VIEW_CHANGE)
    interval = cluster.config.retransmit_interval_ms
    assert broadcast_raws(cluster.tick(restarted, interval), ViewChange) == [own]
    # It still refuses view 0's proposals, and installs view 1 when the NEW-VIEW comes.
    assert broadcasts(cluster.deliver(restarted, entry.raw), Prepare) == []
    changes = [own, cluster.view_change(1, 1), cluster.view_change(1, 3)]
    again = cluster.pre_prepare(1, entry.requests, view=1)
    actions = cluster.deliver(restarted, cluster.new_view(1, changes, [again.raw]))
    assert (restarted.view, restarted.status) == (1, ViewStatus.NORMAL)
    assert [(p.view, p.seq) for p in broadcasts(actions, Prepare)] == [(1, 1)]


# --- backups check NEW-VIEW -----------------------------------------------------------------


def _two_prepared(cluster: Cluster):
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    changes = [
        cluster.view_change(1, 0, [cluster.prepared_certificate(first)]),
        cluster.view_change(1, 1),
        cluster.view_change(
            1, 3, [cluster.prepared_certificate(first), cluster.prepared_certificate(second)]
        ),
    ]
    return first, second, changes


def test_backup_accepts_correct_new_view_and_prepares_reproposals(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    first, second, changes = _two_prepared(cluster)
    again_1 = cluster.pre_prepare(1, first.requests, view=1)
    again_2 = cluster.pre_prepare(2, second.requests, view=1, prev_hash=again_1.digest)
    assert (again_1.digest, again_2.digest) == (first.digest, second.digest)
    new_view = cluster.new_view(1, changes, [again_1.raw, again_2.raw])

    actions = cluster.deliver(replica, new_view)

    assert (replica.view, replica.status) == (1, ViewStatus.NORMAL)
    assert replica.statistics().new_views_installed == 1
    # Chain rule: seq 1 now; seq 2 once seq 1 is prepared in view 1.
    assert [(p.view, p.seq, p.entry_digest) for p in broadcasts(actions, Prepare)] == [
        (1, 1, first.digest)
    ]
    actions = cluster.deliver(replica, cluster.prepare(3, again_1))
    assert [(c.view, c.seq) for c in broadcasts(actions, Commit)] == [(1, 1)]
    assert [(p.view, p.seq) for p in broadcasts(actions, Prepare)] == [(1, 2)]
    # The old view is over: its pre-prepares are not taken any more.
    stale = cluster.pre_prepare(3, [cluster.request(3)], prev_hash=second.digest)
    assert broadcasts(cluster.deliver(replica, stale.raw), Prepare) == []
    assert replica.drops["wrong_view"] == 1


def test_backup_accepts_new_view_built_by_real_new_primary(cluster: Cluster) -> None:
    first, second, changes = _two_prepared(cluster)
    primary = cluster.replica(1)
    (new_view,) = broadcast_raws(cluster.deliver(primary, changes[0], changes[2]), NewView)
    backup = cluster.replica(2)
    actions = cluster.deliver(backup, new_view)
    assert backup.status is ViewStatus.NORMAL and backup.view == 1
    assert [p.entry_digest for p in broadcasts(actions, Prepare)] == [first.digest]


def _assert_rejected(replica: Replica, actions: list, reason: str = "bad_new_view") -> None:
    assert replica.drops[reason] == 1
    assert broadcasts(actions, Prepare) == []
    assert (replica.view, replica.status) == (0, ViewStatus.NORMAL)
    assert replica.statistics().new_views_installed == 0


def test_backup_rejects_new_view_omitting_a_prepared_batch(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    first, _, changes = _two_prepared(cluster)
    again_1 = cluster.pre_prepare(1, first.requests, view=1)
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [again_1.raw]))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_replacing_a_prepared_batch_with_null(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    first, _, changes = _two_prepared(cluster)
    again_1 = cluster.pre_prepare(1, first.requests, view=1)
    null_2 = cluster.pre_prepare(2, [], view=1, prev_hash=again_1.digest)
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [again_1.raw, null_2.raw]))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_inventing_a_batch(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    changes = [cluster.view_change(1, i) for i in (0, 1, 3)]  # nothing prepared anywhere
    invented = cluster.pre_prepare(1, [cluster.request(9)], view=1)
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [invented.raw]))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_swapping_a_prepared_batch(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    first, second, changes = _two_prepared(cluster)
    swapped = cluster.pre_prepare(1, [cluster.request(9)], view=1)
    again_2 = cluster.pre_prepare(2, second.requests, view=1, prev_hash=swapped.digest)
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [swapped.raw, again_2.raw]))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_with_broken_chain(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    first, second, changes = _two_prepared(cluster)
    again_1 = cluster.pre_prepare(1, first.requests, view=1)
    again_2 = cluster.pre_prepare(2, second.requests, view=1, prev_hash=b"\x09" * 32)
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [again_1.raw, again_2.raw]))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_citing_fewer_than_two_f_plus_one_view_changes(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(2)
    changes = [cluster.view_change(1, i) for i in (1, 3)]
    actions = cluster.deliver(replica, cluster.new_view(1, changes, []))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_counting_one_replica_twice(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    changes = [cluster.view_change(1, 1), cluster.view_change(1, 3), cluster.view_change(1, 3)]
    actions = cluster.deliver(replica, cluster.new_view(1, changes, []))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_citing_view_changes_for_another_view(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    changes = [cluster.view_change(1, 1), cluster.view_change(1, 3), cluster.view_change(2, 0)]
    actions = cluster.deliver(replica, cluster.new_view(1, changes, []))
    _assert_rejected(replica, actions)


def test_backup_rejects_new_view_from_non_primary(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    changes = [cluster.view_change(1, i) for i in (0, 1, 3)]
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [], replica=3))
    _assert_rejected(replica, actions, "not_primary")


def test_backup_rejects_view_change_with_forged_prepared_certificate(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    # Only one prepare: not a prepared certificate.
    weak = cluster.prepared_certificate(entry, [1])
    cluster.deliver(replica, cluster.view_change(1, 3, [weak]))
    assert replica.drops["bad_certificate"] == 1
    assert replica.viewchanges.view_changes == {}


# --- joining and timeouts -------------------------------------------------------------------


def test_f_plus_one_view_changes_for_higher_view_make_replica_join(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    actions = cluster.deliver(replica, cluster.view_change(2, 0))
    assert view_changes(actions) == []
    assert (replica.view, replica.status) == (0, ViewStatus.NORMAL)

    actions = cluster.deliver(replica, cluster.view_change(2, 1))

    # f + 1 replicas are in view 2, so a correct one is: join view 2 (not view 1).
    assert [(v.new_view, v.replica) for v in view_changes(actions)] == [(2, 3)]
    assert (replica.view, replica.status) == (2, ViewStatus.VIEW_CHANGE)


def test_replica_that_joined_wrong_view_is_not_stuck_there(cluster: Cluster) -> None:
    """With f + 1 peers in view 2 retransmitting their view changes the replica must reach
    view 2; with 2f + 1 view changes for it, its own timer may then take it further."""
    replica = cluster.replica(3)
    cluster.tick(replica, 0)
    from_0, from_1 = cluster.view_change(2, 0), cluster.view_change(2, 1)
    cluster.deliver(replica, from_0, from_1)
    interval = cluster.config.retransmit_interval_ms
    for now in range(interval, 20 * TIMEOUT, interval):
        cluster.tick(replica, now)
        cluster.deliver(replica, from_0, from_1)
    assert replica.view >= 2


def test_replica_joins_lowest_view_claimed_by_f_plus_one(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    actions = cluster.deliver(replica, cluster.view_change(5, 0), cluster.view_change(2, 1))
    assert [v.new_view for v in view_changes(actions)] == [2]


def test_f_plus_one_suspects_for_higher_view_make_replica_join(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    actions = cluster.deliver(replica, cluster.suspect(4, 0), cluster.suspect(4, 1))
    assert [v.new_view for v in view_changes(actions)] == [4]


def time_until_view_change(
    cluster: Cluster, replica: Replica, start_ms: int, new_view: int, limit_ms: int = 200 * TIMEOUT
) -> int:
    """Tick every 10 ms from `start_ms`; how long until the replica sends VIEW-CHANGE(new_view)."""
    for now in range(start_ms + 10, start_ms + limit_ms, 10):
        if view_changes(cluster.tick(replica, now), new_view):
            return now - start_ms
    raise AssertionError(f"no view change to {new_view} within {limit_ms} ms")


def test_view_change_timer_starts_only_with_two_f_plus_one_view_changes(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)
    # With only f + 1 in view 1, it waits there without climbing further.
    cluster.deliver(replica, cluster.view_change(1, 3))
    for now in range(10, 100 * TIMEOUT, 100):
        assert view_changes(cluster.tick(replica, now), 2) == []
    assert replica.view == 1
    # The 2f + 1-th view change arms the timer: then view 1's primary gets a deadline.
    cluster.deliver(replica, cluster.view_change(1, 0))
    waited = time_until_view_change(cluster, replica, 100 * TIMEOUT, 2)
    assert TIMEOUT <= waited
    assert (replica.view, replica.status) == (2, ViewStatus.VIEW_CHANGE)


def test_view_change_timeout_doubles_when_new_primary_fails(cluster: Cluster) -> None:
    replica = cluster.replica(0)  # the primaries of views 1, 2 and 3 are the others
    cluster.tick(replica, 0)
    actions = cluster.deliver(replica, cluster.suspect(0, 1), cluster.suspect(0, 3))
    assert [v.new_view for v in view_changes(actions)] == [1]

    waits = []
    now = 0
    for view in (1, 2, 3):
        # 2f + 1 replicas are in `view`, but its primary never sends NEW-VIEW.
        others = [i for i in (1, 2, 3) if i != cluster.primary(view)]
        cluster.deliver(replica, *(cluster.view_change(view, i) for i in others))
        waited = time_until_view_change(cluster, replica, now, view + 1)
        assert (replica.view, replica.status) == (view + 1, ViewStatus.VIEW_CHANGE)
        waits.append(waited)
        now += waited
    assert waits[0] >= TIMEOUT
    assert waits[1] == 2 * waits[0]
    assert waits[2] == 2 * waits[1]
    assert replica.statistics().view_changes_started == 4


def test_view_changing_replica_retransmits_its_view_change(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    actions = cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    (own,) = broadcast_raws(actions, ViewChange)
    interval = cluster.config.retransmit_interval_ms
    assert broadcast_raws(cluster.tick(replica, interval), ViewChange) == [own]


def test_new_view_from_checkpoint_ahead_makes_replica_fetch(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    chain = cluster.chain()
    entries = [chain.append([cluster.request(i)]) for i in range(1, 5)]
    model = cluster.model_ledger(entries)
    proof = cluster.checkpoint_proof(4, entries[-1].digest, model.digest(), [0, 1, 3])
    checkpoint = (4, entries[-1].digest, model.digest(), proof)
    changes = [cluster.view_change(1, i, checkpoint=checkpoint) for i in (0, 1, 3)]

    actions = cluster.deliver(replica, cluster.new_view(1, changes, []))

    assert replica.status is ViewStatus.NORMAL and replica.view == 1
    (fetch,) = sends(actions, kind=Fetch)
    assert fetch.from_seq == 1
    # Proposals right after the anchor are in its window and chain onto it.
    entry = cluster.pre_prepare(5, [cluster.request(5)], view=1, prev_hash=entries[-1].digest)
    assert [p.seq for p in broadcasts(cluster.deliver(replica, entry.raw), Prepare)] == [5]


# --- golden: a crashed primary is replaced end to end ---------------------------------------


def test_golden_crashed_primary_is_replaced_and_payments_complete(cluster: Cluster) -> None:
    network = Network(cluster, client_ids=(0, 1))
    network.submit(0, 1, "alice", "carol", 10)
    network.run()
    network.advance(100)
    assert len(network.decided) == 1
    network.down.add(0)  # the primary of view 0 crashes

    network.submit(0, 2, "alice", "dave", 20)
    network.submit(1, 1, "carol", "bob", 30)
    network.advance(3000)

    assert sorted((d.client_id, d.request_id, d.outcome) for d in network.decided) == [
        (0, 1, "confirmed"),
        (0, 2, "confirmed"),
        (1, 1, "confirmed"),
    ]
    live = [network.replicas[i] for i in (1, 2, 3)]
    assert {r.view for r in live} == {1}
    assert all(r.status is ViewStatus.NORMAL for r in live)
    assert len({r.ledger.digest() for r in live}) == 1
    assert live[0].ledger.balance("bob") == 530


def test_golden_healed_replica_joins_view_change_and_cluster_recovers(cluster: Cluster) -> None:
    """One crash (replica 1, within f) plus a partition that heals must not stop the cluster.

    3 is cut off; 1 and 2 stop hearing primary 0 and move to view 1; 0 joins them; view 1's
    primary (1) crashes before sending NEW-VIEW; 0 and 2 time out into view 2, whose primary
    (2) needs one more view change. Then 3 comes back and sees f + 1 view changes for view 2.
    """
    network = Network(cluster, client_ids=(0,))
    network.down = {3}
    network.advance(50)
    network.cut = {(0, 1), (0, 2)}
    network.advance(800)
    assert [network.replicas[i].view for i in (0, 1, 2)] == [1, 1, 1]
    network.down = {1, 3}
    network.cut = set()
    network.advance(2000)
    assert [network.replicas[i].view for i in (0, 2)] == [2, 2]

    network.down = {1}  # the partition heals; replica 1 stays crashed
    network.submit(0, 1, "alice", "carol", 10)
    network.advance(12_000, step_ms=20)

    assert [(d.request_id, d.outcome) for d in network.decided] == [(1, "confirmed")]
    live = [network.replicas[i] for i in (0, 2, 3)]
    assert {(r.view, r.status) for r in live} == {(2, ViewStatus.NORMAL)}
