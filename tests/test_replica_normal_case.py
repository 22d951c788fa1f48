"""The PBFT normal case at one replica: pre-prepare, prepare, commit, execute, batching,
heartbeats and exactly-once execution, driven with hand-made signed messages."""

from __future__ import annotations

import hashlib

import pytest
from replica_harness import (
    Cluster,
    Network,
    broadcast_raws,
    broadcasts,
    executed,
    first_index,
    is_broadcast_of,
    is_persist_of,
    persisted_keys,
    sends,
)

from pbft.chain import batch_digest, entry_digest
from pbft.events import Broadcast, Executed, Send
from pbft.messages import Commit, Heartbeat, Prepare, PrePrepare, Reply
from pbft.receipt import verify_receipt
from pbft.replies import check_reply
from pbft.signed import open_envelope, peek
from pbft.status import ViewStatus


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def body_digest(cluster: Cluster, raw: bytes) -> bytes:
    return open_envelope(raw, cluster.keyring, cluster.cache).body_digest


# --- prepare --------------------------------------------------------------------------


def test_backup_prepares_valid_pre_prepare_from_primary(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    request = cluster.request(1)
    entry = cluster.pre_prepare(1, [request])

    actions = cluster.deliver(replica, entry.raw)

    prepares = broadcasts(actions, Prepare)
    assert len(prepares) == 1
    prepare = prepares[0]
    expected = entry_digest(1, cluster.genesis_chain_hash, batch_digest([request]), 0)
    assert (prepare.view, prepare.seq, prepare.replica, prepare.entry_digest) == (
        0,
        1,
        1,
        expected,
    )
    # Durability first: the vote is written before it is sent.
    persist_at = first_index(actions, is_persist_of(("vote", "prepare", 0, 1)))
    broadcast_at = first_index(actions, is_broadcast_of(Prepare))
    assert persist_at < broadcast_at
    persisted = actions[persist_at]
    assert persisted.value == actions[broadcast_at].data
    # The broadcast prepare is signed by replica 1.
    assert open_envelope(actions[broadcast_at].data, cluster.keyring, cluster.cache)
    assert replica.drops == {}


def test_backup_prepares_pre_prepare_with_null_batch(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    entry = cluster.pre_prepare(1, [])
    assert [p.entry_digest for p in broadcasts(cluster.deliver(replica, entry.raw), Prepare)] == [
        entry.digest
    ]


def _assert_not_prepared(replica, actions, reason: str) -> None:
    assert broadcasts(actions, Prepare) == []
    assert persisted_keys(actions) == []
    assert replica.drops[reason] == 1


def test_backup_does_not_prepare_pre_prepare_from_non_primary(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)], replica=2)
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "not_primary")


def test_backup_does_not_prepare_pre_prepare_for_another_view(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    # View 1's primary (replica 1) proposes while replica 2 is still in view 0.
    entry = cluster.pre_prepare(1, [cluster.request(1)], view=1)
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "wrong_view")
    assert replica.view == 0 and replica.status is ViewStatus.NORMAL


def test_backup_does_not_prepare_pre_prepare_above_watermark_window(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    high = cluster.config.watermark_window + 1
    entry = cluster.pre_prepare(high, [cluster.request(1)])
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "above_window")


def test_backup_does_not_prepare_pre_prepare_at_sequence_zero(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(0, [cluster.request(1)])
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "stale")


def test_backup_does_not_prepare_pre_prepare_with_wrong_batch_digest(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    wrong = batch_digest([cluster.request(2)])
    entry = cluster.pre_prepare(1, [cluster.request(1)], batch=wrong)
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "bad_batch_digest")


def test_backup_does_not_prepare_batch_with_bad_client_signature(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    # Claims to be client 0 but is signed with client 1's key.
    forged = cluster.request(1, client=0, key=cluster.client_keys[1])
    entry = cluster.pre_prepare(1, [cluster.request(2), forged])
    _assert_not_prepared(
        replica, cluster.deliver(replica, entry.raw), "batch_request_bad_signature"
    )


def test_backup_does_not_prepare_batch_with_duplicated_request(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    request = cluster.request(1)
    entry = cluster.pre_prepare(1, [request, request])
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "batch_duplicate_request")


def test_backup_does_not_prepare_batch_reusing_request_id_with_two_bodies(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1, 10), cluster.request(1, 20)])
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "batch_duplicate_request")


def test_backup_does_not_prepare_batch_larger_than_batch_size(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    requests = [cluster.request(i) for i in range(cluster.config.batch_size + 1)]
    entry = cluster.pre_prepare(1, requests)
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "batch_too_large")


def test_backup_does_not_prepare_pre_prepare_with_wrong_prev_hash(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)], prev_hash=b"\x07" * 32)
    _assert_not_prepared(replica, cluster.deliver(replica, entry.raw), "bad_chain")


def test_backup_rejects_pre_prepare_not_chained_to_known_predecessor(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    cluster.deliver(replica, first.raw)
    # Seq 2 names a predecessor other than the seq-1 entry the replica holds.
    stray = cluster.pre_prepare(2, [cluster.request(2)], prev_hash=cluster.genesis_chain_hash)
    _assert_not_prepared(replica, cluster.deliver(replica, stray.raw), "bad_chain")


# --- chain rule -------------------------------------------------------------------------


def test_chain_rule_successor_not_prepared_before_predecessor_is_prepared(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])

    early = cluster.deliver(replica, second.raw)
    assert broadcasts(early, Prepare) == []
    assert replica.drops == {}

    # Seq 1 arrives: the replica prepares seq 1 only; seq 1 is not yet *prepared*.
    actions = cluster.deliver(replica, first.raw)
    assert [p.seq for p in broadcasts(actions, Prepare)] == [1]

    # Seq 1 becomes prepared (own prepare + one more): now seq 2 is prepared too.
    actions = cluster.deliver(replica, cluster.prepare(2, first))
    assert [c.seq for c in broadcasts(actions, Commit)] == [1]
    prepares = broadcasts(actions, Prepare)
    assert [(p.seq, p.entry_digest) for p in prepares] == [(2, second.digest)]
    # ... and in that order: commit for 1, then prepare for 2.
    assert first_index(actions, is_broadcast_of(Commit)) < first_index(
        actions, is_broadcast_of(Prepare)
    )


def test_chain_rule_successor_prepared_at_once_when_predecessor_already_prepared(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(3)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    cluster.drive_prepared(replica, first)
    actions = cluster.deliver(replica, second.raw)
    assert [p.seq for p in broadcasts(actions, Prepare)] == [2]


# --- commit -----------------------------------------------------------------------------


def test_two_f_matching_prepares_make_backup_commit_after_persisting_certificate(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, entry.raw)

    actions = cluster.deliver(replica, cluster.prepare(2, entry))

    commits = broadcasts(actions, Commit)
    assert [(c.view, c.seq, c.replica, c.entry_digest) for c in commits] == [
        (0, 1, 1, entry.digest)
    ]
    prepared_at = first_index(actions, is_persist_of(("prepared", 1)))
    vote_at = first_index(actions, is_persist_of(("vote", "commit", 0, 1)))
    commit_at = first_index(actions, is_broadcast_of(Commit))
    assert prepared_at < vote_at < commit_at


def test_prepare_for_another_digest_does_not_count_towards_prepared(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, entry.raw)
    other = cluster.prepare_vote(0, 1, 2, b"\x01" * 32)
    assert broadcasts(cluster.deliver(replica, other), Commit) == []
    # The matching one from replica 3 completes 2f.
    assert len(broadcasts(cluster.deliver(replica, cluster.prepare(3, entry)), Commit)) == 1


def test_primary_commits_after_two_f_prepares_from_backups(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    actions = cluster.deliver(primary, cluster.request(1))
    (pre_prepare_raw,) = broadcast_raws(actions, PrePrepare)
    pre_prepare = cluster.pre_prepare(1, [cluster.request(1)])
    assert pre_prepare.raw == pre_prepare_raw  # deterministic signature, same bytes
    assert broadcasts(cluster.deliver(primary, cluster.prepare(1, pre_prepare)), Commit) == []
    assert len(broadcasts(cluster.deliver(primary, cluster.prepare(2, pre_prepare)), Commit)) == 1


# --- execute ----------------------------------------------------------------------------


def test_two_f_plus_one_commits_execute_batch_and_reply_to_clients(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    first = cluster.request(1, 100, client=0)
    second = cluster.request(7, 2000, client=1)  # carol has only 1000 + 0
    entry = cluster.pre_prepare(1, [first, second])
    cluster.drive_prepared(replica, entry)

    assert executed(cluster.deliver(replica, cluster.commit(0, entry))) == []
    actions = cluster.deliver(replica, cluster.commit(2, entry))

    (execution,) = executed(actions)
    assert (execution.view, execution.seq, execution.entry_digest) == (0, 1, entry.digest)
    outcomes = [
        (r.client_id, r.request_id, r.outcome, r.reason, r.fresh) for r in execution.requests
    ]
    assert outcomes == [
        (0, 1, "confirmed", "", True),
        (1, 7, "rejected", "insufficient_funds", True),
    ]
    # The commit certificate is durable before execution.
    assert first_index(actions, is_persist_of(("committed", 1))) < first_index(
        actions, lambda a: isinstance(a, Executed)
    )
    # A reply to each client, both under one signature over the batch's root.
    signatures = set()
    for client, raw, outcome, reason in (
        (0, first, "confirmed", ""),
        (1, second, "rejected", "insufficient_funds"),
    ):
        (reply_raw,) = [
            a.data for a in actions if isinstance(a, Send) and a.to == ("client", client)
        ]
        envelope, reply = peek(reply_raw, Reply)
        assert isinstance(reply, Reply)
        check_reply(envelope, reply, cluster.keyring, cluster.cache)
        signatures.add(envelope.signature)
        assert (reply.batch_seq, reply.batch_size, reply.index) == (1, 2, client)
        assert (reply.view, reply.seq, reply.replica, reply.outcome, reply.reason) == (
            0,
            1,
            1,
            outcome,
            reason,
        )
        assert reply.request_digest == body_digest(cluster, raw)
    assert len(signatures) == 1
    assert replica.last_executed == 1
    assert replica.ledger.balance("alice") == 900
    assert replica.ledger.balance("carol") == 1100
    assert replica.ledger.digest() == cluster.model_ledger([entry]).digest()


def test_commits_before_prepared_are_kept_and_count_once_prepared(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, entry.raw)
    early = cluster.deliver(replica, *cluster.commits(entry, [0, 1]))
    assert executed(early) == []
    actions = cluster.deliver(replica, cluster.prepare(3, entry))
    assert [e.seq for e in executed(actions)] == [1]


def test_batches_execute_strictly_in_sequence_order(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    cluster.drive_prepared(replica, first)
    cluster.drive_prepared(replica, second)

    actions = cluster.deliver(replica, *cluster.commits(second, [0, 2]))
    assert executed(actions) == []
    assert replica.last_executed == 0
    assert ("committed", 2) in persisted_keys(actions)

    actions = cluster.deliver(replica, *cluster.commits(first, [0, 2]))
    assert [e.seq for e in executed(actions)] == [1, 2]
    assert replica.last_executed == 2
    assert [r.seq for r in sends(actions, kind=Reply)] == [1, 2]


def test_late_votes_for_executed_sequence_are_dropped_as_stale(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.drive_commit(replica, entry)
    assert replica.last_executed == 1
    actions = cluster.deliver(replica, cluster.commit(3, entry), cluster.prepare(3, entry))
    assert actions == []
    assert replica.drops["stale"] == 2


# --- primary: batching and heartbeats -----------------------------------------------------


def test_primary_proposes_single_request_at_once_with_zero_batch_timeout(
    cluster: Cluster,
) -> None:
    primary = cluster.replica(0)
    request = cluster.request(1)
    actions = cluster.deliver(primary, request)
    (pre_prepare,) = broadcasts(actions, PrePrepare)
    assert (pre_prepare.view, pre_prepare.seq, pre_prepare.replica) == (0, 1, 0)
    assert pre_prepare.prev_hash == cluster.genesis_chain_hash
    assert pre_prepare.requests == (request,)
    assert first_index(actions, is_persist_of(("vote", "pre_prepare", 0, 1))) < first_index(
        actions, is_broadcast_of(PrePrepare)
    )


def test_a_lone_request_is_proposed_at_once_when_nothing_is_in_flight() -> None:
    """Adaptive batching: with no batch in flight the primary does not wait for the batch
    timeout (no tick in a lone payment's way)."""
    cluster = Cluster(batch_timeout_ms=10)
    primary = cluster.replica(0)
    cluster.tick(primary, 0)
    first = cluster.request(1)
    (batch,) = broadcasts(cluster.deliver(primary, first), PrePrepare)
    assert batch.seq == 1 and batch.requests == (first,)


def test_requests_gather_into_the_next_batch_while_one_is_in_flight() -> None:
    """While a batch is in flight, requests gather until the batch is full (batch_size) or
    its oldest has waited batch_timeout_ms."""
    cluster = Cluster(batch_timeout_ms=10)
    primary = cluster.replica(0)
    cluster.tick(primary, 0)
    first, second, third, fourth = (cluster.request(i) for i in (1, 2, 3, 4))
    (in_flight,) = broadcasts(cluster.deliver(primary, first), PrePrepare)

    assert broadcasts(cluster.deliver(primary, second), PrePrepare) == []
    actions = cluster.deliver(primary, third)
    (batch,) = broadcasts(actions, PrePrepare)
    assert batch.seq == 2 and batch.requests == (second, third)
    assert batch.batch_digest == batch_digest([second, third])
    assert batch.prev_hash == entry_digest(
        1, cluster.genesis_chain_hash, in_flight.batch_digest, in_flight.timestamp_ms
    )

    # A lone request behind batches in flight waits for the batch timeout, then goes alone.
    assert broadcasts(cluster.deliver(primary, fourth), PrePrepare) == []
    assert broadcasts(cluster.tick(primary, 9), PrePrepare) == []
    (alone,) = broadcasts(cluster.tick(primary, 10), PrePrepare)
    assert alone.seq == 3 and alone.requests == (fourth,)


def test_primary_does_not_propose_the_same_pending_request_twice(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    request = cluster.request(1)
    assert len(broadcasts(cluster.deliver(primary, request), PrePrepare)) == 1
    assert cluster.deliver(primary, request) == []


def test_primary_does_not_propose_beyond_watermark_window() -> None:
    cluster = Cluster(max_inflight_batches=64)
    primary = cluster.replica(0)
    window = cluster.config.watermark_window
    actions = cluster.deliver(primary, *(cluster.request(i) for i in range(window + 3)))
    assert [p.seq for p in broadcasts(actions, PrePrepare)] == list(range(1, window + 1))
    assert len(primary.requests.proposal_queue) == 3


def test_primary_keeps_at_most_max_inflight_batches_unexecuted(cluster: Cluster) -> None:
    """Beyond the in-flight limit requests wait and gather into fuller batches."""
    primary = cluster.replica(0)
    limit = cluster.config.max_inflight_batches
    total = cluster.config.batch_size * (limit + 2)
    actions = cluster.deliver(primary, *(cluster.request(i) for i in range(total)))
    proposals = broadcasts(actions, PrePrepare)
    assert [p.seq for p in proposals] == list(range(1, limit + 1))
    proposed = sum(len(p.requests) for p in proposals)
    assert len(primary.requests.proposal_queue) == total - proposed > 0


def test_primary_sends_heartbeats_on_ticks_when_idle(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    interval = cluster.config.heartbeat_interval_ms
    assert broadcasts(cluster.tick(primary, 0), Heartbeat) == []
    assert broadcasts(cluster.tick(primary, interval - 1), Heartbeat) == []
    (heartbeat,) = broadcasts(cluster.tick(primary, interval), Heartbeat)
    assert (heartbeat.view, heartbeat.replica, heartbeat.last_proposed) == (0, 0, 0)
    assert broadcasts(cluster.tick(primary, interval + 10), Heartbeat) == []
    assert len(broadcasts(cluster.tick(primary, 2 * interval), Heartbeat)) == 1


def test_primary_sends_heartbeats_under_load_with_its_progress(cluster: Cluster) -> None:
    """Heartbeats keep coming while the primary proposes: they tell a backup that lost a
    message how far the primary got, so it knows to catch up."""
    primary = cluster.replica(0)
    interval = cluster.config.heartbeat_interval_ms
    cluster.tick(primary, 0)
    cluster.deliver(primary, cluster.request(1))  # a pre-prepare just after t = 0
    (heartbeat,) = broadcasts(cluster.tick(primary, interval), Heartbeat)
    assert heartbeat.last_proposed == 1
    assert broadcasts(cluster.tick(primary, interval + interval // 2), Heartbeat) == []


def test_backup_sends_no_heartbeats(cluster: Cluster) -> None:
    backup = cluster.replica(1)
    for now in (0, 50, 100, 150):
        assert broadcasts(cluster.tick(backup, now), Heartbeat) == []


def test_backup_relays_client_request_to_primary(cluster: Cluster) -> None:
    backup = cluster.replica(2)
    request = cluster.request(1)
    actions = cluster.deliver(backup, request)
    assert [(a.to, a.data) for a in actions if isinstance(a, Send)] == [(("replica", 0), request)]
    assert not any(isinstance(a, Broadcast) for a in actions)


# --- exactly once -----------------------------------------------------------------------


def _execute_at_primary(cluster: Cluster, primary, request: bytes, seq: int):
    actions = cluster.deliver(primary, request)
    (raw,) = broadcast_raws(actions, PrePrepare)
    message = open_envelope(raw, cluster.keyring, cluster.cache, PrePrepare).message
    assert isinstance(message, PrePrepare) and message.seq == seq
    entry = cluster.pre_prepare(seq, message.requests, prev_hash=message.prev_hash)
    assert entry.raw == raw
    actions += cluster.drive_commit(primary, entry)
    assert primary.last_executed == seq
    return entry, actions


def test_retransmitted_request_after_execution_gets_stored_reply_and_is_not_reproposed(
    cluster: Cluster,
) -> None:
    primary = cluster.replica(0)
    request = cluster.request(1, 25)
    _, actions = _execute_at_primary(cluster, primary, request, 1)
    (original,) = sends(actions, ("client", 0), Reply)

    cluster.tick(primary, 5)
    actions = cluster.deliver(primary, request)

    assert broadcasts(actions, PrePrepare) == []
    (reply,) = sends(actions, ("client", 0), Reply)
    assert (reply.seq, reply.outcome, reply.reason, reply.request_digest) == (
        original.seq,
        original.outcome,
        original.reason,
        original.request_digest,
    )
    assert reply.seq == 1
    assert primary.next_seq == 2
    assert primary.requests.pending == {}
    assert primary.ledger.balance("alice") == 975


def test_retransmitted_request_at_backup_is_answered_not_relayed(cluster: Cluster) -> None:
    backup = cluster.replica(2)
    request = cluster.request(1)
    cluster.drive_commit(backup, cluster.pre_prepare(1, [request]))
    actions = cluster.deliver(backup, request)
    assert sends(actions, ("replica", 0)) == []
    assert [r.seq for r in sends(actions, ("client", 0), Reply)] == [1]


def test_request_id_reused_with_different_body_is_rejected_and_first_decision_stays(
    cluster: Cluster,
) -> None:
    primary = cluster.replica(0)
    original = cluster.request(1, 25)
    reused = cluster.request(1, 400)  # same client and id, another body
    _execute_at_primary(cluster, primary, original, 1)

    entry, actions = _execute_at_primary(cluster, primary, reused, 2)

    (execution,) = executed(actions)
    (result,) = execution.requests
    assert (result.request_id, result.outcome, result.reason, result.amount) == (
        1,
        "rejected",
        "id_reused",
        400,
    )
    (reply,) = sends(actions, ("client", 0), Reply)
    assert (reply.outcome, reply.reason, reply.seq) == ("rejected", "id_reused", 2)
    assert reply.request_digest == body_digest(cluster, reused)
    # The original decision is untouched, and the money moved once.
    decision = primary.ledger.lookup(0, 1)
    assert decision is not None
    assert (decision.outcome.value, decision.seq) == ("confirmed", 1)
    assert (
        decision.body_digest
        == hashlib.sha256(open_envelope(original, cluster.keyring, cluster.cache).body).digest()
    )
    assert primary.ledger.balance("alice") == 975
    # The original still gets its original reply.
    again = cluster.deliver(primary, original)
    assert [(r.seq, r.outcome) for r in sends(again, ("client", 0), Reply)] == [(1, "confirmed")]
    assert (
        primary.ledger.digest()
        == cluster.model_ledger([cluster.pre_prepare(1, [original]), entry]).digest()
    )


def test_request_executed_twice_in_two_batches_is_applied_once(cluster: Cluster) -> None:
    backup = cluster.replica(1)
    request = cluster.request(1, 25)
    chain = cluster.chain()
    first = chain.append([request])
    second = chain.append([request, cluster.request(2, 5)])
    cluster.drive_commit(backup, first)
    actions = cluster.drive_commit(backup, second)
    (execution,) = executed(actions)
    assert [(r.request_id, r.fresh) for r in execution.requests] == [(1, False), (2, True)]
    replies = sends(actions, ("client", 0), Reply)
    assert [(r.request_id, r.seq) for r in replies] == [(1, 1), (2, 2)]
    assert backup.ledger.balance("alice") == 1000 - 25 - 5


# --- golden: four real replicas and real clients on an in-memory network --------------------


def test_golden_five_payments_are_decided_with_valid_receipts(cluster: Cluster) -> None:
    network = Network(cluster, client_ids=(0, 1))
    payments = [
        (0, 1, "alice", "carol", 100),
        (0, 2, "bob", "dave", 50),
        (1, 1, "carol", "alice", 30),
        (0, 3, "alice", "bob", 5000),  # more than alice has: rejected, still decided
        (1, 2, "carol", "dave", 70),
    ]
    for client, request_id, payer, payee, amount in payments:
        network.submit(client, request_id, payer, payee, amount)
    network.run()

    decided = {(d.client_id, d.request_id): d for d in network.decided}
    assert sorted(decided) == sorted((p[0], p[1]) for p in payments)
    for client, request_id, payer, payee, amount in payments:
        decision = decided[(client, request_id)]
        verified = verify_receipt(decision.receipt.encode(), cluster.keyring, cluster.cluster_id)
        assert (verified.client_id, verified.request_id) == (client, request_id)
        assert (verified.payer, verified.payee, verified.amount) == (payer, payee, amount)
        assert (verified.outcome, verified.reason, verified.seq) == (
            decision.outcome,
            decision.reason,
            decision.seq,
        )
        assert len(verified.replicas) == cluster.f + 1
    assert decided[(0, 3)].outcome == "rejected"
    assert decided[(0, 3)].reason == "insufficient_funds"
    assert all(decided[key].outcome == "confirmed" for key in decided if key != (0, 3))

    replicas = list(network.replicas.values())
    assert len({replica.ledger.digest() for replica in replicas}) == 1
    assert {replica.last_executed for replica in replicas} == {5}
    assert all(
        replica.halted is None and replica.drops.get("bad_signature", 0) == 0
        for replica in replicas
    )
    # Seq 4 was a checkpoint: every replica agreed on it.
    assert {replica.statistics().stable_checkpoint for replica in replicas} == {4}
    # Every replica executed the same batches in the same order.
    histories = {
        tuple((e.seq, e.entry_digest) for e in network.executed[i]) for i in network.replicas
    }
    assert len(histories) == 1
    ledger = replicas[0].ledger
    assert (ledger.balance("alice"), ledger.balance("bob")) == (930, 450)
    assert (ledger.balance("carol"), ledger.balance("dave")) == (1000, 120)


def test_golden_replica_restarted_from_records_rejoins(cluster: Cluster) -> None:
    network = Network(cluster, client_ids=(0,))
    for request_id in range(1, 4):
        network.submit(0, request_id, "alice", "carol", 10)
    network.run()
    # Replica 3 crashes and misses two payments, then restarts from what it persisted.
    network.down.add(3)
    for request_id in range(4, 6):
        network.submit(0, request_id, "alice", "carol", 10)
    network.run()
    network.replicas[3] = cluster.replica(3, records=dict(network.records[3]))
    assert network.replicas[3].last_executed == 3
    network.down.discard(3)
    network.advance(500)
    assert len(network.decided) == 5
    assert {r.last_executed for r in network.replicas.values()} == {5}
    assert len({r.ledger.digest() for r in network.replicas.values()}) == 1
