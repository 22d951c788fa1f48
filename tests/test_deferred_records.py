"""Which records a replica's sends wait for (pbft/host.py): votes always wait for their own
record; a reply waits for the votes it depends on, never for the commit certificate's
record, which is written after it (deferrable) and before the replica's next step.

A backup (replica 1) is driven through one payment through the host loop, with a disk that
notes what was durable when each frame left, and then crashed in the window the deferral
opens: after its reply, before the certificate's record reached the disk.
"""

from __future__ import annotations

from collections.abc import Sequence

from replica_harness import Cluster, Entry, Network

from crypto.keys import Principal
from pbft.events import Executed, MessageReceived, Note, Persist
from pbft.host import Outgoing, carry_out, peers_of, step, write_records
from pbft.messages import MessageType
from pbft.replica import Replica
from pbft.signed import type_code_of

Key = tuple[str | int, ...]
BACKUP = 1


class DiskHost:
    """A synchronous host that notes, for every frame sent, the records durable then."""

    def __init__(self) -> None:
        self.durable: dict[Key, bytes] = {}
        self.sent: list[tuple[int | None, dict[Key, bytes]]] = []
        self.executed_batches: list[Executed] = []

    def persist(self, records: Sequence[Persist]) -> None:
        write_records(self.durable, records)

    def send(self, message: Outgoing) -> None:
        self.sent.append((type_code_of(message.data), dict(self.durable)))

    def executed(self, executed: Executed) -> None:
        self.executed_batches.append(executed)

    def note(self, note: Note) -> None:
        pass

    def durable_at(self, code: MessageType) -> list[dict[Key, bytes]]:
        return [durable for sent_code, durable in self.sent if sent_code == code]


def _run(
    cluster: Cluster, replica: Replica, steps: Sequence[Sequence[bytes]], host: DiskHost
) -> None:
    peers: tuple[Principal, ...] = peers_of(replica.id, range(cluster.n))
    for frames in steps:
        ready = step(replica, [MessageReceived(raw) for raw in frames], peers)
        carry_out(ready, host)
        # Whatever the order of send and write, the step is on disk before the next one.
        expected: dict[Key, bytes] = dict(host.durable)
        write_records(expected, ready.records)
        assert host.durable == expected


def _payment(cluster: Cluster) -> tuple[Entry, list[bytes], list[bytes]]:
    entry = cluster.chain().append([cluster.request(1)])
    prepares = cluster.prepares(entry, [2])
    commits = cluster.commits(entry, [0, 2])
    return entry, prepares, commits


COMMIT_VOTE: Key = ("vote", "commit", 0, 1)
PREPARE_VOTE: Key = ("vote", "prepare", 0, 1)
PREPARED: Key = ("prepared", 1)
COMMITTED: Key = ("committed", 1)


def test_the_reply_leaves_before_the_certificate_record_never_before_the_votes() -> None:
    cluster = Cluster()
    replica = cluster.replica(BACKUP)
    entry, prepares, commits = _payment(cluster)
    host = DiskHost()
    # One frame per step, as a lone payment reaches a replica over the network.
    _run(cluster, replica, [[entry.raw], prepares, commits[:1], commits[1:]], host)
    assert replica.last_executed == 1
    (prepare_sent,) = host.durable_at(MessageType.PREPARE)
    assert PREPARE_VOTE in prepare_sent
    (commit_sent,) = host.durable_at(MessageType.COMMIT)
    assert {COMMIT_VOTE, PREPARED} <= commit_sent.keys()
    (reply_sent,) = host.durable_at(MessageType.REPLY)
    # Its votes were durable before (each before it left); the certificate followed it.
    assert {PREPARE_VOTE, PREPARED, COMMIT_VOTE} <= reply_sent.keys()
    assert COMMITTED not in reply_sent
    assert COMMITTED in host.durable


def test_a_reply_in_the_step_of_its_own_commit_vote_waits_for_that_vote() -> None:
    cluster = Cluster()
    replica = cluster.replica(BACKUP)
    entry, prepares, commits = _payment(cluster)
    host = DiskHost()
    # Everything at once (group commit): the COMMIT vote and the reply share one step.
    _run(cluster, replica, [[entry.raw, *prepares, *commits]], host)
    (reply_sent,) = host.durable_at(MessageType.REPLY)
    assert {COMMIT_VOTE, PREPARED, COMMITTED} <= reply_sent.keys()
    assert all(COMMIT_VOTE in durable for durable in host.durable_at(MessageType.COMMIT))


def test_a_crash_between_reply_and_write_re_executes_the_same_decision() -> None:
    cluster = Cluster()
    replica = cluster.replica(BACKUP)
    entry, prepares, commits = _payment(cluster)
    host = DiskHost()
    _run(cluster, replica, [[entry.raw], prepares, commits[:1], commits[1:]], host)
    (reply_sent,) = host.durable_at(MessageType.REPLY)
    (answered,) = host.executed_batches

    # The disk as it was when the reply left: the votes, not the commit certificate.
    restarted = cluster.replica(BACKUP, dict(reply_sent))
    assert restarted.outbox == [] and restarted.last_executed == 0
    slot = restarted.ordering.slots[1]
    # It cannot vote otherwise: its COMMIT and its prepared certificate came back.
    assert slot.own_votes[("commit", 0)] == entry.digest
    assert slot.best_prepared is not None
    # The others' certificate (what catch-up fetches) makes it execute the same entry to
    # the same result; the dedup table holds the decision the client was told.
    again = DiskHost()
    _run(cluster, restarted, [[cluster.commit_certificate(entry, sender=2)]], again)
    (re_executed,) = again.executed_batches
    assert re_executed.requests == answered.requests
    assert restarted.ledger.digest() == replica.ledger.digest()
    assert restarted.ordering.chain_hash == replica.ordering.chain_hash
    decided = restarted.ledger.lookup(0, 1)
    assert decided is not None and decided == replica.ledger.lookup(0, 1)
    assert COMMITTED in again.durable


def test_a_whole_cluster_that_loses_every_certificate_record_keeps_the_decision() -> None:
    """The worst case of the deferral: every replica replied, then all crashed before any
    of them wrote the commit certificate. Their prepared certificates and COMMITs survive,
    so the entry commits again at its seq with the same result (a view change would have
    to re-propose it there too): the client's receipt stays true."""
    cluster = Cluster()
    network = Network(cluster, client_ids=(0,))
    network.submit(0, 1, "alice", "carol", 10)
    network.run()
    (first,) = network.decided
    assert first.outcome == "confirmed" and first.seq == 1
    for replica in range(cluster.n):
        records = network.records[replica]
        assert COMMITTED in records  # a synchronous host writes the deferred step at once
        del records[COMMITTED]
        network.replicas[replica] = cluster.replica(replica, records)
        assert network.replicas[replica].last_executed == 0
    network.submit(0, 2, "alice", "carol", 10)
    network.advance(20_000)
    assert [decided.request_id for decided in network.decided] == [1, 2]
    for replica in network.replicas.values():
        decision = replica.ledger.lookup(0, 1)
        assert decision is not None
        assert (decision.outcome.value, decision.seq) == (first.outcome, first.seq)
    digests = {replica.ledger.digest() for replica in network.replicas.values()}
    assert len(digests) == 1
