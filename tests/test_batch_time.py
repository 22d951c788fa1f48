"""Agreed batch timestamps: how the primary stamps a batch, when a backup accepts the stamp,
how a NEW-VIEW carries stamps over, and a primary that lies about time in the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_harness import Cluster, broadcasts, executed

from pbft.chain import entry_digest
from pbft.config import ClusterConfig, ConfigError
from pbft.events import Tick
from pbft.ledger import Account, Ledger
from pbft.messages import NewView, Prepare, PrePrepare, ViewChange
from pbft.operations import Payment
from pbft.replica import Replica
from pbft.status import ViewStatus
from sim.adversary import Adversary, build_behavior
from sim.scenario import load_scenario
from sim.simulator import run_scenario

ROOT = Path(__file__).resolve().parent.parent
SKEW = 1_000


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(max_clock_skew_ms=SKEW)


def backup_at(cluster: Cluster, clock_ms: int, replica_id: int = 1) -> Replica:
    replica = cluster.replica(replica_id)
    cluster.tick(replica, clock_ms)
    return replica


def prepared(actions: list) -> list[int]:
    return [prepare.seq for prepare in broadcasts(actions, Prepare)]


# --- the primary --------------------------------------------------------------------------


def test_primary_stamps_a_batch_with_its_clock(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    cluster.tick(primary, 4_321)
    (proposal,) = broadcasts(cluster.deliver(primary, cluster.request(1)), PrePrepare)
    assert proposal.timestamp_ms == 4_321


def test_primary_stamps_the_wall_clock_when_the_driver_gives_one(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    primary.handle(Tick(10, wall_ms=1_700_000_000_000))
    (proposal,) = broadcasts(cluster.deliver(primary, cluster.request(1)), PrePrepare)
    assert proposal.timestamp_ms == 1_700_000_000_000


def test_primary_never_stamps_before_the_batch_below(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    primary.handle(Tick(10, wall_ms=5_000))
    (first,) = broadcasts(cluster.deliver(primary, cluster.request(1)), PrePrepare)
    # The wall clock steps back (NTP): the next stamp stays at the last one.
    primary.handle(Tick(20, wall_ms=4_000))
    (second,) = broadcasts(cluster.deliver(primary, cluster.request(2)), PrePrepare)
    assert (first.timestamp_ms, second.timestamp_ms) == (5_000, 5_000)


# --- a backup's acceptance rules ----------------------------------------------------------


def test_backup_accepts_a_stamp_within_the_bound_of_its_clock(cluster: Cluster) -> None:
    for stamp in (5_000 - SKEW, 5_000, 5_000 + SKEW):
        replica = backup_at(cluster, 5_000)
        entry = cluster.pre_prepare(1, [cluster.request(1)], timestamp_ms=stamp)
        assert prepared(cluster.deliver(replica, entry.raw)) == [1]
        assert replica.drops["bad_timestamp"] == 0


def test_a_lying_primary_moves_a_hold_by_up_to_twice_the_bound(cluster: Cluster) -> None:
    """Review finding T2: one backup clock (5,000) accepts a batch stamped a bound behind it
    and a later one a bound ahead: a hold authorized in the first for 2 x the bound is
    released by the second at the same real time. So the bound on what a lie costs a hold
    is twice max_clock_skew_ms (a stamp a step further either way is refused:
    test_backup_refuses_a_stamp_too_far_from_its_clock): 60 s with the default."""
    replica = backup_at(cluster, 5_000)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_000 - SKEW)
    second = chain.append([cluster.request(2)], timestamp_ms=5_000 + SKEW)
    cluster.drive_commit(replica, first)
    cluster.drive_commit(replica, second)
    assert replica.last_executed == 2 and replica.drops["bad_timestamp"] == 0
    ledger = Ledger({"p": Account(owner=7, balance=100), "q": Account(owner=8, balance=0)})
    ledger.begin_batch(1, first.timestamp_ms)
    hold = Payment(7, 1, "p", "q", 50, "authorize", 0, 0, 2 * SKEW)
    assert ledger.execute(hold, bytes(32), 1).postings
    (release,) = ledger.begin_batch(2, second.timestamp_ms)
    assert (release.hold_client, release.hold_request, release.amount) == (7, 1, 50)
    assert 2 * ClusterConfig().max_clock_skew_ms == 60_000


@pytest.mark.parametrize("stamp", [5_000 + SKEW + 1, 5_000 - SKEW - 1, 0, 10**12])
def test_backup_refuses_a_stamp_too_far_from_its_clock(cluster: Cluster, stamp: int) -> None:
    replica = backup_at(cluster, 5_000)
    entry = cluster.pre_prepare(1, [cluster.request(1)], timestamp_ms=stamp)
    assert prepared(cluster.deliver(replica, entry.raw)) == []
    assert replica.drops["bad_timestamp"] == 1
    assert replica.ordering.slots[1].proposal is None
    # Still a backup of the same primary: the refusal is a drop, the timers do the rest.
    assert (replica.view, replica.status) == (0, ViewStatus.NORMAL)


def test_backup_refuses_a_stamp_before_the_batch_below(cluster: Cluster) -> None:
    replica = backup_at(cluster, 5_000)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_200)
    second = chain.append([cluster.request(2)], timestamp_ms=5_199)
    cluster.deliver(replica, first.raw)
    assert prepared(cluster.deliver(replica, second.raw)) == []
    assert replica.drops["bad_timestamp"] == 1


def test_backup_refuses_a_stamp_after_the_batch_above(cluster: Cluster) -> None:
    """Pipelining: the later batch arrived first; the earlier one may not be stamped after it."""
    replica = backup_at(cluster, 5_000)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_300)
    second = chain.append([cluster.request(2)], timestamp_ms=5_200)
    cluster.deliver(replica, second.raw)
    assert prepared(cluster.deliver(replica, first.raw)) == []
    assert replica.drops["bad_timestamp"] == 1
    assert replica.ordering.slots[1].proposal is None


def test_backup_accepts_equal_stamps_in_a_row(cluster: Cluster) -> None:
    replica = backup_at(cluster, 5_000)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_000)
    second = chain.append([cluster.request(2)], timestamp_ms=5_000)
    cluster.deliver(replica, second.raw)
    assert prepared(cluster.deliver(replica, first.raw)) == [1]
    assert replica.drops["bad_timestamp"] == 0


def test_backup_refuses_a_stamp_before_the_last_executed_batch(cluster: Cluster) -> None:
    replica = backup_at(cluster, 5_000)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_500)
    cluster.drive_commit(replica, first)
    assert replica.last_executed == 1
    second = chain.append([cluster.request(2)], timestamp_ms=5_400)
    assert prepared(cluster.deliver(replica, second.raw)) == []
    assert replica.drops["bad_timestamp"] == 1


def test_a_stamp_ahead_of_the_clock_is_accepted_only_if_it_repeats_the_one_below(
    cluster: Cluster,
) -> None:
    """A primary whose clock is behind an earlier stamp keeps the time still: accepted, it
    moves nothing on. A stamp beyond the bound that moves time on is refused."""
    replica = cluster.replica(1)
    replica.handle(Tick(10, wall_ms=5_000))
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_900)
    cluster.drive_commit(replica, first)
    replica.handle(Tick(20, wall_ms=4_500))  # the wall clock stepped back
    second = chain.append([cluster.request(2)], timestamp_ms=5_900)
    third = chain.append([cluster.request(3)], timestamp_ms=5_901)
    assert prepared(cluster.deliver(replica, second.raw)) == [2]
    assert prepared(cluster.deliver(replica, third.raw)) == []
    assert replica.drops["bad_timestamp"] == 1


def test_the_stamp_is_bound_into_the_entry_digest(cluster: Cluster) -> None:
    entry = cluster.pre_prepare(1, [cluster.request(1)], timestamp_ms=7)
    other = cluster.pre_prepare(1, [cluster.request(1)], timestamp_ms=8)
    assert entry.digest != other.digest
    replica = backup_at(cluster, 0)
    proposal = replica.verifier.proposal(entry.raw)
    assert proposal.timestamp_ms == 7
    assert proposal.entry_digest == entry_digest(1, entry.prev_hash, entry.batch_digest, 7)


def test_executed_batch_time_is_the_agreed_stamp(cluster: Cluster) -> None:
    """Every replica executes against the stamp, whatever its own clock says."""
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=5_400)
    for clock in (4_500, 6_300):
        replica = backup_at(cluster, clock)
        (record,) = executed(cluster.drive_commit(replica, first))
        assert record.timestamp_ms == 5_400
        assert replica.last_executed == 1
        assert replica.ordering.last_executed_timestamp_ms == 5_400
        assert replica.ordering._batch_time_ms(replica.ordering.slots[1].committed.proposal) == (
            5_400
        )


# --- view change --------------------------------------------------------------------------


def _reproposals(cluster: Cluster, clock_ms: int) -> tuple[Replica, list]:
    """The new primary of view 1 (clock at `clock_ms`) re-proposes seq 1 (stamped 100) and
    seq 3 (stamped 300), which replica 2 reports prepared, and fills seq 2 with a null."""
    replica = backup_at(cluster, clock_ms)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)], timestamp_ms=100)
    chain.append([cluster.request(2)], timestamp_ms=200)
    third = chain.append([cluster.request(3)], timestamp_ms=300)
    from_2 = cluster.view_change(
        1, 2, [cluster.prepared_certificate(first), cluster.prepared_certificate(third)]
    )
    from_3 = cluster.view_change(1, 3, [cluster.prepared_certificate(first)])
    cluster.deliver(replica, from_2)
    (new_view,) = broadcasts(cluster.deliver(replica, from_3), NewView)
    return replica, [replica.verifier.proposal(raw) for raw in new_view.pre_prepares]


def test_new_view_keeps_stamps_and_a_null_takes_the_next_one_above(cluster: Cluster) -> None:
    replica, proposals = _reproposals(cluster, clock_ms=50)
    assert [(p.seq, p.is_null, p.timestamp_ms) for p in proposals] == [
        (1, False, 100),
        (2, True, 300),
        (3, False, 300),
    ]
    # Its next fresh batch is stamped no earlier than the re-proposals.
    (fresh,) = broadcasts(cluster.deliver(replica, cluster.request(4)), PrePrepare)
    assert (fresh.seq, fresh.timestamp_ms) == (4, 300)


def test_a_leading_null_takes_the_stamp_of_the_first_reproposal_above_it(
    cluster: Cluster,
) -> None:
    replica = backup_at(cluster, 50)
    chain = cluster.chain()
    chain.append([cluster.request(1)], timestamp_ms=100)
    second = chain.append([cluster.request(2)], timestamp_ms=200)
    changes = [
        cluster.view_change(1, 2, [cluster.prepared_certificate(second)]),
        cluster.view_change(1, 3),
    ]
    (new_view,) = broadcasts(cluster.deliver(replica, *changes), NewView)
    proposals = [replica.verifier.proposal(raw) for raw in new_view.pre_prepares]
    assert [(p.seq, p.is_null, p.timestamp_ms) for p in proposals] == [
        (1, True, 200),
        (2, False, 200),
    ]


def test_new_view_reproposals_are_old_so_the_skew_bound_does_not_apply(cluster: Cluster) -> None:
    """A backup whose clock is far past the re-proposed stamps still installs the view."""
    primary, proposals = _reproposals(cluster, clock_ms=50)
    backup = backup_at(cluster, 100_000, replica_id=2)
    new_view = primary.viewchanges.new_view_message
    assert new_view is not None
    actions = cluster.deliver(backup, new_view)
    assert (backup.view, backup.status) == (1, ViewStatus.NORMAL)
    assert prepared(actions) == [1]
    assert backup.drops["bad_timestamp"] == 0


def test_backup_refuses_a_new_view_whose_reproposal_changes_a_stamp(cluster: Cluster) -> None:
    primary, proposals = _reproposals(cluster, clock_ms=50)
    new_view = primary.viewchanges.new_view_message
    assert new_view is not None
    message = primary.verifier.open(new_view, NewView).message
    assert isinstance(message, NewView)
    restamped = [
        cluster.pre_prepare(
            p.seq,
            [request.raw for request in p.requests],
            view=1,
            prev_hash=p.prev_hash,
            timestamp_ms=p.timestamp_ms + (1 if p.seq == 1 else 0),
        ).raw
        for p in proposals
    ]
    forged = cluster.new_view(1, message.view_changes, restamped)
    backup = backup_at(cluster, 50, replica_id=2)
    cluster.deliver(backup, forged)
    assert backup.drops["bad_new_view"] == 1
    assert backup.statistics().new_views_installed == 0


def test_view_change_carries_the_stamps_of_prepared_batches(cluster: Cluster) -> None:
    replica = backup_at(cluster, 5_000, replica_id=2)
    entry = cluster.pre_prepare(1, [cluster.request(1)], timestamp_ms=5_100)
    cluster.drive_prepared(replica, entry)
    actions = cluster.deliver(replica, cluster.suspect(0, 1), cluster.suspect(0, 3))
    (change,) = broadcasts(actions, ViewChange)
    (certificate,) = change.prepared
    assert replica.verifier.prepared_certificate(certificate).timestamp_ms == 5_100


# --- the lying primary (sim/adversary) ----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "seq", "expected"),
    [
        ("future", 1, 5_000 + 10 * SKEW),
        ("past", 1, 0),
        ("backwards", 1, 5_000 + SKEW // 2),
        ("backwards", 2, 5_000),
    ],
)
def test_bad_timestamp_rewrites_the_stamp_only(
    cluster: Cluster, kind: str, seq: int, expected: int
) -> None:
    liar = build_behavior(
        "bad_timestamp",
        0,
        cluster.replica_keys[0],
        Adversary.for_cluster(4, frozenset({0})),
        config=cluster.config,
        params={"kind": kind},
    )
    original = cluster.pre_prepare(seq, [cluster.request(1)], timestamp_ms=5_000)
    (sent,) = liar.outgoing(("replica", 1), original.raw, 0)
    replica = backup_at(cluster, 0)
    proposal = replica.verifier.proposal(sent)
    assert proposal.timestamp_ms == expected
    assert (proposal.seq, proposal.batch_digest) == (seq, original.batch_digest)
    assert (sent == original.raw) == (expected == 5_000)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 24 * 3600 * 1000 + 1])
def test_max_clock_skew_is_validated(value: int) -> None:
    with pytest.raises(ConfigError, match="max_clock_skew_ms"):
        ClusterConfig(max_clock_skew_ms=value)


# --- the simulator ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "byzantine-bad-timestamp",
        "byzantine-bad-timestamp-past",
        "byzantine-bad-timestamp-backwards",
        "clock-skew-beyond-bound",
    ],
)
def test_refused_stamps_leave_the_correct_replicas_deciding_together(name: str) -> None:
    scenario = load_scenario(ROOT / "scenarios" / f"{name}.toml")
    result = run_scenario(scenario)
    assert result.verdict == "ok"
    assert result.undecided == 0
    assert result.messages_dropped.get("replica:bad_timestamp", 0) > 0
    if name.startswith("byzantine"):
        assert result.view_changes >= 1  # the lying primary was deposed
    assert run_scenario(scenario).trace_hash == result.trace_hash


def test_clock_skew_within_the_bound_refuses_nothing() -> None:
    result = run_scenario(load_scenario(ROOT / "scenarios" / "clock-skew.toml"))
    assert result.verdict == "ok"
    assert result.messages_dropped.get("replica:bad_timestamp", 0) == 0
