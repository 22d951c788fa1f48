"""One signature per batch of replies (issue 10): a replica signs the Merkle root of a
batch's results once; each reply carries its result and inclusion proof; a client checks
the proof by hashing and each distinct (replica, root) signature once."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from replica_harness import Cluster, send_raws

from crypto.keys import SigningKey
from crypto.merkle import inclusion_proof, merkle_root
from crypto.signing import VerificationCache
from pbft.client import Decided
from pbft.events import MessageReceived, Send
from pbft.messages import MessageType, Reply
from pbft.replies import (
    REPLY_ROOT_DOMAIN,
    ReplyResult,
    check_reply,
    reply_leaf,
    result_of,
    sign_replies,
)
from pbft.signed import Envelope, Rejected, peek

CLUSTER_ID = bytes(range(32))
KEY = SigningKey.derive(5, "replica/0")


class CountingKey:
    """A replica's key that counts the batch roots it signs."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self.verify_key = key.verify_key
        self.roots = 0

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        if domain == REPLY_ROOT_DOMAIN:
            self.roots += 1
        return self.key.sign(domain, payload)


def _results(count: int, seq: int = 9) -> list[ReplyResult]:
    return [
        ReplyResult(i % 7, i, hashlib.sha256(i.to_bytes(4, "big")).digest(), seq, "confirmed", "")
        for i in range(count)
    ]


def test_every_proof_is_crypto_merkles_proof_for_every_size_and_index() -> None:
    for size in [*range(1, 40), 63, 64, 65, 127, 128]:
        results = _results(size)
        leaves = [reply_leaf(CLUSTER_ID, result) for result in results]
        frames = sign_replies(KEY, 0, 2, 9, CLUSTER_ID, results)
        root = merkle_root(leaves)
        for index, raw in enumerate(frames):
            reply = peek(raw, Reply)[1]
            assert isinstance(reply, Reply)
            assert reply.root == root
            assert (reply.index, reply.batch_size) == (index, size)
            assert reply.path == inclusion_proof(leaves, index).path


def test_the_packed_replies_are_the_canonical_encoding_of_checked_replies() -> None:
    for size in (1, 2, 7, 64):
        results = [
            replace(result, outcome="rejected", reason="insufficient_funds") if i % 3 else result
            for i, result in enumerate(_results(size))
        ]
        for index, raw in enumerate(sign_replies(KEY, 2, 5, 11, CLUSTER_ID, results)):
            envelope = Envelope.decode(raw)  # checks every envelope field
            assert envelope.encode() == raw
            assert (envelope.type_code, envelope.sender) == (int(MessageType.REPLY), 2)
            reply = Reply.decode(envelope.body)  # checks every field, and canonical form
            assert reply.encode() == envelope.body
            assert result_of(reply) == results[index]
            assert (reply.view, reply.replica, reply.batch_seq) == (5, 2, 11)


def test_a_batch_of_replies_costs_one_signature() -> None:
    key = CountingKey(KEY)
    frames = sign_replies(key, 0, 2, 9, CLUSTER_ID, _results(64))  # type: ignore[arg-type]
    assert key.roots == 1
    assert len({Envelope.decode(raw).signature for raw in frames}) == 1
    cache = VerificationCache()
    ring = {("replica", 0): KEY.verify_key}
    for raw in frames:
        envelope, reply = peek(raw, Reply)
        check_reply(envelope, reply, ring, cache)  # type: ignore[arg-type]
    # 64 replies, one root: one verification, 63 cache hits.
    assert (cache.statistics().misses, cache.statistics().hits) == (1, 63)


def test_a_replica_signs_once_per_executed_batch_and_never_for_a_replay() -> None:
    cluster = Cluster(batch_size=4)
    replica = cluster.replica(1)
    key = CountingKey(cluster.replica_keys[1])
    replica.ordering.ctx.key = key  # type: ignore[assignment]
    cluster.tick(replica, 1)
    requests = [cluster.request(1, client=client) for client in (0, 1, 2)]
    actions = cluster.drive_commit(replica, cluster.pre_prepare(1, requests))
    assert replica.last_executed == 1
    frames = [a.data for a in actions if isinstance(a, Send) and a.to[0] == "client"]
    assert len(frames) == 3
    assert key.roots == 1
    # A retransmission is answered with the kept reply, byte for byte, and no signature.
    again = send_raws(cluster.deliver(replica, requests[2]), ("client", 2))
    assert again == [frames[2]]
    assert key.roots == 1


def _client_with_three_requests(cluster: Cluster) -> tuple[object, list[bytes]]:
    client = cluster.client(0)
    requests = []
    for request_id in (1, 2, 3):
        (send,) = client.submit(request_id, "alice", "carol", 5)
        assert isinstance(send, Send)
        requests.append(send.data)
    return client, requests


def _batch_for(cluster: Cluster, replica: int, requests: list[bytes]) -> list[bytes]:
    results = []
    for raw in requests:
        envelope = Envelope.decode(raw)
        request_id = peek(raw)[1].request_id  # type: ignore[attr-defined]
        digest = hashlib.sha256(envelope.body).digest()
        results.append(ReplyResult(0, request_id, digest, 4, "confirmed", ""))
    key = cluster.replica_keys[replica]
    return sign_replies(key, replica, 0, 4, cluster.cluster_id, results)


def test_a_client_verifies_each_distinct_replica_root_once() -> None:
    cluster = Cluster()
    client, requests = _client_with_three_requests(cluster)
    cache = client.cache  # type: ignore[attr-defined]
    before = cache.statistics()
    decided = []
    for replica in (0, 1):
        for raw in _batch_for(cluster, replica, requests):
            decided += client.handle(MessageReceived(raw))  # type: ignore[attr-defined]
    assert sorted(d.request_id for d in decided if isinstance(d, Decided)) == [1, 2, 3]
    after = cache.statistics()
    # Six replies under two roots: two signature checks.
    assert after.misses - before.misses == 2
    assert after.hits - before.hits == 4


def test_a_reply_with_a_bad_proof_is_dropped_and_counted_before_any_signature_check() -> None:
    cluster = Cluster()
    client, requests = _client_with_three_requests(cluster)
    cache = client.cache  # type: ignore[attr-defined]
    before = cache.statistics().misses
    genuine = _batch_for(cluster, 0, requests)[1]
    envelope, reply = peek(genuine, Reply)
    assert isinstance(reply, Reply)
    for changes in (
        {"path": reply.path[:-1]},
        {"path": (*reply.path, reply.root)},
        {"index": 2},
        {"batch_size": 1},
        {"outcome": "rejected", "reason": "insufficient_funds"},
        {"path": (bytes(32), *reply.path[1:])},
    ):
        body = replace(reply, **changes).encode()  # type: ignore[arg-type]
        raw = Envelope(
            envelope.version, envelope.type_code, envelope.sender, body, envelope.signature
        ).encode()
        assert client.handle(MessageReceived(raw)) == []  # type: ignore[attr-defined]
    assert client.statistics().drops == {"bad_reply_proof": 6}  # type: ignore[attr-defined]
    assert cache.statistics().misses == before


def test_a_genuine_root_with_a_forged_signature_is_dropped_as_bad_signature() -> None:
    cluster = Cluster()
    client, requests = _client_with_three_requests(cluster)
    raw = _batch_for(cluster, 0, requests)[0]
    envelope = Envelope.decode(raw)
    forged = sign_replies(
        SigningKey.derive(99, "replica/0"),
        0,
        0,
        4,
        cluster.cluster_id,
        [ReplyResult(0, 1, hashlib.sha256(envelope.body).digest(), 4, "confirmed", "")],
    )[0]
    # The forger's signature on the genuine reply's body.
    mixed = Envelope(
        envelope.version,
        envelope.type_code,
        envelope.sender,
        envelope.body,
        Envelope.decode(forged).signature,
    ).encode()
    assert client.handle(MessageReceived(mixed)) == []  # type: ignore[attr-defined]
    assert client.statistics().drops == {"bad_signature": 1}  # type: ignore[attr-defined]


def test_check_reply_refuses_an_unknown_replica() -> None:
    (raw,) = sign_replies(KEY, 3, 0, 1, CLUSTER_ID, _results(1))
    envelope, reply = peek(raw, Reply)
    try:
        check_reply(envelope, reply, {}, VerificationCache())  # type: ignore[arg-type]
    except Rejected as rejection:
        assert rejection.reason == "unknown_sender"
    else:
        raise AssertionError("a reply from a replica outside the ring passed")


def test_the_reply_benchmark_runs_and_counts_fewer_signatures_with_batches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sim import reply_bench

    per_payment = reply_bench.simulated(payments=80, repeat=1)
    # Batches of one: one reply signature per replica per payment, as before this change.
    assert per_payment[1] == 4.0
    assert per_payment[64] < 2.0
    reply_bench.production(repeat=1)
    out = capsys.readouterr().out
    assert "sign each" in out and "reply signatures per payment" in out
