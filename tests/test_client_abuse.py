"""Misbehaving clients cannot make replicas work for free (issue 8, points 3 and 4).

- A replayed decided request is answered with the reply signed when it was decided (no new
  signature), and replays beyond a client's budget are dropped and counted.
- One client's flood of distinct signed requests fills its own quota of the pending table,
  not everyone's: another client's payment still gets in.
"""

from __future__ import annotations

from replica_harness import Cluster, send_raws

from pbft.budget import TokenBuckets
from pbft.replies import SignedReplies


def _decide_one(cluster: Cluster):  # type: ignore[no-untyped-def]
    """Replica 1 (a backup) executes client 0's request 1; returns (replica, request raw)."""
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    request = cluster.request(1)
    entry = cluster.pre_prepare(1, [request])
    cluster.drive_commit(replica, entry)
    assert replica.last_executed == 1
    return replica, request


def test_a_replayed_request_gets_the_reply_signed_when_it_was_decided() -> None:
    cluster = Cluster()
    replica, request = _decide_one(cluster)
    first = send_raws(cluster.deliver(replica, request), ("client", 0))
    again = send_raws(cluster.deliver(replica, request), ("client", 0))
    assert len(first) == 1 and first == again
    assert replica.ordering.signed_replies.hits >= 2


def test_replays_beyond_the_budget_are_dropped_and_counted() -> None:
    cluster = Cluster(client_replay_rate_per_s=10, client_replay_burst=5)
    replica, request = _decide_one(cluster)
    answered = 0
    for _ in range(50):
        answered += len(send_raws(cluster.deliver(replica, request), ("client", 0)))
    assert answered == 5
    assert replica.drops["replay_rate_limited"] == 45
    # The budget refills with time: an honest retransmission a second later is answered.
    cluster.tick(replica, 1001)
    assert send_raws(cluster.deliver(replica, request), ("client", 0))


def test_one_client_fills_its_own_quota_not_the_pending_table() -> None:
    cluster = Cluster(client_pending_limit=8)
    replica = cluster.replica(1)  # a backup: pending requests wait for the primary
    cluster.tick(replica, 1)
    flood = [cluster.request(request_id, amount=1) for request_id in range(1, 200)]
    cluster.deliver(replica, *flood)
    assert replica.requests.pending_per_client[0] == 8
    assert replica.drops["client_quota_full"] == 199 - 8
    # Another client's payment still gets in.
    cluster.deliver(replica, cluster.request(1, client=1))
    assert (1, 1) in replica.requests.pending
    assert replica.requests.pending_per_client[1] == 1


def test_a_client_over_its_quota_costs_no_signature_check_for_new_requests() -> None:
    cluster = Cluster(client_pending_limit=8)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    cluster.deliver(replica, *(cluster.request(i, amount=1) for i in range(1, 10)))
    assert 0 in replica.requests.over_quota_clients  # the 9th, checked, marked the client
    checked = replica.verifier.cache.statistics().misses
    cluster.deliver(replica, *(cluster.request(i, amount=1) for i in range(10, 1000)))
    assert replica.verifier.cache.statistics().misses == checked
    assert replica.drops["client_quota_full"] == 1 + 990
    # A request it already has pending still takes its usual path (no refusal for the
    # quota), but a backup relays only what it times: not a client over its quota.
    relayed = cluster.deliver(replica, cluster.request(1, amount=1))
    assert send_raws(relayed, ("replica", 0)) == []
    assert replica.drops["client_quota_full"] == 1 + 990


def test_forged_requests_cannot_mark_a_correct_client_over_its_quota() -> None:
    from crypto.keys import SigningKey

    cluster = Cluster(client_pending_limit=2)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1), cluster.request(2, client=1))
    forger = SigningKey.derive(99, "forger")
    forged = [cluster.request(i, client=1, key=forger) for i in range(3, 50)]
    cluster.deliver(replica, *forged)
    assert 1 not in replica.requests.over_quota_clients
    assert replica.drops["bad_signature"] == len(forged)


def test_quota_frees_as_requests_execute() -> None:
    cluster = Cluster(client_pending_limit=2)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    first, second, third = (cluster.request(i) for i in (1, 2, 3))
    cluster.deliver(replica, first, second, third)
    assert replica.drops["client_quota_full"] == 1
    cluster.drive_commit(replica, cluster.pre_prepare(1, [first]))
    assert replica.requests.pending_per_client[0] == 1
    cluster.deliver(replica, third)
    assert replica.requests.pending_per_client[0] == 2


def test_signed_replies_and_budgets_are_bounded() -> None:
    replies = SignedReplies(limit=3)
    for request_id in range(10):
        replies.put(0, request_id, b"d", bytes([request_id]))
    assert len(replies) == 3
    assert replies.get(0, 9, b"d") == bytes([9])
    assert replies.get(0, 0, b"d") is None
    budget = TokenBuckets(rate_per_s=1, burst=2)
    assert [budget.allow(7, 0) for _ in range(3)] == [True, True, False]
    assert budget.allow(7, 1000)


def test_a_slow_bucket_refills_however_often_it_is_looked_at() -> None:
    """Tokens are fractional: looking every millisecond at a bucket of 1 token a second
    must not lose the refill to rounding."""
    budget = TokenBuckets(rate_per_s=1, burst=1)
    assert budget.allow(3, 0)
    refilled_at = next(now for now in range(1, 2000) if budget.allow(3, now))
    assert refilled_at == 1000


def _idle_until(cluster: Cluster, replica, until_ms: int) -> list:  # type: ignore[no-untyped-def]
    """Tick the backup with the primary's heartbeats (so it never misses the primary) and
    return every Suspect it broadcast."""
    from replica_harness import broadcasts

    from pbft.messages import Suspect

    suspects = []
    for now in range(10, until_ms, 10):
        actions = cluster.tick(replica, now)
        actions += cluster.deliver(replica, cluster.heartbeat(0))
        suspects += broadcasts(actions, Suspect)
    return suspects


def test_a_flooding_clients_backlog_does_not_depose_a_correct_primary() -> None:
    """A client over its quota broke the client contract: its unordered requests arm no
    request timer at a backup (they made correct replicas change view in the attack)."""
    cluster = Cluster(client_pending_limit=4)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    cluster.deliver(replica, *(cluster.request(i, amount=1) for i in range(1, 20)))
    assert 0 in replica.requests.over_quota_clients
    assert _idle_until(cluster, replica, 3 * cluster.config.view_change_timeout_ms) == []


def test_a_correct_clients_unordered_request_still_deposes_a_censoring_primary() -> None:
    cluster = Cluster(client_pending_limit=4)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    cluster.deliver(replica, *(cluster.request(i, amount=1) for i in range(1, 20)))
    cluster.deliver(replica, cluster.request(1, client=1))  # a correct client, never ordered
    suspects = _idle_until(cluster, replica, 3 * cluster.config.view_change_timeout_ms)
    assert suspects and suspects[0].replica == 1


def test_the_over_quota_mark_goes_when_the_clients_backlog_is_gone() -> None:
    cluster = Cluster(client_pending_limit=1)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    first, second = cluster.request(1), cluster.request(2)
    cluster.deliver(replica, first, second)
    assert 0 in replica.requests.over_quota_clients
    cluster.drive_commit(replica, cluster.pre_prepare(1, [first]))
    assert 0 not in replica.requests.over_quota_clients


def test_the_primary_orders_correct_clients_before_a_flooding_clients_backlog() -> None:
    from replica_harness import broadcasts

    from pbft.messages import PrePrepare, Request
    from pbft.signed import peek

    # Nothing is proposed before the batch timeout: all of it waits in one queue.
    cluster = Cluster(client_pending_limit=4, batch_size=8, batch_timeout_ms=50)
    primary = cluster.replica(0)
    cluster.tick(primary, 1)
    cluster.deliver(primary, *(cluster.request(i, amount=1) for i in range(1, 20)))
    assert 0 in primary.requests.over_quota_clients
    cluster.deliver(primary, cluster.request(1, client=1))
    proposals = broadcasts(cluster.tick(primary, 100), PrePrepare)
    assert proposals, "the primary proposed nothing"
    first = [peek(raw)[1] for raw in proposals[0].requests]
    assert isinstance(first[0], Request)
    assert (first[0].client_id, first[0].request_id) == (1, 1)
    # The flooding client's backlog gets at most a quarter of the batch (8 // 4).
    assert [message.client_id for message in first] == [1, 0, 0]  # type: ignore[attr-defined]


def test_a_flooding_clients_backlog_leaves_room_in_the_pipeline_for_a_correct_client() -> None:
    """Batches of nothing but an over-quota client's requests fill at most half of the
    batches in flight: a correct client's request arriving while the backlog is being
    ordered is proposed at once, not after the flood's batches drain."""
    from replica_harness import broadcasts

    from pbft.messages import PrePrepare
    from pbft.signed import peek

    # Nothing is proposed before the batch timeout (the backlog never fills a batch), so
    # it is there all at once; its share of a batch is 80 // 4 = 20 requests.
    cluster = Cluster(
        client_pending_limit=64, batch_size=80, batch_timeout_ms=50, max_inflight_batches=4
    )
    primary = cluster.replica(0)
    cluster.tick(primary, 1)
    cluster.deliver(primary, *(cluster.request(i, amount=1) for i in range(1, 70)))
    assert 0 in primary.requests.over_quota_clients
    flood = broadcasts(cluster.tick(primary, 100), PrePrepare)
    assert len(flood) == 2  # of 4 in flight; its backlog of 64 would fill all 4
    assert primary.last_executed == 0
    # Proposed on arrival (the batch's oldest request, the backlog's, is past the timeout).
    proposed = broadcasts(cluster.deliver(primary, cluster.request(1, client=1)), PrePrepare)
    assert len(proposed) == 1
    clients = [peek(raw)[1].client_id for raw in proposed[0].requests]  # type: ignore[attr-defined]
    assert clients[0] == 1


def _run_network(  # type: ignore[no-untyped-def]
    cluster: Cluster, replicas: list, until_ms: int, inject: dict
) -> list:
    """Run `replicas` together on a lossless in-memory network that delivers every message
    with its link, ticking each every 10 ms; `inject` maps a replica id to client requests
    it receives first. Returns every Suspect broadcast."""
    from collections import deque

    from replica_harness import decode

    from pbft.events import Broadcast, Send
    from pbft.messages import Suspect

    queue: deque = deque()
    suspects: list = []

    def carry(sender: int, actions: list) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                if isinstance(decode(action.data), Suspect):
                    suspects.append(decode(action.data))
                queue.extend((r, sender, action.data) for r in range(len(replicas)) if r != sender)
            elif isinstance(action, Send) and action.to[0] == "replica":
                queue.append((action.to[1], sender, action.data))

    for replica in replicas:
        carry(replica.id, cluster.tick(replica, 1))
    for replica_id, raws in inject.items():
        carry(replica_id, cluster.deliver(replicas[replica_id], *raws, link=("client", 0)))
    for now in range(10, until_ms, 10):
        while queue:
            to, sender, raw = queue.popleft()
            carry(to, cluster.deliver(replicas[to], raw, link=("replica", sender)))
        for replica in replicas:
            carry(replica.id, cluster.tick(replica, now))
    return suspects


def test_a_client_over_its_quota_only_at_the_primary_does_not_depose_it() -> None:
    """A Byzantine client fills its quota at the primary with some requests and sends other
    ones to a backup, where it is under its quota. The backup relays them and times them,
    so the primary takes them on the backup's share (not the client's) and orders them
    ahead of the client's backlog: before, it refused them (client_quota_full) and the
    backups' request timers deposed a correct primary, a view change per round."""
    cluster = Cluster(client_pending_limit=4)
    replicas = [cluster.replica(i) for i in range(cluster.config.replica_count)]
    at_primary = [cluster.request(i, amount=1) for i in range(1, 9)]
    at_backup = [cluster.request(i, amount=1) for i in range(9, 13)]
    suspects = _run_network(
        cluster, replicas, 3 * cluster.config.view_change_timeout_ms, {0: at_primary, 1: at_backup}
    )
    assert suspects == []
    primary = replicas[0]
    assert primary.drops["client_quota_full"] == 4  # its own excess at the primary
    assert primary.view == 0 and primary.requests.relayed_per_replica == {}
    for replica in replicas:
        assert all(replica.ledger.lookup(0, i) is not None for i in range(9, 13))
        assert all(replica.ledger.lookup(0, i) is not None for i in range(1, 5))


def test_clients_filling_the_primarys_table_do_not_get_it_deposed() -> None:
    """Colluding clients fill the primary's pending table (each within its quota) and
    nobody else's; a correct client's request reaches a backup, which relays and times it.
    The primary takes it on the backup's share: before, it refused it (request_queue_full)
    and the backup's request timer deposed it."""
    cluster = Cluster(pending_request_limit=8, client_pending_limit=4)
    replicas = [cluster.replica(i) for i in range(cluster.config.replica_count)]
    flood = [cluster.request(i, amount=1, client=c) for c in (0, 1) for i in range(1, 5)]
    correct = cluster.request(1, amount=1, client=2, payer="bob", payee="alice")
    suspects = _run_network(
        cluster, replicas, 3 * cluster.config.view_change_timeout_ms, {0: flood, 1: [correct]}
    )
    assert suspects == []
    assert replicas[0].drops["request_queue_full"] == 0
    for replica in replicas:
        assert replica.ledger.lookup(2, 1) is not None


def test_an_over_quota_clients_backlog_is_ordered_at_a_bounded_pace() -> None:
    """A client past its quota gets its backlog ordered at most OVER_QUOTA_ORDER_RATE_PER_S
    a second (plus one batch of burst), however idle the pipeline: each request ordered
    costs every replica a signature check, an execution and a signed reply. A correct
    client's payment sent meanwhile is ordered at once."""
    from pbft.requests import OVER_QUOTA_ORDER_RATE_PER_S

    cluster = Cluster(client_pending_limit=200)
    replicas = [cluster.replica(i) for i in range(cluster.config.replica_count)]
    flood = [cluster.request(i, amount=1) for i in range(1, 301)]
    correct = cluster.request(1, amount=1, client=1)
    suspects = _run_network(
        cluster, replicas, 1000, {r: flood for r in range(len(replicas))} | {0: flood + [correct]}
    )
    assert suspects == []
    ordered = sum(replicas[0].ledger.lookup(0, i) is not None for i in range(1, 301))
    # The batches proposed before its 201st request marked it over its quota count too.
    before_marked = cluster.config.max_inflight_batches * cluster.config.batch_size
    assert 0 < ordered <= OVER_QUOTA_ORDER_RATE_PER_S + cluster.config.batch_size + before_marked
    assert all(replica.ledger.lookup(1, 1) is not None for replica in replicas)


def test_a_backups_relays_are_charged_to_its_own_bounded_share() -> None:
    """The primary takes relays beyond the client's quota only up to client_pending_limit
    per (backup, client): a Byzantine backup relaying a client's flood gets no more room
    than the client itself, and a client over its quota still gets nothing more sent
    directly."""
    cluster = Cluster(client_pending_limit=4)
    primary = cluster.replica(0)
    cluster.tick(primary, 1)
    cluster.deliver(primary, *(cluster.request(i) for i in range(1, 5)), link=("client", 0))
    cluster.deliver(primary, *(cluster.request(i) for i in range(5, 11)), link=("replica", 2))
    assert primary.requests.relayed_per_client == {(2, 0): 4}
    assert primary.drops["client_quota_full"] == 2
    cluster.deliver(primary, cluster.request(11), link=("client", 0))
    cluster.deliver(primary, cluster.request(12), link=None)
    assert primary.drops["client_quota_full"] == 4
    assert len(primary.requests.pending) == 8


def _cluster_of_one_client_with_two_slots(tmp_path):  # type: ignore[no-untyped-def]
    """A 4-replica cluster file on free 127.0.0.1 ports, one client, client_pending_limit 2."""
    from runtime.cluster import load_cluster, write_cluster
    from runtime.ports import consecutive_free_ports

    path = write_cluster(
        tmp_path,
        replicas=4,
        clients=1,
        base_port=consecutive_free_ports(4)[0],
        protocol={"client_pending_limit": 2},
    )
    return load_cluster(path)


def test_a_payment_client_keeps_at_most_its_quota_in_flight(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The client's side of the quota: beyond client_pending_limit payments in flight, a
    PaymentClient's further `pay` calls wait for a slot instead of sending requests the
    replicas would refuse (and would not time for it). No replica runs here: nothing is
    decided, so the first two time out and the waiting ones then get their turn."""
    import trio

    from runtime.client import PaymentClient, PaymentTimeout

    cluster = _cluster_of_one_client_with_two_slots(tmp_path)
    in_flight: list[int] = []
    timed_out: list[int] = []

    async def main() -> None:
        async with PaymentClient(cluster, 0, timeout_s=0.5) as client:

            async def pay(index: int) -> None:
                try:
                    await client.pay("acct-00000", "acct-00001", 1)
                except PaymentTimeout:
                    timed_out.append(index)

            async with trio.open_nursery() as nursery:
                for index in range(5):
                    nursery.start_soon(pay, index)
                await trio.sleep(0.2)
                in_flight.append(len(client.core.outstanding))
                await trio.sleep(0.5)  # the first two timed out: two more went out
                in_flight.append(len(client.core.outstanding))

    trio.run(main)
    assert in_flight == [2, 2]
    assert len(timed_out) == 5


def test_a_cancelled_payment_gives_back_its_slot_in_the_client_core_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pay() cancelled by its caller frees its slot for the next one, and the client
    core forgets the request at the same time: before, the core kept it, and once
    client_pending_limit pays had been cancelled every further pay() failed with
    "already in flight" although no slot was taken."""
    import trio

    from pbft.client import ClientError
    from runtime.client import PaymentClient, PaymentTimeout

    cluster = _cluster_of_one_client_with_two_slots(tmp_path)
    outcomes: list[str] = []

    async def main() -> None:
        async with PaymentClient(cluster, 0, timeout_s=0.3) as client:
            for _ in range(3):
                with trio.move_on_after(0.05):
                    await client.pay("acct-00000", "acct-00001", 1)
            outcomes.append(f"outstanding {len(client.core.outstanding)}")
            try:
                await client.pay("acct-00000", "acct-00001", 1)
            except PaymentTimeout:
                outcomes.append("timed out")
            except ClientError as error:
                outcomes.append(f"client error: {error}")

    trio.run(main)
    assert outcomes == ["outstanding 0", "timed out"]
