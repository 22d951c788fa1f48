"""Request intake (pbft/requests.py): admission, quotas and batching order. More of its
rules, end to end against floods, are in tests/test_client_abuse.py."""

from __future__ import annotations

from replica_harness import Cluster


def test_a_request_is_pending_once_however_often_it_arrives() -> None:
    cluster = Cluster()
    replica = cluster.replica(1)
    request = cluster.request(1)
    cluster.deliver(replica, request, request, request)
    assert list(replica.requests.pending) == [(0, 1)]
    assert replica.requests.pending_per_client[0] == 1


def test_a_client_beyond_its_quota_is_refused_and_marked_over_it() -> None:
    cluster = Cluster(client_pending_limit=2)
    replica = cluster.replica(1)
    cluster.deliver(replica, *(cluster.request(i) for i in (1, 2)))
    assert replica.requests.over_quota_clients == {}
    cluster.deliver(replica, cluster.request(3))
    assert replica.requests.over_quota_clients == {0: None}
    assert (0, 3) not in replica.requests.pending
    assert replica.drops["client_quota_full"] == 1


def test_batches_put_correct_clients_before_an_over_quota_backlog() -> None:
    cluster = Cluster(client_pending_limit=2, batch_size=4)
    requests = cluster.replica(1).requests
    requests.proposal_queue = dict.fromkeys([(0, 1), (0, 2), (0, 3), (1, 1), (2, 1)])
    requests.over_quota_clients = {0: None}
    # Correct clients first, then at most a quarter of the batch for the backlog.
    assert requests.next_batch() == [(1, 1), (2, 1), (0, 1)]
    assert requests.backlog_only([(0, 2), (0, 3)])
    assert not requests.backlog_only([(0, 2), (1, 1)])


def test_the_request_timer_watches_correct_clients_requests_only() -> None:
    cluster = Cluster(client_pending_limit=1)
    replica = cluster.replica(1)
    cluster.deliver(replica, cluster.request(1), cluster.request(2))  # client 0: over
    assert replica.requests.oldest_timed_request() is None
    cluster.deliver(replica, cluster.request(1, client=1))
    oldest = replica.requests.oldest_timed_request()
    assert oldest is not None and oldest.opened.message.client_id == 1
