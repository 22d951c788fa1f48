"""Liveness and view change (pbft/viewchanges.py), one test per rule."""

from __future__ import annotations

import pytest
from replica_harness import Cluster, broadcasts

from pbft.messages import Suspect, ViewChange
from pbft.status import ViewStatus


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_a_backup_suspects_a_primary_it_has_not_heard_from_for_a_view_timeout(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    timeout = cluster.config.view_change_timeout_ms
    cluster.tick(replica, 0)
    assert broadcasts(cluster.tick(replica, timeout - 1), Suspect) == []
    (suspect,) = broadcasts(cluster.tick(replica, timeout), Suspect)
    assert (suspect.view, suspect.replica) == (0, 1)
    assert replica.status is ViewStatus.NORMAL  # one suspicion alone changes nothing


def test_a_heartbeat_from_the_primary_restarts_the_backups_timeout(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    timeout = cluster.config.view_change_timeout_ms
    cluster.tick(replica, 0)
    cluster.tick(replica, timeout - 10)
    cluster.deliver(replica, cluster.heartbeat(0))
    assert broadcasts(cluster.tick(replica, timeout), Suspect) == []
    assert broadcasts(cluster.tick(replica, 2 * timeout - 10), Suspect)


def test_f_plus_one_suspicions_of_the_view_start_a_view_change(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    suspecting = [2, 3][: cluster.f]
    cluster.deliver(replica, *(cluster.suspect(0, other) for other in suspecting))
    assert replica.status is ViewStatus.NORMAL
    actions = cluster.deliver(replica, cluster.suspect(0, 0))
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)
    (view_change,) = broadcasts(actions, ViewChange)
    assert (view_change.new_view, view_change.replica) == (1, 1)


def test_each_view_given_up_doubles_the_view_timeouts(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    base = cluster.config.view_change_timeout_ms
    parts = replica.viewchanges
    assert parts.primary_timeout.after_ms == base
    cluster.deliver(replica, cluster.suspect(0, 2), cluster.suspect(0, 3))
    assert parts.failed_views == 1
    assert (parts.primary_timeout.after_ms, parts.suspect_timeout.after_ms) == (2 * base, 2 * base)


def test_the_new_view_timer_starts_only_once_a_quorum_asked_for_the_view(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(2)  # a backup in view 1 (replica 1 is its primary)
    cluster.deliver(replica, cluster.suspect(0, 0), cluster.suspect(0, 3))
    assert (replica.view, replica.status) == (1, ViewStatus.VIEW_CHANGE)
    others = [3, 0][: cluster.quorum - 2]
    cluster.deliver(replica, *(cluster.view_change(1, other) for other in others))
    assert len(replica.viewchanges.view_changes[1]) == cluster.quorum - 1
    assert not replica.viewchanges.view_change_timeout.running
    cluster.deliver(replica, cluster.view_change(1, 1))
    assert replica.viewchanges.view_change_timeout.running


def test_f_plus_one_replicas_in_a_later_view_make_a_replica_join_it(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    cluster.deliver(replica, cluster.view_change(3, 2))
    assert replica.view == 0
    cluster.deliver(replica, cluster.view_change(3, 3))
    assert (replica.view, replica.status) == (3, ViewStatus.VIEW_CHANGE)
