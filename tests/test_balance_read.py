"""Balance reads: every replica answers from its ledger; f + 1 matching answers decide, and
the reported sequence number is one f liars cannot inflate."""

from __future__ import annotations

from replica_harness import Cluster, send_raws

from pbft.client import BalanceRead, ClientCore
from pbft.events import MessageReceived, Send
from pbft.messages import BalanceQuery, BalanceReply
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


def test_balance_read_needs_f_plus_one_matching_replies() -> None:
    cluster = Cluster()
    client = ClientCore(0, cluster.config, cluster.client_keys[0], cluster.keyring)
    actions = client.query_balance(9, "alice")
    assert sorted(action.to[1] for action in actions if isinstance(action, Send)) == [0, 1, 2, 3]

    def reply(replica: int, balance: int) -> bytes:
        return seal(
            BalanceReply(replica, 0, 9, "alice", 1, balance, 4), cluster.replica_keys[replica]
        )

    assert client.handle(MessageReceived(reply(0, 999))) == []  # a lone (lying) replica
    assert client.handle(MessageReceived(reply(1, 100))) == []
    (read,) = client.handle(MessageReceived(reply(2, 100)))
    assert isinstance(read, BalanceRead)
    assert (read.balance, read.replicas, read.exists) == (100, (1, 2), True)
    assert client.handle(MessageReceived(reply(3, 100))) == []  # already decided
    assert client.statistics().drops["late_reply"] == 1


def test_a_byzantine_replica_cannot_inflate_the_reported_seq() -> None:
    """Replica 3 reports the right balance but claims to have executed far ahead. The read
    may only claim what f + 1 replies prove: the (f + 1)-th highest seq, here 7."""
    cluster = Cluster()
    client = ClientCore(0, cluster.config, cluster.client_keys[0], cluster.keyring)
    client.query_balance(9, "alice")

    def reply(replica: int, seq: int) -> bytes:
        return seal(
            BalanceReply(replica, 0, 9, "alice", 1, 100, seq), cluster.replica_keys[replica]
        )

    assert client.handle(MessageReceived(reply(3, 10**9))) == []
    (read,) = client.handle(MessageReceived(reply(1, 7)))
    assert isinstance(read, BalanceRead)
    assert (read.balance, read.replicas, read.seq) == (100, (1, 3), 7)
