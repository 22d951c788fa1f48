"""Issue 11's operations: the request's wire fields, the ops through the replicas, and the
Executed records observers read."""

from __future__ import annotations

import pytest
from replica_harness import Cluster, Network

from pbft.client import ClientError
from pbft.codec import DecodeError, pack
from pbft.events import Note
from pbft.messages import MessageType, Request
from pbft.operations import OP_CODES, Operation, Posting
from pbft.signed import _DOMAINS, PROTOCOL_VERSION, Envelope

# --- the wire ------------------------------------------------------------------------------


def test_every_op_code_round_trips_and_an_unknown_one_is_malformed() -> None:
    for code in OP_CODES:
        request = Request(7, 1, code, "a", "b", 2, 3, 4, 5)
        assert Request.decode(request.encode()) == request
    with pytest.raises(DecodeError) as caught:
        Request(7, 1, "mint", "a", "b", 2)
    assert caught.value.reason == "out_of_range"


def test_a_request_with_an_unknown_op_is_dropped_and_counted_by_the_replica() -> None:
    cluster = Cluster()
    replica = cluster.replica(0)
    # Bytes a peer could send: signed by the client, op "mint". (Built by hand: seal would
    # refuse such a Request, and caches what it seals for receivers in this process.)
    body = pack([0, 1, "mint", "alice", "carol", 5, 0, 0, 0])
    signature = cluster.client_keys[0].sign(_DOMAINS[MessageType.REQUEST], body)
    raw = pack([PROTOCOL_VERSION, int(MessageType.REQUEST), 0, body, signature])
    actions = Cluster.deliver(replica, raw)
    assert [(note.kind, note.reason) for note in actions if isinstance(note, Note)] == [
        ("drop", "malformed_out_of_range")
    ]
    assert not [action for action in actions if not isinstance(action, Note)]
    assert replica.drops == {"malformed_out_of_range": 1}
    assert not replica.requests.pending


# --- the client ----------------------------------------------------------------------------


def test_the_client_builds_each_op_with_exactly_its_fields() -> None:
    client = Cluster().client(0)
    operations = {
        "transfer": Operation.transfer("alice", "carol", 5),
        "authorize": Operation.authorize("alice", "carol", 5, 1000),
        "capture": Operation.capture((0, 1), 5),
        "void": Operation.void((0, 1)),
        "refund": Operation.refund((0, 1), 5),
        "open_account": Operation.open_account("shop"),
    }
    for request_id, (code, operation) in enumerate(operations.items(), start=1):
        (send,) = client.submit_operation(request_id, operation)
        request = Request.decode(_body(send.data))
        assert request.op == code
        assert request.operation() == operation


def test_the_client_refuses_what_cannot_go_on_the_wire() -> None:
    client = Cluster().client(0)
    with pytest.raises(ClientError, match="unknown operation"):
        client.submit_operation(1, Operation("mint", "alice", "carol", 5))
    with pytest.raises(ClientError, match="payee account"):
        client.submit_operation(1, Operation.authorize("alice", "", 5, 1000))
    with pytest.raises(ClientError, match="referenced client id"):
        client.submit_operation(1, Operation.void((2**32, 1)))
    with pytest.raises(ClientError, match="payer account"):
        client.submit_operation(1, Operation.open_account("x" * 65))


# --- through the replicas ------------------------------------------------------------------


def test_executed_records_carry_the_op_its_postings_and_the_batch() -> None:
    network = Network(Cluster())
    network.submit(0, 1, "alice", "carol", 10)
    network.run()
    (decided,) = network.decided
    assert (decided.outcome, decided.reason) == ("confirmed", "")
    for replica, batches in network.executed.items():
        (batch,) = batches
        assert batch.primary == 0 and batch.released == ()
        assert len(batch.batch_digest) == 32, replica
        (record,) = batch.requests
        assert (record.op, record.ref_client, record.ref_request, record.expires_in_ms) == (
            "transfer",
            0,
            0,
            0,
        )
        assert record.postings == (Posting("alice", -10, 0), Posting("carol", 10, 0))


def test_a_field_the_op_does_not_use_is_rejected_as_invalid_request() -> None:
    network = Network(Cluster())
    bad = Operation("transfer", "alice", "carol", 10, ref_client=0, ref_request=3)
    network._client_actions(network.clients[0].submit_operation(1, bad))
    network.run()
    (decided,) = network.decided
    assert (decided.outcome, decided.reason) == ("rejected", "invalid_request")
    for batches in network.executed.values():
        assert batches[0].requests[0].postings == ()


def _body(raw: bytes) -> bytes:
    return Envelope.decode(raw).body
