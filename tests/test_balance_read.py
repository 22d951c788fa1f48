"""Balance reads: every replica answers from its ledger; f + 1 matching answers decide, and
the reported sequence number is one f liars cannot inflate."""

from __future__ import annotations

from replica_harness import Cluster, send_raws

from pbft.client import BalanceRead, ClientCore
from pbft.events import MessageReceived, Send
from pbft.genesis import compute_cluster_id
from pbft.ledger import Account
from pbft.messages import BalanceQuery, BalanceReply, Request
from pbft.signed import open_envelope, seal


def test_replica_answers_a_signed_balance_query_from_its_ledger() -> None:
    cluster = Cluster()
    replica = cluster.replica(2)
    query = seal(BalanceQuery(0, 7, "alice"), cluster.client_keys[0])
    actions = cluster.deliver(replica, query)
    (raw,) = send_raws(actions, ("client", 0))
    reply = open_envelope(raw, cluster.keyring, cluster.cache, BalanceReply).message
    assert isinstance(reply, BalanceReply)
    assert (reply.replica, reply.query_id, reply.account, reply.exists) == (2, 7, "alice", 1)
    assert reply.balance == replica.ledger.balance("alice")
    # The replica names its own cluster (computed from its genesis) under its signature.
    assert reply.cluster_id == replica.cluster_id == cluster.cluster_id


def _reply(
    cluster: Cluster,
    replica: int,
    balance: int,
    seq: int = 4,
    cluster_id: bytes | None = None,
    held: int = 0,
) -> bytes:
    named = cluster.cluster_id if cluster_id is None else cluster_id
    return seal(
        BalanceReply(replica, 0, 9, "alice", 1, balance, seq, named, held),
        cluster.replica_keys[replica],
    )


def test_a_replica_reports_the_available_and_the_held_balance() -> None:
    cluster = Cluster(max_clock_skew_ms=1_000)
    replica = cluster.replica(2)
    cluster.tick(replica, 5_000)
    hold = seal(
        Request(0, 1, "authorize", "alice", "carol", 30, expires_in_ms=60_000),
        cluster.client_keys[0],
    )
    cluster.drive_commit(replica, cluster.chain().append([hold], timestamp_ms=5_000))
    assert replica.ledger.held("alice") == 30
    query = seal(BalanceQuery(0, 7, "alice"), cluster.client_keys[0])
    (raw,) = send_raws(cluster.deliver(replica, query), ("client", 0))
    reply = open_envelope(raw, cluster.keyring, cluster.cache, BalanceReply).message
    assert isinstance(reply, BalanceReply)
    assert (reply.balance, reply.held) == (replica.ledger.balance("alice"), 30)
    assert reply.seq == 1


def test_f_plus_one_replicas_must_agree_on_the_held_balance_too() -> None:
    cluster = Cluster()
    client = cluster.client(0)
    client.query_balance(9, "alice")
    # Replica 0 lies about what is held only: its answer is a different one.
    assert client.handle(MessageReceived(_reply(cluster, 0, 100, held=999))) == []
    assert client.handle(MessageReceived(_reply(cluster, 1, 100, held=30))) == []
    (read,) = client.handle(MessageReceived(_reply(cluster, 2, 100, held=30)))
    assert isinstance(read, BalanceRead)
    assert (read.balance, read.held, read.replicas) == (100, 30, (1, 2))


def test_balance_read_needs_f_plus_one_matching_replies() -> None:
    cluster = Cluster()
    client = cluster.client(0)
    actions = client.query_balance(9, "alice")
    assert sorted(action.to[1] for action in actions if isinstance(action, Send)) == [0, 1, 2, 3]
    assert client.handle(MessageReceived(_reply(cluster, 0, 999))) == []  # a lone (lying) replica
    assert client.handle(MessageReceived(_reply(cluster, 1, 100))) == []
    (read,) = client.handle(MessageReceived(_reply(cluster, 2, 100)))
    assert isinstance(read, BalanceRead)
    assert (read.balance, read.replicas, read.exists, read.seq) == (100, (1, 2), True, 4)
    assert client.handle(MessageReceived(_reply(cluster, 3, 100))) == []  # already decided
    assert client.statistics().drops["late_reply"] == 1


def test_a_byzantine_replica_cannot_inflate_the_reported_seq() -> None:
    """Replica 3 reports the right balance but claims to have executed far ahead. The read
    may only claim what f + 1 replies prove: the (f + 1)-th highest seq, here 7."""
    cluster = Cluster()
    client = cluster.client(0)
    client.query_balance(9, "alice")
    assert client.handle(MessageReceived(_reply(cluster, 3, 100, seq=10**9))) == []
    (read,) = client.handle(MessageReceived(_reply(cluster, 1, 100, seq=7)))
    assert isinstance(read, BalanceRead)
    assert (read.balance, read.replicas, read.seq) == (100, (1, 3), 7)


def test_the_reported_seq_is_the_f_plus_first_highest_in_a_larger_cluster() -> None:
    # n = 7, f = 2: two liars claim huge seqs; the third-highest claim is a correct one's.
    cluster = Cluster(replica_count=7)
    client = cluster.client(0)
    client.query_balance(9, "alice")
    assert client.handle(MessageReceived(_reply(cluster, 5, 100, seq=2**40))) == []
    assert client.handle(MessageReceived(_reply(cluster, 6, 100, seq=2**41))) == []
    (read,) = client.handle(MessageReceived(_reply(cluster, 0, 100, seq=12)))
    assert isinstance(read, BalanceRead)
    assert (read.replicas, read.seq) == ((0, 5, 6), 12)


def test_balance_replies_from_another_cluster_are_dropped_and_counted() -> None:
    cluster = Cluster()
    client = cluster.client(0)
    client.query_balance(9, "alice")
    other = bytes(32)
    for replica in range(4):
        assert client.handle(MessageReceived(_reply(cluster, replica, 100, cluster_id=other))) == []
    assert client.statistics().drops == {"other_cluster": 4}
    assert client.handle(MessageReceived(_reply(cluster, 0, 100))) == []
    (read,) = client.handle(MessageReceived(_reply(cluster, 1, 100)))
    assert isinstance(read, BalanceRead)


def test_a_client_of_another_cluster_ignores_this_clusters_replicas() -> None:
    # Same keys, another genesis (alice holds more): the replicas' answers are not for it.
    cluster = Cluster()
    other = Cluster()
    other.accounts["alice"] = Account(owner=0, balance=1001)
    other_id = compute_cluster_id(other.config, other.keyring, other.accounts)
    assert other_id != cluster.cluster_id
    client = ClientCore(0, other.config, other.client_keys[0], other.keyring, cluster_id=other_id)
    client.query_balance(7, "alice")
    query = seal(BalanceQuery(0, 7, "alice"), cluster.client_keys[0])
    for replica_id in range(4):
        replica = cluster.replica(replica_id)
        for raw in send_raws(cluster.deliver(replica, query), ("client", 0)):
            assert client.handle(MessageReceived(raw)) == []
    assert client.statistics().drops == {"other_cluster": 4}
