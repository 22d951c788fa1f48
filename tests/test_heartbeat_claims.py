"""Heartbeats are hints, not proof (issue 7, sections 3 and 4).

- One replica's heartbeat cannot push `highest_seen_executed` up: only what f + 1 replicas
  claim counts. The claim still earns one FETCH to its sender, who must prove it.
- A replica that missed a NEW-VIEW while the cluster was idle (it restarted, or was cut off)
  learns the view from the new primary's heartbeats: it FETCHes, naming its view, and gets
  the NEW-VIEW back, which proves itself.
"""

from __future__ import annotations

from replica_harness import Cluster, broadcast_raws, decode, send_raws

from pbft.messages import Fetch, NewView
from pbft.status import ViewStatus


def test_one_heartbeat_cannot_inflate_how_far_the_cluster_got() -> None:
    cluster = Cluster()
    replica = cluster.replica(2)
    cluster.tick(replica, 1)
    actions = cluster.deliver(replica, cluster.heartbeat(0, last_executed=1_000_000))
    assert replica.catchup.highest_seen_executed == 0
    # The hint is followed up: one FETCH to the claimant, which must prove it.
    fetches = [decode(raw) for raw in send_raws(actions, ("replica", 0), Fetch)]
    assert [(f.replica, f.from_seq, f.view) for f in fetches] == [(2, 1, 0)]


def test_f_plus_one_claims_count_as_the_lowest_of_them() -> None:
    cluster = Cluster()
    replica = cluster.replica(2)
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.heartbeat(0, last_executed=900))
    # Replica 1 leads view 1: its heartbeat is a second voice (f + 1 = 2).
    cluster.deliver(replica, cluster.heartbeat(1, last_executed=40))
    assert replica.catchup.highest_seen_executed == 40


def test_replica_behind_an_idle_cluster_learns_the_view_from_heartbeats() -> None:
    cluster = Cluster()
    primary = cluster.replica(1)
    changes = [cluster.view_change(1, replica) for replica in (0, 2, 3)]
    actions = cluster.deliver(primary, *changes)
    (new_view,) = broadcast_raws(actions, NewView)
    assert (primary.view, primary.status) == (1, ViewStatus.NORMAL)

    # Replica 3 never saw any of it: it is still in view 0, and the cluster is idle.
    laggard = cluster.replica(3)
    cluster.tick(laggard, 1)
    heartbeat = broadcast_raws(cluster.tick(primary, 500))
    assert heartbeat
    actions = cluster.deliver(laggard, *heartbeat)
    fetches = send_raws(actions, ("replica", 1), Fetch)
    assert fetches and decode(fetches[0]).view == 0

    # The primary answers the FETCH with its NEW-VIEW; the laggard installs it.
    answer = send_raws(cluster.deliver(primary, *fetches), ("replica", 3))
    assert new_view in answer
    cluster.deliver(laggard, *answer)
    assert (laggard.view, laggard.status) == (1, ViewStatus.NORMAL)
    # From now on the primary's heartbeats are in its view: no more wrong_view drops.
    cluster.deliver(laggard, *broadcast_raws(cluster.tick(primary, 600)))
    assert laggard.drops.get("wrong_view", 0) == 1
