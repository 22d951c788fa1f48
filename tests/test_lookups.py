"""Lookups of history: replicas answer from their HistoryReader (pbft/lookups.py), clients
take f + 1 matching answers (pbft/client.py), receipts from status answers verify."""

from __future__ import annotations

from dataclasses import replace

import pytest
from replica_harness import Cluster, Network, decode, send_raws

from pbft.client import ClientCore, ClientError, LookupResult
from pbft.drops import DropReason
from pbft.events import Executed, ExecutedRequest, MessageReceived
from pbft.history import CAPTURED, EXPIRED, MAX_PAGE, OPEN, VOIDED, MemoryHistoryStore
from pbft.lookups import query_digest
from pbft.messages import (
    BEHIND,
    FOUND,
    NOT_FOUND,
    NOT_HELD,
    LookupAnswer,
    LookupQuery,
    Request,
)
from pbft.operations import Operation, Posting
from pbft.receipt import verify_receipt
from pbft.signed import body_limit, seal
from runtime.transport import TransportConfig
from sim.scenario import load_scenario
from sim.simulator import Simulation


def run_payments(network: Network, client: int, count: int) -> None:
    for request_id in range(1, count + 1):
        network.submit(client, request_id, "alice", "carol", request_id)
        network.run()
    assert len(network.decided) == count


def looked_up(network: Network, actions: list) -> LookupResult:  # type: ignore[type-arg]
    network._client_actions(actions)
    network.run()
    assert network.lookups, "no f + 1 matching answers"
    return network.lookups.pop()


def test_status_of_a_decided_request_comes_with_a_receipt_that_verifies() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 0, 3)
    client = network.clients[0]
    result = looked_up(network, client.lookups.status(1, 0, 2))
    assert (result.kind, result.state, result.as_of_seq) == ("status", FOUND, 3)
    assert result.record is not None
    assert (result.record.seq, result.record.outcome, result.record.amount) == (2, "confirmed", 2)
    assert result.receipt is not None
    verified = verify_receipt(result.receipt, cluster.keyring, cluster.cluster_id)
    assert (verified.request_id, verified.outcome, verified.seq) == (2, "confirmed", 2)
    # Another client learns the outcome (the signed replies) but has no receipt to make.
    other = looked_up(network, network.clients[1].lookups.status(1, 0, 2))
    assert other.state == FOUND and other.receipt is None and len(other.replies) == 2


def test_status_outlives_the_dedup_window() -> None:
    cluster = Cluster(dedup_window=2)
    network = Network(cluster)
    run_payments(network, 0, 6)
    assert all(replica.ledger.lookup(0, 1) is None for replica in network.replicas.values())
    result = looked_up(network, network.clients[0].lookups.status(9, 0, 1))
    assert result.state == FOUND and result.receipt is not None
    verified = verify_receipt(result.receipt, cluster.keyring, cluster.cluster_id)
    assert (verified.request_id, verified.seq, verified.amount) == (1, 1, 1)
    missing = looked_up(network, network.clients[0].lookups.status(10, 0, 99))
    assert (missing.state, missing.as_of_seq) == (NOT_FOUND, 6)


def test_account_history_pages_through_the_cluster() -> None:
    network = Network(Cluster())
    run_payments(network, 0, 5)
    client = network.clients[0]
    first = looked_up(network, client.lookups.history(1, "alice", limit=2))
    assert first.state == FOUND and [e.request_id for e in first.entries] == [1, 2]
    last = first.entries[-1]
    seen = list(first.entries)
    cursor = (last.seq, last.position)
    for query_id in range(2, 6):
        page = looked_up(
            network,
            client.lookups.history(query_id, "alice", after=cursor, limit=2, through_seq=5),
        )
        seen += page.entries
        if len(page.entries) < 2:
            break
        cursor = (page.entries[-1].seq, page.entries[-1].position)
    assert [(e.request_id, e.available_delta) for e in seen] == [(i, -i) for i in range(1, 6)]
    # Through a seq no replica reached: every answer is "behind", no vote, no result.
    network._client_actions(client.lookups.history(9, "alice", through_seq=50))
    network.run()
    assert not network.lookups and 9 in client.lookups.pending


# --- one replica's answers ------------------------------------------------------------


def authorize_batch(seq: int) -> Executed:
    def executed_request(client: int, rid: int, op: str, **fields: object) -> ExecutedRequest:
        base = ExecutedRequest(
            client,
            rid,
            bytes([rid]) * 32,
            "alice",
            "carol",
            40,
            "confirmed",
            "",
            True,
            op,
            0,
            0,
            0,
            (),
        )
        return replace(base, **fields)  # type: ignore[arg-type]

    if seq == 1:
        requests = (
            executed_request(
                0, 1, "authorize", expires_in_ms=300, postings=(Posting("alice", -40, 40),)
            ),
        )
    else:
        requests = (
            executed_request(
                1,
                7,
                "capture",
                payer="",
                payee="",
                amount=25,
                ref_client=0,
                ref_request=1,
                postings=(Posting("alice", 15, -40), Posting("carol", 25, 0)),
            ),
        )
    return Executed(0, seq, bytes(32), requests, 1000 * seq, 0, bytes([seq]) * 32, ())


def ask(cluster: Cluster, replica, query: LookupQuery) -> LookupAnswer:  # type: ignore[no-untyped-def]
    actions = cluster.deliver(replica, seal(query, cluster.client_keys[2]))
    (raw,) = send_raws(actions, ("client", 2))
    answer = decode(raw)
    assert isinstance(answer, LookupAnswer)
    assert answer.query_digest == query_digest(query) and answer.cluster_id == cluster.cluster_id
    return answer


def hold_query(query_id: int, client: int, request: int) -> LookupQuery:
    return LookupQuery(2, query_id, "hold", client, request, "", 0, 0, 0, 0)


def test_a_replica_answers_a_holds_fate_from_its_history() -> None:
    cluster = Cluster()
    store = MemoryHistoryStore()
    replica = cluster.replica(0, history=store)
    store.record(authorize_batch(1))
    opened = ask(cluster, replica, hold_query(1, 0, 1))
    assert (opened.state, opened.as_of_seq, opened.hold[0].fate) == (FOUND, 1, OPEN)
    assert opened.hold[0].expires_at_ms == 1300
    store.record(authorize_batch(2))
    closed = ask(cluster, replica, hold_query(2, 0, 1))
    assert (closed.state, closed.as_of_seq) == (FOUND, 2)
    assert (closed.hold[0].fate, closed.hold[0].captured, closed.hold[0].closed_seq) == (
        CAPTURED,
        25,
        2,
    )
    assert ask(cluster, replica, hold_query(3, 1, 7)).state == NOT_FOUND  # a capture, no hold


def test_what_a_replica_does_not_hold_it_says_so() -> None:
    cluster = Cluster()
    status = LookupQuery(2, 1, "status", 0, 1, "", 0, 0, 0, 0)
    # No history kept at all.
    assert ask(cluster, cluster.replica(0), status).state == NOT_HELD
    # History starting at seq 2 (a state transfer, or retention): seq 1 may have held it.
    store = MemoryHistoryStore()
    store.record(authorize_batch(2))
    replica = cluster.replica(1, history=store)
    assert ask(cluster, replica, status).state == NOT_HELD
    history = LookupQuery(2, 2, "history", 0, 0, "alice", 0, 0, 10, 0)
    assert ask(cluster, replica, history).state == NOT_HELD
    # After a cursor in the held range: carol's entry at (2, 1), after alice's at (2, 0).
    from_two = LookupQuery(2, 3, "history", 0, 0, "carol", 2, 0, 10, 0)
    answer = ask(cluster, replica, from_two)
    assert (answer.state, answer.held_from) == (FOUND, 2)
    assert [(e.seq, e.position, e.available_delta) for e in answer.entries] == [(2, 1, 25)]
    ahead = LookupQuery(2, 4, "history", 0, 0, "alice", 2, 0, 10, 9)
    assert ask(cluster, replica, ahead).state == BEHIND


def test_lookups_of_the_wrong_shape_or_beyond_the_budget_are_dropped() -> None:
    cluster = Cluster(client_replay_burst=3, client_replay_rate_per_s=1)
    replica = cluster.replica(0, history=MemoryHistoryStore())
    wrong = LookupQuery(2, 1, "status", 0, 1, "alice", 0, 0, 0, 0)
    cluster.deliver(replica, seal(wrong, cluster.client_keys[2]))
    no_limit = LookupQuery(2, 1, "history", 0, 0, "alice", 0, 0, 0, 0)
    cluster.deliver(replica, seal(no_limit, cluster.client_keys[2]))
    assert replica.drops[DropReason.BAD_LOOKUP] == 2
    answered = 0
    for query_id in range(10):
        query = LookupQuery(2, query_id, "status", 0, 1, "", 0, 0, 0, 0)
        actions = cluster.deliver(replica, seal(query, cluster.client_keys[2]))
        answered += len(send_raws(actions, ("client", 2)))
    assert answered == 3
    assert replica.drops[DropReason.LOOKUP_RATE_LIMITED] == 7


# --- f + 1 matching at the client -----------------------------------------------------


def test_a_lying_replica_cannot_make_a_lookup_answer() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 0, 2)
    client = network.clients[0]
    (send, *_) = client.lookups.status(5, 0, 1)
    query = decode(send.data)
    assert isinstance(query, LookupQuery)
    answers = {
        i: decode(send_raws(cluster.deliver(replica, send.data), ("client", 0))[0])
        for i, replica in network.replicas.items()
    }
    honest = answers[0]
    assert isinstance(honest, LookupAnswer) and honest.state == FOUND
    # Replica 3 claims another outcome; its own reply cannot back the forged record.
    record = replace(honest.record[0], outcome="rejected", reason="insufficient_funds")
    forged = replace(answers[3], record=(record,))
    raw = seal(forged, cluster.replica_keys[3])
    assert client.handle(MessageReceived(raw)) == []
    assert client.drops[DropReason.CONFLICTING_REPLY] == 1
    # Claiming "not found", with a high seq: a vote of one, not f + 1.
    not_found = replace(answers[3], state=NOT_FOUND, record=(), reply=b"", as_of_seq=99)
    assert client.handle(MessageReceived(seal(not_found, cluster.replica_keys[3]))) == []
    assert client.handle(MessageReceived(seal(answers[0], cluster.replica_keys[0]))) == []
    (result,) = client.handle(MessageReceived(seal(answers[1], cluster.replica_keys[1])))
    assert isinstance(result, LookupResult)
    assert (result.state, result.replicas, result.record.outcome) == (FOUND, (0, 1), "confirmed")
    assert result.receipt is not None
    verify_receipt(result.receipt, cluster.keyring, cluster.cluster_id)
    # Answers after the result are late.
    late = client.drops[DropReason.LATE_REPLY]
    client.handle(MessageReceived(seal(answers[2], cluster.replica_keys[2])))
    assert client.drops[DropReason.LATE_REPLY] == late + 1


def test_not_found_reports_a_seq_a_correct_replica_reached() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 0, 2)
    client = network.clients[0]
    (send, *_) = client.lookups.status(5, 0, 77)
    answers = [
        decode(send_raws(cluster.deliver(replica, send.data), ("client", 0))[0])
        for replica in network.replicas.values()
    ]
    liar = replace(answers[3], as_of_seq=1000)
    assert client.handle(MessageReceived(seal(liar, cluster.replica_keys[3]))) == []
    (result,) = client.handle(MessageReceived(seal(answers[0], cluster.replica_keys[0])))
    assert (result.state, result.as_of_seq, result.replicas) == (NOT_FOUND, 2, (0, 3))


def test_a_restarted_replica_rewrites_its_history_idempotently() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 0, 6)
    store = network.histories[1]
    before = [store.request(0, rid) for rid in range(1, 7)]
    entries = store.account("alice", (0, 0), 6, 100)
    restarted = cluster.replica(1, records=dict(network.records[1]), history=store)
    # Checkpoints every 4: seqs 5 and 6 were re-executed from the checkpoint at 4.
    assert [e.seq for e in restarted.recovered_executions] == [5, 6]
    for executed in restarted.recovered_executions:
        store.record(executed)
    assert [store.request(0, rid) for rid in range(1, 7)] == before
    assert store.account("alice", (0, 0), 6, 100) == entries
    assert (store.held_from(), store.held_through()) == (1, 6)
    query = LookupQuery(2, 1, "status", 0, 5, "", 0, 0, 0, 0)
    assert ask(cluster, restarted, query).record[0] == before[4]


def test_a_request_on_the_wire_is_rebuilt_from_its_record() -> None:
    cluster = Cluster()
    network = Network(cluster)
    run_payments(network, 0, 1)
    record = network.histories[0].request(0, 1)
    assert record is not None
    rebuilt = Request(0, 1, record.op, record.payer, record.payee, record.amount)
    assert seal(rebuilt, cluster.client_keys[0]) == cluster.request(1, 1)


def test_the_largest_answer_fits_a_client_connections_frame() -> None:
    # A full page goes to a client over a connection whose frames are capped.
    envelope_overhead = 128  # version, type, sender, the body's header, the signature
    limit = TransportConfig().client_max_frame_bytes
    assert body_limit(LookupAnswer) + envelope_overhead <= limit
    assert body_limit(LookupQuery) + envelope_overhead <= limit


def test_the_client_refuses_lookups_it_cannot_put_on_the_wire() -> None:
    client = Cluster().client(0)
    with pytest.raises(ClientError, match="page size"):
        client.lookups.history(1, "alice", limit=MAX_PAGE + 1)
    with pytest.raises(ClientError, match="account name"):
        client.lookups.history(1, "")
    with pytest.raises(ClientError, match="client id"):
        client.lookups.status(1, 2**32, 1)
    client.lookups.hold(1, 0, 1)
    with pytest.raises(ClientError, match="already in flight"):
        client.lookups.hold(1, 0, 1)


@pytest.mark.parametrize("name", ["primary-crash-restart", "lagging-replica-catch-up"])
def test_every_simulated_replica_keeps_what_it_executed(name: str) -> None:
    simulation = Simulation(load_scenario(f"scenarios/{name}.toml"))
    result = simulation.run()
    assert result.verdict == "ok"
    for node in simulation.replicas:
        store = node.history
        low, high = store.held_from(), store.held_through()
        # Below the replica's own height when it caught up by state transfer since (its
        # history then answers as of `high`, or "not held" once it executes again).
        assert node.core is not None and high <= node.core.last_executed
        observed = simulation.observed.executed_requests.get(node.observer_id, {})
        held = 0
        for (client, request_id), executions in observed.items():
            seq, executed = executions[0]
            record = store.request(client, request_id)
            if (
                seq < low
                or not executed.fresh
                or executed.reason in ("id_reused", "request_expired")
            ):
                continue
            assert record is not None and (record.seq, record.outcome) == (
                seq,
                executed.outcome,
            )
            held += 1
        assert held > 0


def test_holds_through_the_cluster_captured_voided_and_expired() -> None:
    network = Network(Cluster())
    payer, shop = network.clients[0], network.clients[1]

    def submit(client: ClientCore, request_id: int, operation: Operation) -> None:
        network._client_actions(client.submit_operation(request_id, operation))
        network.run()

    submit(payer, 1, Operation.authorize("alice", "carol", 40, 60_000))
    submit(payer, 2, Operation.authorize("alice", "carol", 30, 60_000))
    submit(payer, 3, Operation.authorize("alice", "carol", 20, 100))
    submit(shop, 1, Operation.capture((0, 1), 25))
    submit(payer, 4, Operation.void((0, 2)))
    network.advance(1_000)
    submit(payer, 5, Operation.transfer("alice", "bob", 1))  # a batch after the expiry
    assert [d.outcome for d in network.decided] == ["confirmed"] * 6
    fates = []
    for query_id, hold in enumerate((1, 2, 3), start=1):
        result = looked_up(network, payer.lookups.hold(query_id, 0, hold))
        assert result.state == FOUND and result.hold is not None
        fates.append((result.hold.fate, result.hold.amount, result.hold.captured))
    assert fates == [(CAPTURED, 40, 25), (VOIDED, 30, 0), (EXPIRED, 20, 0)]
    page = looked_up(network, payer.lookups.history(9, "alice"))
    assert [(e.kind, e.available_delta, e.held_delta) for e in page.entries] == [
        ("authorize", -40, 40),
        ("authorize", -30, 30),
        ("authorize", -20, 20),
        ("capture", 15, -40),
        ("void", 30, -30),
        ("expire", 20, -20),
        ("transfer", -1, 0),
    ]
