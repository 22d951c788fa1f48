"""The replica status query: each replica answers a client's signed StatusQuery with its own
signed word on where it stands (pbft/lookups.py), paid from the lookup budget; the client
core (pbft/client.py, `core.statuses`) checks each answer and hands it on as it comes, with
no agreement between replicas. One test asks a real four-process cluster through
PaymentClient.replica_status."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import trio
from replica_harness import Cluster, Network, decode, send_raws

from pbft.client import ClientError, ReplicaStatus
from pbft.codec import DecodeError
from pbft.drops import DropReason
from pbft.events import MessageReceived
from pbft.messages import (
    MAX_DROP_REASON_LENGTH,
    MAX_STATUS_DROPS,
    DropCount,
    LookupQuery,
    ReplicaStatusAnswer,
    StatusQuery,
)
from pbft.signed import ENVELOPE_OVERHEAD, peek, seal
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster
from runtime.transport import TransportConfig


def run_payments(network: Network, count: int) -> None:
    for request_id in range(1, count + 1):
        network.submit(0, request_id, "alice", "carol", 1)
        network.run()
    assert len(network.decided) == count


def test_every_replica_answers_with_its_own_state() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 9)
    network.down.add(3)
    client = network.clients[1]
    network._client_actions(client.statuses.ask(7))
    network.run()
    by_replica = {status.replica: status for status in network.statuses}
    assert sorted(by_replica) == [0, 1, 2]
    for replica_id, status in by_replica.items():
        replica = network.replicas[replica_id]
        assert status.query_id == 7
        assert (status.view, status.view_status) == (0, "normal")
        assert status.last_executed == replica.last_executed == 9
        # checkpoint_interval 4, watermark_window 8 (the harness's settings)
        assert status.stable_checkpoint == replica.stable.seq == 8
        assert (status.low_watermark, status.high_watermark) == (8, 16)
        assert dict(status.drops) == replica.drops
        # The signed frame it came in: the replica's, over exactly these fields.
        envelope, message = peek(status.answer)
        assert isinstance(message, ReplicaStatusAnswer) and envelope.sender == replica_id
    # Replica 3 never answered: the query stays pending until the caller gives up.
    assert client.statuses.pending == {7: {0: None, 1: None, 2: None}}


def test_a_replica_in_a_view_change_says_so() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 1)
    network.down.add(0)  # the primary
    network.advance(1_000)
    network._client_actions(network.clients[0].statuses.ask(1))
    network.run()
    views = {status.replica: (status.view, status.view_status) for status in network.statuses}
    assert sorted(views) == [1, 2, 3]
    replicas = network.replicas
    assert all(views[i] == (replicas[i].view, str(replicas[i].status)) for i in views)
    assert all(view >= 1 for view, _ in views.values())


def test_status_queries_share_the_lookup_budget() -> None:
    cluster = Cluster(client_replay_burst=3, client_replay_rate_per_s=1)
    replica = cluster.replica(0)
    key = cluster.client_keys[2]
    answered = 0
    for query_id in range(5):
        actions = cluster.deliver(replica, seal(StatusQuery(2, query_id), key))
        answered += len(send_raws(actions, ("client", 2)))
    assert answered == 3
    # The bucket is the lookups' own: a history lookup now finds it empty too.
    lookup = LookupQuery(2, 9, "status", 0, 1, "", 0, 0, 0, 0)
    assert send_raws(cluster.deliver(replica, seal(lookup, key)), ("client", 2)) == []
    assert replica.drops[DropReason.LOOKUP_RATE_LIMITED] == 3
    # Another client has its own bucket.
    other = seal(StatusQuery(1, 0), cluster.client_keys[1])
    assert len(send_raws(cluster.deliver(replica, other), ("client", 1))) == 1


def test_a_status_query_signed_by_someone_else_is_dropped() -> None:
    cluster = Cluster()
    replica = cluster.replica(0)
    forged = seal(StatusQuery(2, 1), cluster.client_keys[1])
    assert send_raws(cluster.deliver(replica, forged), ("client", 2)) == []
    assert replica.drops[DropReason.SENDER_MISMATCH] + replica.drops[DropReason.BAD_SIGNATURE] == 1
    # A status answer sent to a replica is for clients only.
    answer = replica.lookups.status(StatusQuery(2, 1))
    cluster.deliver(replica, seal(replace(answer, replica=1), cluster.replica_keys[1]))
    assert replica.drops[DropReason.UNEXPECTED_TYPE] == 1


def test_many_drop_reasons_are_cut_to_the_most_frequent() -> None:
    cluster = Cluster()
    replica = cluster.replica(0)
    for index in range(MAX_STATUS_DROPS + 20):
        replica.drops[f"reason_{index:03d}"] = index + 1
    replica.drops["x" * 100] = 10_000  # a derived reason longer than the wire allows
    answer = replica.lookups.status(StatusQuery(0, 1))
    reasons = [drop.reason for drop in answer.drops]
    assert len(reasons) == MAX_STATUS_DROPS and reasons == sorted(reasons)
    assert "x" * MAX_DROP_REASON_LENGTH in reasons
    assert "reason_000" not in reasons and f"reason_{MAX_STATUS_DROPS + 19:03d}" in reasons
    assert ReplicaStatusAnswer.decode(answer.encode()) == answer


def test_decode_limits_of_a_status_answer() -> None:
    # The largest answer still fits a frame to a client, sealed.
    largest = ReplicaStatusAnswer.max_bytes() + ENVELOPE_OVERHEAD
    assert largest <= TransportConfig().client_max_frame_bytes
    cluster = Cluster()
    answer = cluster.replica(0).lookups.status(StatusQuery(0, 1))
    with pytest.raises(DecodeError):
        replace(answer, view_status="sleeping")
    with pytest.raises(DecodeError):
        replace(answer, drops=(DropCount("a", 1),) * (MAX_STATUS_DROPS + 1))
    with pytest.raises(DecodeError):
        DropCount("a" * (MAX_DROP_REASON_LENGTH + 1), 1)
    with pytest.raises(DecodeError):
        replace(answer, view=-1)


def _answers(cluster: Cluster, query: bytes) -> dict[int, ReplicaStatusAnswer]:
    answers = {}
    for replica_id in range(cluster.n):
        (raw,) = send_raws(cluster.deliver(cluster.replica(replica_id), query), ("client", 0))
        message = decode(raw)
        assert isinstance(message, ReplicaStatusAnswer)
        answers[replica_id] = message
    return answers


def test_the_client_takes_each_replicas_checked_word_once() -> None:
    cluster = Cluster()
    client = cluster.client(0)
    (send, *_) = client.statuses.ask(5)
    answers = _answers(cluster, send.data)

    def hand(answer: ReplicaStatusAnswer, signer: int) -> list[object]:
        return list(client.handle(MessageReceived(seal(answer, cluster.replica_keys[signer]))))

    # Another cluster, another client's query, an unknown query, a forged signer.
    assert hand(replace(answers[0], cluster_id=b"\x01" * 32), 0) == []
    assert client.drops[DropReason.OTHER_CLUSTER] == 1
    assert hand(replace(answers[0], client_id=1), 0) == []
    assert hand(replace(answers[0], query_id=6), 0) == []
    assert client.drops[DropReason.LATE_REPLY] == 2
    assert hand(answers[0], 1) == []
    assert sum(client.drops.values()) == 4
    # A window that contradicts itself is no correct replica's word.
    assert hand(replace(answers[1], low_watermark=0, stable_checkpoint=4), 1) == []
    assert client.drops[DropReason.CONFLICTING_REPLY] == 1
    # The real answers, each taken once, as they come.
    (first,) = hand(answers[0], 0)
    assert isinstance(first, ReplicaStatus)
    assert (first.replica, first.query_id, first.view_status, first.last_executed) == (
        0,
        5,
        "normal",
        0,
    )
    assert hand(answers[0], 0) == []
    assert client.drops[DropReason.LATE_REPLY] == 3
    for replica_id in (1, 2, 3):
        assert len(hand(answers[replica_id], replica_id)) == 1
    # All four answered: the query is done, anything more is late.
    assert client.statuses.pending == {}
    assert hand(answers[1], 1) == []
    assert client.drops[DropReason.LATE_REPLY] == 4


def test_a_status_query_id_is_checked_before_anything_is_sent() -> None:
    client = Cluster().client(0)
    client.statuses.ask(1)
    with pytest.raises(ClientError, match="already in flight"):
        client.statuses.ask(1)
    with pytest.raises(ClientError, match="query id"):
        client.statuses.ask(-1)
    with pytest.raises(ClientError, match="query id"):
        client.statuses.ask(2**64)


# --- through a real cluster -------------------------------------------------------------

STARTUP_S = 60.0


def test_replica_status_through_a_real_cluster(tmp_path_factory: pytest.TempPathFactory) -> None:
    local = LocalCluster.create(tmp_path_factory.mktemp("status"), replicas=4, clients=1)
    local.start_all()
    try:

        async def scenario() -> None:
            async with PaymentClient(local.cluster, 0, timeout_s=30) as client:
                await client.wait_connected(timeout_s=STARTUP_S)
                decided = await client.pay("acct-00000", "acct-00001", 5)
                assert decided.outcome == "confirmed"
                statuses = await client.replica_status(timeout_s=10)
                assert sorted(statuses) == [0, 1, 2, 3]
                for replica_id, status in statuses.items():
                    assert status is not None, f"replica {replica_id} did not answer"
                    assert status.replica == replica_id
                    assert status.view_status == "normal"
                    # Every replica executed the payment (a backup maybe a moment later).
                    assert status.last_executed <= decided.seq + 1
                assert sum(s.last_executed >= decided.seq for s in statuses.values() if s) >= 2
                # One view (a slow start may have cost a view change, never a split).
                assert len({s.view for s in statuses.values() if s}) == 1
                local.kill(3)
                statuses = await client.replica_status(timeout_s=2)
                assert statuses[3] is None
                assert all(statuses[replica] is not None for replica in (0, 1, 2))
                with pytest.raises(ValueError, match="timeout"):
                    await client.replica_status(timeout_s=0)

        trio.run(scenario)
    finally:
        for replica, code in sorted(local.exited().items()):
            print(local.exit_report(replica, code), file=sys.stderr)
        local.stop_all()
