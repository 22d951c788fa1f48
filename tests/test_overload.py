"""Overload is not a fault (issue 10): a backup's request timer judges the primary's
progress, not a request's age alone.

A backlog behind a primary that keeps ordering (the waiting request moves towards the head)
never makes a correct backup suspect it, however long the backlog takes to drain; a primary
that orders nothing while a request waits, or orders others' requests past it, is still
suspected within a bound. And the fuzzer does not call a run unlive when its configuration
cannot order the load it offers: the liveness bound accounts for the backlog.
"""

from __future__ import annotations

import tomllib
from typing import Any

from replica_harness import Cluster, broadcasts

from pbft.messages import Suspect
from pbft.replica import Replica
from pbft.viewchanges import OVERTAKE_SLACK, REQUEST_TIMEOUTS_UNDER_LOAD
from sim.fuzz import backlog_drain_ms, capacity_per_s, generate_document, liveness_within_ms
from sim.scenario import parse_scenario
from sim.simulator import run_scenario


def _run(
    cluster: Cluster,
    replica: Replica,
    until_ms: int,
    order: dict[int, list[bytes]],
) -> tuple[int | None, int]:
    """Tick the backup every 10 ms with the primary's heartbeats; at each time in `order`
    the primary orders a batch of those requests (an empty list: a null batch). Returns
    when the backup first broadcast a SUSPECT (None: never) and the last seq ordered."""
    chain = cluster.chain()
    suspected_at = None
    for now in range(10, until_ms, 10):
        actions = cluster.tick(replica, now)
        actions += cluster.deliver(replica, cluster.heartbeat(0))
        if now in order:
            actions += cluster.drive_commit(replica, chain.append(order[now]))
        if broadcasts(actions, Suspect) and suspected_at is None:
            suspected_at = now
    return suspected_at, chain.seq


def test_a_backlog_behind_a_progressing_primary_causes_no_suspicion() -> None:
    """A client's 60 requests wait at a backup (it broadcast them); the primary orders them
    in arrival order at one a tenth of a second: the last waits 6 s, 20 view-change
    timeouts, and the backup never suspects the primary (the old age-only timer did after
    REQUEST_TIMEOUTS_UNDER_LOAD timeouts)."""
    cluster = Cluster(batch_size=1, checkpoint_interval=64, watermark_window=128)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    backlog = [cluster.request(i, amount=1) for i in range(1, 61)]
    cluster.deliver(replica, *backlog)
    assert len(replica.requests.pending) == 60
    order = {100 * (i + 1): [raw] for i, raw in enumerate(backlog)}
    timeout = cluster.config.view_change_timeout_ms
    suspected_at, last = _run(cluster, replica, 100 * 62, order)
    assert 100 * 60 >= 20 * timeout
    assert suspected_at is None
    assert replica.last_executed == last == 60 and not replica.requests.pending
    assert replica.viewchanges.view_changes_started == 0


def test_a_backlog_reordered_by_the_network_causes_no_suspicion() -> None:
    """Requests reach the backup in another order than the primary's (they raced on the
    network): here in reverse, so the oldest the backup holds is ordered last and 39 others
    pass it. Behind 30 the backup never held (they count), that is 69, more than
    overtake_limit (60); but the 39 all arrived here within a timeout of it, so they do not
    count, and the backup still sees a backlog draining."""
    cluster = Cluster(
        batch_size=1,
        checkpoint_interval=64,
        watermark_window=128,
        pending_request_limit=40,
        client_pending_limit=40,
    )
    replica = cluster.replica(1)
    assert replica.viewchanges.overtake_limit() == 4 + 40 + OVERTAKE_SLACK < 30 + 39
    cluster.tick(replica, 1)
    backlog = [cluster.request(i, amount=1) for i in range(1, 41)]
    cluster.deliver(replica, *reversed(backlog))
    never_held = [cluster.request(i, amount=1, client=1) for i in range(1, 31)]
    order = {100 * (i + 1): [raw] for i, raw in enumerate(never_held + backlog)}
    suspected_at, last = _run(cluster, replica, 100 * 72, order)
    assert suspected_at is None and replica.last_executed == last == 70


def test_a_censoring_primary_that_orders_others_is_deposed_within_the_bound() -> None:
    """The primary keeps ordering client 0's payments, never client 1's request: once more
    than overtake_limit requests overtook it, and it waited REQUEST_TIMEOUTS_UNDER_LOAD
    timeouts, the backup suspects the primary (at its next tick)."""
    cluster = Cluster(
        batch_size=1,
        checkpoint_interval=64,
        watermark_window=128,
        pending_request_limit=8,
        client_pending_limit=8,
    )
    replica = cluster.replica(1)
    limit = replica.viewchanges.overtake_limit()
    # Four batches of one in flight, the primary's table of 8, and the slack.
    assert limit == 4 * 1 + 8 + OVERTAKE_SLACK
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1))  # never ordered
    timeout = cluster.config.view_change_timeout_ms
    # Slow overtaking: one of client 0's payments every 250 ms, so the overtake limit is
    # passed (at its limit + 1-th payment) after REQUEST_TIMEOUTS_UNDER_LOAD timeouts.
    order = {250 * i: [cluster.request(100 + i, amount=1)] for i in range(1, 40)}
    passed_at = 250 * (limit + 1)
    assert passed_at > REQUEST_TIMEOUTS_UNDER_LOAD * timeout
    suspected_at, _ = _run(cluster, replica, passed_at + 500, order)
    assert suspected_at is not None and passed_at <= suspected_at <= passed_at + 10
    # Fast overtaking: then the request has REQUEST_TIMEOUTS_UNDER_LOAD timeouts.
    replica = cluster.replica(2)
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1))
    order = {10 * i: [cluster.request(100 + i, amount=1)] for i in range(1, 200)}
    suspected_at, _ = _run(cluster, replica, 2000, order)
    assert suspected_at is not None
    bound = REQUEST_TIMEOUTS_UNDER_LOAD * timeout
    assert bound <= suspected_at < bound + 20


def test_a_backlog_sent_to_the_primary_alone_causes_no_suspicion() -> None:
    """Review finding F2: the primary's clients sent it 200 requests the backup never saw
    (clients go to the primary first); one more request the backup holds arrives behind
    them. The primary orders first come, first served, in full batches of 4, one every
    50 ms: the held request waits 2.5 s, more than REQUEST_TIMEOUTS_UNDER_LOAD timeouts,
    while 200 requests pass it, more than the batches in flight and the slack (32). That is
    the primary's queue, not censorship: no suspicion."""
    cluster = Cluster(batch_size=4, checkpoint_interval=64, watermark_window=128)
    replica = cluster.replica(1)
    in_flight_and_slack = 4 * 4 + OVERTAKE_SLACK
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1))
    backlog = [cluster.request(100 + i, amount=1) for i in range(200)]
    batches = [backlog[i : i + 4] for i in range(0, 200, 4)]
    order = {50 * (i + 1): batch for i, batch in enumerate(batches)}
    timeout = cluster.config.view_change_timeout_ms
    assert 50 * len(batches) > REQUEST_TIMEOUTS_UNDER_LOAD * timeout
    assert len(backlog) > in_flight_and_slack
    order[50 * (len(batches) + 1)] = [cluster.request(1, client=1)]
    suspected_at, last = _run(cluster, replica, 50 * (len(batches) + 3), order)
    assert suspected_at is None
    assert last == 51 and not replica.requests.pending


def test_a_primary_ordering_full_batches_past_a_request_is_deposed_past_its_table() -> None:
    """The other side of F2: a primary ordering full batches of others' requests (from
    clients it colludes with) past a held request, one batch just under a timeout apart,
    forever. Past overtake_limit (the batches in flight, the primary's table of 64 and the
    slack: 96) the backup suspects it: the delay is bounded by the configuration."""
    cluster = Cluster(
        batch_size=4,
        checkpoint_interval=64,
        watermark_window=128,
        pending_request_limit=64,
        client_pending_limit=64,
    )
    replica = cluster.replica(1)
    limit = replica.viewchanges.overtake_limit()
    assert limit == 4 * 4 + 64 + OVERTAKE_SLACK
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1))  # never ordered
    timeout = cluster.config.view_change_timeout_ms
    step = timeout - 50
    order = {
        step * (i + 1): [cluster.request(100 + 4 * i + j, amount=1) for j in range(4)]
        for i in range(40)
    }
    passed_at = step * (limit // 4 + 1)  # the batch that takes the count past the limit
    suspected_at, _ = _run(cluster, replica, step * 41, order)
    assert suspected_at is not None and passed_at <= suspected_at <= passed_at + 10
    assert suspected_at <= ((limit + 1) / 4 + 1) * timeout


def test_each_held_request_is_deposed_within_the_bound_not_only_the_first() -> None:
    """Review finding O1: the overtake count was kept for the oldest held request only and
    restarted at 0 for its successor. A primary ordering full batches of a colluder's
    requests (never held here) one just under a timeout apart, slipping each held request
    in just before its count passed the limit, delayed the k-th by about k times the
    bound, unsuspected. Counted from each request's own arrival, the second held request
    (waiting as long as the first) deposes it within the bound."""
    cluster = Cluster(
        batch_size=4,
        checkpoint_interval=256,
        watermark_window=512,
        pending_request_limit=64,
        client_pending_limit=64,
        max_clock_skew_ms=86_400_000,  # the harness stamps batches 0: no clock in play
    )
    replica = cluster.replica(1)
    limit = replica.viewchanges.overtake_limit()
    assert limit == 96
    cluster.tick(replica, 1)
    victims = [cluster.request(r, amount=1, client=c) for c in (1, 2) for r in (1, 2, 3)]
    cluster.deliver(replica, *victims)
    timeout = cluster.config.view_change_timeout_ms
    step = timeout - 50
    per_victim = limit // 4  # 24 batches: a victim's own count reaches 95, not past 96
    order: dict[int, list[bytes]] = {}
    rid = 1000
    for victim in victims:
        for i in range(per_victim):
            fill = 3 if i == per_victim - 1 else 4
            batch = [cluster.request(rid + j, amount=1, client=0) for j in range(fill)]
            rid += fill
            order[step * (len(order) + 1)] = batch + ([victim] if fill == 3 else [])
    suspected_at, _ = _run(cluster, replica, step * (len(order) + 2), order)
    bound = ((limit + 1) / 4 + 1) * timeout
    first_slipped_in = step * per_victim
    assert suspected_at is not None
    assert first_slipped_in < suspected_at <= first_slipped_in + 2 * step
    assert suspected_at <= bound


def test_requests_arriving_late_count_for_every_held_request_not_only_the_oldest() -> None:
    """O1 with a colluder that sends to everyone: its requests are held here, but arrive
    more than a timeout after the held ones, and a primary slipping each held request in
    before its count passed the limit still had the next one start from zero."""
    cluster = Cluster(
        batch_size=4,
        checkpoint_interval=256,
        watermark_window=512,
        pending_request_limit=256,
        client_pending_limit=256,
        max_clock_skew_ms=86_400_000,  # the harness stamps batches 0: no clock in play
    )
    replica = cluster.replica(1)
    limit = replica.viewchanges.overtake_limit()
    assert limit == 4 * 4 + 256 + OVERTAKE_SLACK
    cluster.tick(replica, 1)
    victims = [cluster.request(r, amount=1, client=1) for r in (1, 2, 3)]
    cluster.deliver(replica, *victims)
    timeout = cluster.config.view_change_timeout_ms
    step = timeout - 50
    per_victim = limit // 4
    batches: list[list[bytes]] = []
    rid = 1000
    for victim in victims:
        for i in range(per_victim):
            fill = 3 if i == per_victim - 1 else 4
            batch = [cluster.request(rid + j, amount=1, client=0) for j in range(fill)]
            rid += fill
            batches.append(batch + ([victim] if fill == 3 else []))
    chain = cluster.chain()
    suspected_at = None
    now = 10
    for n, batch in enumerate(batches, start=1):
        # The colluder's requests reach this backup a moment before the primary orders them.
        while now < step * n:
            actions = cluster.tick(replica, now) + cluster.deliver(replica, cluster.heartbeat(0))
            if broadcasts(actions, Suspect) and suspected_at is None:
                suspected_at = now
            now += 10
        cluster.deliver(replica, *[raw for raw in batch if raw not in victims])
        actions = cluster.drive_commit(replica, chain.append(batch))
        if broadcasts(actions, Suspect) and suspected_at is None:
            suspected_at = now
        if suspected_at is not None:
            break
    first_slipped_in = step * per_victim
    assert suspected_at is not None
    assert first_slipped_in < suspected_at <= first_slipped_in + 2 * step
    assert suspected_at <= ((limit + 1) / 4 + 1) * timeout


def test_a_primary_trickling_part_full_batches_past_held_requests_is_suspected() -> None:
    """A slow primary: batches of 32 allowed, it orders a backlog the backup holds in
    arrival order, but one request at a time, each just under a timeout apart. A part-full
    batch that leaves behind requests held for a timeout is not progress (a correct primary
    would have taken them), so the backup suspects it within two timeouts, long before the
    request at the end of the queue is reached."""
    cluster = Cluster(checkpoint_interval=64, watermark_window=128)
    assert cluster.config.batch_size > 1
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    backlog = [cluster.request(100 + i, amount=1) for i in range(60)]
    cluster.deliver(replica, *backlog)
    timeout = cluster.config.view_change_timeout_ms
    step = timeout - 10
    order = {step * (i + 1): [raw] for i, raw in enumerate(backlog)}
    suspected_at, _ = _run(cluster, replica, step * 61, order)
    assert suspected_at is not None
    assert suspected_at <= 2 * timeout + 10, (suspected_at, timeout)


def test_requests_raced_past_a_held_one_in_part_full_batches_do_not_hide_it() -> None:
    """The victim reaches the backup first; another client's 60 requests a moment later
    (they raced it, so they never count as overtaking). The primary orders only those, one
    a batch: the victim, held for a timeout and left behind by part-full batches, makes the
    backup suspect within two timeouts (before, it waited on behind all 60)."""
    cluster = Cluster(checkpoint_interval=64, watermark_window=128)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1))
    cluster.tick(replica, 2)
    others = [cluster.request(100 + i, amount=1) for i in range(60)]
    cluster.deliver(replica, *others)
    timeout = cluster.config.view_change_timeout_ms
    order = {250 * (i + 1): [raw] for i, raw in enumerate(others)}
    suspected_at, _ = _run(cluster, replica, 250 * 61, order)
    assert (1, 1) in replica.requests.pending
    assert suspected_at is not None
    assert suspected_at <= 2 * timeout + 10, (suspected_at, timeout)


def test_a_primary_ordering_only_null_batches_is_suspected_after_one_timeout() -> None:
    """Batches that order nothing are no progress for a waiting request."""
    cluster = Cluster(checkpoint_interval=64, watermark_window=128)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    cluster.deliver(replica, cluster.request(1, client=1))
    order: dict[int, list[bytes]] = {50 * i: [] for i in range(1, 30)}
    timeout = cluster.config.view_change_timeout_ms
    suspected_at, last = _run(cluster, replica, 3 * timeout, order)
    assert last > 0 and replica.last_executed == last
    assert suspected_at is not None and timeout <= suspected_at < timeout + 20


def test_a_request_behind_a_stalled_backlog_is_suspected_after_one_timeout() -> None:
    """The primary ordered part of a backlog, then stopped: progress, then none for a
    timeout while requests wait, and the backup suspects it."""
    cluster = Cluster(batch_size=1, checkpoint_interval=64, watermark_window=128)
    replica = cluster.replica(1)
    cluster.tick(replica, 1)
    backlog = [cluster.request(i, amount=1) for i in range(1, 21)]
    cluster.deliver(replica, *backlog)
    order = {100 * (i + 1): [raw] for i, raw in enumerate(backlog[:10])}
    timeout = cluster.config.view_change_timeout_ms
    suspected_at, _ = _run(cluster, replica, 3000, order)
    assert suspected_at is not None and 1000 + timeout <= suspected_at < 1000 + timeout + 20


# The shrunk case of issue 10 (`fuzz-2371077295`): no faults, one client offering 400
# payments a second to a configuration that orders about ten.
SHRUNK_OVERLOAD = """
name = "fuzz-2371077295-shrunk"
seed = 3932868245

[cluster]
replicas = 4
batch_size = 1
checkpoint_interval = 1
view_change_timeout_ms = 600
batch_timeout_ms = 20
heartbeat_interval_ms = 251
retransmit_interval_ms = 63
client_timeout_ms = 1045
watermark_window = 1

[network.latency_ms]
dist = "exponential"
mean = 23
min = 2

[workload]
clients = 1
accounts = 2
initial_balance = 1000
payments = 87
rate_per_s = 400
overdraw = 0.3

[liveness]
heal_all_at_ms = 2453
within_ms = 9000

[expect]
safety = true
liveness = true
"""


def test_an_overloaded_fault_free_run_has_no_view_change() -> None:
    result = run_scenario(parse_scenario(SHRUNK_OVERLOAD))
    assert result.verdict == "ok", result.expectation_failures
    assert result.view_changes == 0
    assert result.undecided == 0
    # It was overloaded: payments waited seconds behind the backlog.
    assert result.latency_ms["p99"] is not None and result.latency_ms["p99"] > 4000
    # The fuzzer's capacity estimate is conservative (else its liveness bound would be too
    # short for overload): the run ordered faster than estimated (the simulated time here
    # includes the run's settling after the last decision, so this understates the rate).
    document = tomllib.loads(SHRUNK_OVERLOAD)
    estimate = capacity_per_s(document["cluster"], document["network"])
    assert workload_rate(document) > estimate
    assert result.submitted / (result.simulated_ms / 1000) > estimate


def workload_rate(document: dict[str, Any]) -> int:
    return int(document["workload"]["rate_per_s"])


def test_the_fuzzers_liveness_bound_accounts_for_an_overloaded_configuration() -> None:
    document = generate_document(2371077295)
    cluster, network, workload = document["cluster"], document["network"], document["workload"]
    capacity = capacity_per_s(cluster, network)
    assert workload["rate_per_s"] > capacity
    drain = backlog_drain_ms(cluster, network, workload)
    assert drain >= workload["payments"] * 1000 / capacity
    assert document["liveness"]["within_ms"] == (
        liveness_within_ms(cluster["view_change_timeout_ms"]) + drain
    )
    # A configuration that orders its load keeps the bound it had.
    roomy = {**cluster, "batch_size": 128}
    assert backlog_drain_ms(roomy, network, workload) == 0


# Found by `pbft fuzz --seed 2371077295` (case seed 2371077413), shrunk: the only client is
# Byzantine and keeps its requests coming after every payment is decided, a view change
# follows late, and the run used to stop while one replica was executing the last entry.
LATE_WORK_AT_THE_STOP = """
name = "fuzz-2371077413"
seed = 1218305412
byzantine = [
    { client = 0, behavior = "reuse_request_id", kind = "after_decision" },
]

[cluster]
replicas = 4
batch_size = 1
checkpoint_interval = 1
heartbeat_interval_ms = 60
client_timeout_ms = 498

[network.latency_ms]
dist = "exponential"
mean = 16
min = 3

[workload]
clients = 1
accounts = 3
payments = 22
rate_per_s = 400

[liveness]
heal_all_at_ms = 1
within_ms = 19136

[expect]
safety = true
liveness = true
"""


def test_a_run_does_not_stop_while_a_replica_is_executing_the_last_entry() -> None:
    result = run_scenario(parse_scenario(LATE_WORK_AT_THE_STOP))
    assert result.converged, result.final_states
    assert result.verdict == "ok", result.expectation_failures


def test_the_fuzzers_backlog_allowance_is_not_given_with_a_byzantine_replica() -> None:
    """Review finding F5: the allowance is for a backlog behind a correct primary. A
    Byzantine replica may be the primary, and the allowance would let it slow the backlog
    unnoticed, so a case with one offers only what its configuration orders (the rate is
    lowered to the capacity it is estimated at with a Byzantine party) and gets the plain
    liveness bound. A case whose only Byzantine party is a client keeps the allowance."""
    capped = client_only_allowances = 0
    for seed in range(200):
        document = generate_document(seed)
        cluster, network = document["cluster"], document["network"]
        workload = document["workload"]
        byzantine = document.get("byzantine", [])
        plain = liveness_within_ms(cluster["view_change_timeout_ms"])
        if any("replica" in entry for entry in byzantine):
            assert backlog_drain_ms(cluster, network, workload, byzantine=True) == 0, seed
            assert document["liveness"]["within_ms"] == plain, seed
            assert workload["rate_per_s"] <= capacity_per_s(cluster, network) / 2, seed
            capped += workload["rate_per_s"] not in (20, 50, 100, 200, 400)
        elif byzantine and document["liveness"]["within_ms"] > plain:
            client_only_allowances += 1
    assert capped > 10  # the rule was exercised: cases that drew more than they order
    assert client_only_allowances > 0
