"""State transfer in chunks (pbft/statetransfer.py) and the byte budget of catch-up service,
at the level of the Merkle proofs, the ledger's leaves, and replicas driven by hand."""

from __future__ import annotations

import functools

import msgpack
import pytest
from replica_harness import Cluster, decode, send_raws, sends

from crypto.merkle import leaf_hash, level_up, merkle_root, node_hash, node_path
from pbft.catchup import STATE_TRANSFER_TIMEOUT_INTERVALS
from pbft.codec import MAX_FRAME_BYTES
from pbft.context import StableCheckpoint
from pbft.ledger import (
    Account,
    GeneratedAccounts,
    Ledger,
    LedgerSnapshotError,
    Payment,
)
from pbft.ledger_leaves import LedgerBuilder, SnapshotLeaves
from pbft.messages import Checkpoint, CommitCertificate, Fetch, StateChunk, StateRequest
from pbft.replica import Replica
from pbft.signed import seal
from pbft.statetransfer import (
    OFFER_BYTES,
    ChunkRejected,
    ChunkServer,
    IncomingTransfer,
    chunk_proves,
)
from sim import transfer_bench

# --- the proofs -----------------------------------------------------------------------------


def _leaves(count: int) -> list[bytes]:
    return [b"leaf %d" % index for index in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13, 31, 32, 33, 100])
@pytest.mark.parametrize("chunk_leaves", [1, 2, 4, 16])
def test_every_chunk_of_every_tree_proves_and_a_changed_one_does_not(
    count: int, chunk_leaves: int
) -> None:
    leaves = _leaves(count)
    root = merkle_root(leaves)
    for start in range(0, count, chunk_leaves):
        # Served straight from a list of leaves: what SnapshotLeaves gives for a snapshot.
        block = leaves[start : start + chunk_leaves]
        level = chunk_leaves.bit_length() - 1
        path = _path(leaves, start, level)
        assert chunk_proves(root, count, start, level, block, path)
        assert not chunk_proves(root, count, start, level, [b"x", *block[1:]], path)
        assert not chunk_proves(root, count, start, level, block[:-1], path)
        if path:
            assert not chunk_proves(root, count, start, level, block, path[:-1])
            assert not chunk_proves(root, count, start, level, block, [path[0][::-1], *path[1:]])
        if start:
            assert not chunk_proves(root, count, start - 1, level, block, path)


def _path(leaves: list[bytes], start: int, level: int) -> list[bytes]:
    """The audit path of the block of 2**level leaves at `start`, computed the plain way."""
    nodes = level_up([leaf_hash(leaf) for leaf in leaves], level)
    return node_path(nodes, start >> level)


def test_a_chunk_that_claims_a_leaf_count_ending_in_the_middle_of_it_does_not_prove() -> None:
    leaves = _leaves(8)
    root = merkle_root(leaves)
    path = _path(leaves, 4, 2)
    assert chunk_proves(root, 8, 4, 2, leaves[4:], path)
    assert not chunk_proves(root, 7, 4, 2, leaves[4:], path)
    assert not chunk_proves(root, 8, 4, 3, leaves[4:], path)  # misaligned for its level
    assert not chunk_proves(root, 8, 8, 2, leaves[4:], path)  # beyond the end


# --- the ledger's leaves ----------------------------------------------------------------------


@functools.cache
def _busy_ledger(accounts: int = 300, clients: int = 3, payments: int = 40) -> Ledger:
    """Generated accounts owned round-robin by `clients`, and some payments by each client
    (so there are client leaves too, bigger than account leaves)."""
    ledger = Ledger(GeneratedAccounts(accounts, 1000, "acct-", list(range(clients))), 8)
    genesis = GeneratedAccounts(accounts, 1000, "acct-", list(range(clients)))
    for client in range(clients):
        for request_id in range(payments):
            payer = genesis.name(client)
            payee = genesis.name((client + 1 + request_id) % accounts)
            body = bytes([client, request_id % 256]) * 16
            ledger.execute(Payment(client, request_id, payer, payee, 3), body, 4)
    return ledger


def test_generated_accounts_give_the_ledger_of_the_same_accounts_listed() -> None:
    generated = GeneratedAccounts(1200, 7, "user-", [3, 5])
    listed = {generated.name(i): Account(generated.owner(i), 7) for i in range(1200)}
    assert generated.name(0) == "user-0000" and generated.name(1199) == "user-1199"
    assert dict(generated) == listed and len(generated) == 1200
    assert "user-0042" in generated and "user-42" not in generated and "user-1200" not in generated
    assert Ledger(generated).accounts() == Ledger(listed).accounts()
    # The digest commits to the representation (the header names the rule), and a generated
    # genesis snapshots as its rule, not as 1,200 accounts.
    assert Ledger(generated).digest() != Ledger(listed).digest()
    assert len(Ledger(generated).snapshot()) < 100 < len(Ledger(listed).snapshot())


@pytest.mark.parametrize(
    ("count", "balance", "prefix", "owners"),
    [
        (0, 1, "a", [0]),
        (2, -1, "a", [0]),
        (2, 2**63, "a", [0]),
        (2, 1, "a", []),
        (2, 1, "a" * 64, [0]),
    ],
)
def test_generated_accounts_refuse_a_bad_rule(
    count: int, balance: int, prefix: str, owners: list[int]
) -> None:
    with pytest.raises(ValueError):
        GeneratedAccounts(count, balance, prefix, owners)


def test_snapshot_leaves_are_the_digests_leaves() -> None:
    ledger = _busy_ledger()
    leaves = ledger._leaves()
    cut = SnapshotLeaves(ledger.snapshot())
    # The header, 300 accounts, 3 clients and 120 refundable payments.
    assert len(cut) == len(leaves) == ledger.leaf_count() == 1 + 300 + 3 + 120
    assert cut.leaves(0, len(cut)) == leaves
    assert merkle_root(cut.leaves(0, len(cut))) == ledger.digest()


def test_ledger_builder_rebuilds_the_same_ledger_from_its_leaves() -> None:
    ledger = _busy_ledger()
    builder = LedgerBuilder()
    for leaf in ledger._leaves():
        builder.add(leaf)
    rebuilt = builder.finish()
    assert rebuilt.snapshot() == ledger.snapshot()
    assert rebuilt.digest() == ledger.digest()
    # And it keeps working as a ledger: the dedup table came along.
    assert rebuilt.lookup(0, 39) == ledger.lookup(0, 39)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda leaves: leaves[1:],  # no header first
        lambda leaves: [leaves[0], leaves[2], leaves[1], *leaves[3:]],  # accounts unsorted
        lambda leaves: [*leaves[:-2], leaves[-1], leaves[-2]],  # clients unsorted
        lambda leaves: [leaves[0], leaves[-1], *leaves[1:-1]],  # a client before the accounts
        lambda leaves: [*leaves[:5], leaves[0], *leaves[5:]],  # a second header
        lambda leaves: [*leaves[:5], b"\xc0", *leaves[5:]],  # not a leaf
        lambda leaves: [*leaves[:5], msgpack.packb(["account", "zz", 0]), *leaves[5:]],
        # A balance with a wider int encoding than canonical.
        lambda leaves: [*leaves[:5], b"\x94\xa7account\xa2ab\x00\xcd\x03\xe8", *leaves[5:]],
        lambda leaves: leaves[:-1],  # balances no longer sum to the total (a client missing)
    ],
)
def test_ledger_builder_refuses_leaves_no_valid_ledger_has(mangle) -> None:
    leaves = mangle(_busy_ledger()._leaves())
    builder = LedgerBuilder()
    with pytest.raises(LedgerSnapshotError):
        for leaf in leaves:
            builder.add(leaf)
        ledger = builder.finish()
        # Dropping a client leaf leaves a valid-looking ledger: only the digest tells.
        if ledger.digest() != _busy_ledger().digest():
            raise LedgerSnapshotError("another state")


# --- replicas -------------------------------------------------------------------------------

SEQ = 4
CHAIN_HASH = b"\x02" * 32


def _transfer_cluster(**overrides: int) -> Cluster:
    # Small chunks so that a few hundred leaves take many of them, and some get halved.
    settings = {"state_chunk_leaves": 32, "state_chunk_bytes": 1024, **overrides}
    return Cluster(**settings)


def _server(cluster: Cluster, replica_id: int, ledger: Ledger) -> Replica:
    """A replica whose stable checkpoint SEQ holds `ledger` (installed directly: reaching it by
    execution would take the payments of _busy_ledger through the whole protocol)."""
    replica = cluster.replica(replica_id)
    proof = cluster.checkpoint_proof(SEQ, CHAIN_HASH, ledger.digest(), [0, 1, 2])
    replica.ordering.ledger = ledger
    replica.ordering.last_executed = SEQ
    replica.ordering.chain_hash = CHAIN_HASH
    replica.checkpoints.stable = StableCheckpoint(
        SEQ, CHAIN_HASH, ledger.digest(), ledger.snapshot(), proof
    )
    cluster.tick(replica, 1000)
    return replica


def _pump(
    cluster: Cluster, lagging: Replica, servers: dict[int, Replica], first: list[bytes]
) -> list[StateChunk]:
    """Carry messages between the lagging replica and the servers until none are left;
    the chunks the lagging replica received, in order."""
    chunks: list[StateChunk] = []
    to_lagging = list(first)
    for _ in range(10_000):
        if not to_lagging:
            return chunks
        raw = to_lagging.pop(0)
        message = decode(raw)
        if isinstance(message, StateChunk):
            chunks.append(message)
        for request in sends(cluster.deliver(lagging, raw), kind=StateRequest):
            server = servers[_target(cluster, lagging, request)]
            to_lagging += send_raws(
                cluster.deliver(server, seal(request, cluster.replica_keys[lagging.id])),
                ("replica", lagging.id),
            )
    raise AssertionError("the transfer did not end")


def _target(cluster: Cluster, lagging: Replica, request: StateRequest) -> int:
    incoming = lagging.catchup.incoming
    assert incoming is not None
    return incoming.source


def test_lagging_replica_catches_up_by_chunks() -> None:
    cluster = _transfer_cluster()
    ledger = _busy_ledger()
    server = _server(cluster, 1, ledger)
    lagging = cluster.replica(3)
    cluster.tick(lagging, 1000)

    first = send_raws(cluster.deliver(server, cluster.fetch(3, 1)), ("replica", 3))
    chunks = _pump(cluster, lagging, {1: server}, first)

    assert lagging.last_executed == SEQ and lagging.stable.seq == SEQ
    assert lagging.ledger.digest() == ledger.digest()
    assert lagging.ledger.snapshot() == ledger.snapshot()
    assert lagging.catchup.incoming is None
    # Many chunks, in order, covering every leaf once; blocks of 32 leaves where they fit
    # in 1024 bytes, halved (down to what fits) where the bigger client leaves are.
    assert len(chunks) > ledger.leaf_count() // 32
    assert [chunk.start for chunk in chunks] == sorted({chunk.start for chunk in chunks})
    assert sum(len(chunk.leaves) for chunk in chunks) == ledger.leaf_count()
    levels = [chunk.level for chunk in chunks]
    assert max(levels) == 5 and min(levels) < 5
    assert all(sum(map(len, chunk.leaves)) <= 1024 for chunk in chunks)
    assert lagging.drops == {}


def test_forged_chunk_is_rejected_counted_and_the_rest_comes_from_another_replica() -> None:
    cluster = _transfer_cluster()
    ledger = _busy_ledger()
    honest, liar = _server(cluster, 0, ledger), _server(cluster, 2, ledger)
    lagging = cluster.replica(3)
    cluster.tick(lagging, 1000)
    # The transfer starts from the liar's (genuine) first chunk; it asks the liar for more.
    first = send_raws(cluster.deliver(liar, cluster.fetch(3, 1)), ("replica", 3))
    (request,) = sends(cluster.deliver(lagging, *first), ("replica", 2), StateRequest)
    (genuine,) = sends(
        cluster.deliver(liar, seal(request, cluster.replica_keys[3])), ("replica", 3)
    )
    # The liar changes one balance and signs the chunk: the signature is fine, the leaves
    # are not the ones the checkpoint's digest covers.
    fields = msgpack.unpackb(genuine.leaves[0])
    fields[-1] += 1
    forged_leaves = (msgpack.packb(fields), *genuine.leaves[1:])
    forged = StateChunk(**{**genuine.__dict__, "leaves": forged_leaves})
    actions = cluster.deliver(lagging, seal(forged, cluster.replica_keys[2]))

    assert lagging.drops["bad_state_chunk"] == 1
    assert lagging.catchup.incoming is not None and lagging.catchup.incoming.distrusted == {2}
    assert lagging.catchup.incoming.next_leaf == request.start  # nothing of it was taken
    # The same leaf is asked of another replica, never the liar again.
    (again,) = sends(actions, ("replica", 0), StateRequest)
    assert again.start == request.start
    reply = send_raws(cluster.deliver(honest, seal(again, cluster.replica_keys[3])), ("replica", 3))
    chunks = _pump(cluster, lagging, {0: honest, 2: liar}, reply)
    assert {chunk.replica for chunk in chunks} == {0}
    assert lagging.ledger.digest() == ledger.digest() and lagging.stable.seq == SEQ


def test_chunk_with_a_lying_leaf_count_or_misplaced_start_is_dropped() -> None:
    cluster = _transfer_cluster()
    ledger = _busy_ledger()
    server = _server(cluster, 1, ledger)
    lagging = cluster.replica(3)
    cluster.tick(lagging, 1000)
    (first,) = send_raws(cluster.deliver(server, cluster.fetch(3, 1)), ("replica", 3))
    (request,) = sends(cluster.deliver(lagging, first), ("replica", 1), StateRequest)
    (genuine,) = sends(cluster.deliver(server, seal(request, cluster.replica_keys[3])))
    key = cluster.replica_keys[1]
    # Not the leaf it waits for (a late copy): dropped without blame.
    cluster.deliver(lagging, first)
    assert lagging.drops["state_chunk_unexpected"] == 1
    assert lagging.catchup.incoming is not None and not lagging.catchup.incoming.distrusted
    # The right leaf, in a tree of another size than the first chunk said.
    lying = StateChunk(**{**genuine.__dict__, "leaf_count": genuine.leaf_count + 40})
    cluster.deliver(lagging, seal(lying, key))
    assert lagging.drops["bad_state_chunk"] + lagging.drops["state_chunk_conflict"] == 1
    assert 1 in lagging.catchup.incoming.distrusted
    assert lagging.ledger.digest() == cluster.genesis_ledger_digest


def test_transfer_resumes_from_another_replica_after_a_lost_chunk() -> None:
    cluster = _transfer_cluster()
    ledger = _busy_ledger()
    servers = {1: _server(cluster, 1, ledger), 2: _server(cluster, 2, ledger)}
    lagging = cluster.replica(3)
    cluster.tick(lagging, 1000)
    first = send_raws(cluster.deliver(servers[1], cluster.fetch(3, 1)), ("replica", 3))
    (request,) = sends(cluster.deliver(lagging, *first), ("replica", 1), StateRequest)
    # Replica 1's answer is lost. Nothing happens before the timeout...
    timeout = STATE_TRANSFER_TIMEOUT_INTERVALS * cluster.config.retransmit_interval_ms
    assert sends(cluster.tick(lagging, 1000 + timeout - 1), kind=StateRequest) == []
    # ...then the same leaf is asked of the next replica, and no FETCH starts over.
    actions = cluster.tick(lagging, 1000 + timeout)
    (lost_again,) = sends(actions, ("replica", 2), StateRequest)
    assert (lost_again.seq, lost_again.start) == (request.seq, request.start)
    assert sends(actions, kind=Fetch) == []
    # That answer is lost too: the next wait is twice as long, then replica 0 is asked.
    assert sends(cluster.tick(lagging, 1000 + 3 * timeout - 1), kind=StateRequest) == []
    (to_zero,) = sends(cluster.tick(lagging, 1000 + 3 * timeout), kind=StateRequest)
    assert to_zero.start == request.start and lagging.catchup.incoming is not None
    assert lagging.catchup.incoming.source == 0
    # Replica 2's answer to the earlier request arrives late after all: it is taken (a
    # chunk proves itself), and the transfer goes on with replica 2.
    again = lost_again
    reply = send_raws(
        cluster.deliver(servers[2], seal(again, cluster.replica_keys[3])), ("replica", 3)
    )
    chunks = _pump(cluster, lagging, servers, reply)
    assert chunks[0].start == request.start and {c.replica for c in chunks} == {2}
    assert lagging.ledger.digest() == ledger.digest() and lagging.stable.seq == SEQ


def test_state_request_is_refused_and_counted_once_the_byte_budget_is_spent() -> None:
    cluster = _transfer_cluster(catch_up_bytes_per_second=2048, catch_up_burst_bytes=4096)
    server = _server(cluster, 1, _busy_ledger())
    key = cluster.replica_keys[3]
    sent = 0
    served = 0
    for start in range(0, 96, 16):
        raws = send_raws(
            cluster.deliver(server, seal(StateRequest(3, SEQ, start), key)), ("replica", 3)
        )
        sent += sum(map(len, raws))
        served += len(raws)
    refused = server.drops["catch_up_budget_exceeded"]
    assert served + refused == 6 and refused >= 1
    assert sent - 4096 < MAX_FRAME_BYTES and sent >= 4096  # the burst, plus one message
    # Two seconds later 4096 bytes more may go.
    cluster.tick(server, 3000)
    assert send_raws(cluster.deliver(server, seal(StateRequest(3, SEQ, 0), key)))
    assert server.drops["catch_up_budget_exceeded"] == refused


def test_a_fetch_storm_claiming_no_stable_checkpoint_gets_at_most_the_byte_rate() -> None:
    """A FETCH with stable_seq = 0 every 20 ms used to get the whole snapshot every time;
    now each gets one chunk, paid from the requester's bucket."""
    cluster = _transfer_cluster(
        state_chunk_leaves=1024,
        state_chunk_bytes=8192,
        catch_up_bytes_per_second=16 * 1024,
        catch_up_burst_bytes=8 * 1024,
    )
    server = _server(cluster, 1, _busy_ledger(accounts=2000))
    sent = 0
    for step in range(50):  # one second
        cluster.tick(server, 1000 + 20 * step)
        sent += sum(map(len, send_raws(cluster.deliver(server, cluster.fetch(3, 1, 0)))))
    chunk_bytes = 8192 + 4096  # one chunk and its proof
    assert sent <= 16 * 1024 + 8 * 1024 + chunk_bytes
    assert server.drops["catch_up_budget_exceeded"] >= 40


def test_unsolicited_help_is_paid_from_the_same_budget() -> None:
    cluster = _transfer_cluster(catch_up_bytes_per_second=1024, catch_up_burst_bytes=1024)
    server = _server(cluster, 1, _busy_ledger())
    assert send_raws(cluster.deliver(server, cluster.fetch(3, 1)))  # spends the bucket
    refused = server.drops["catch_up_budget_exceeded"]
    # Replica 3 still votes on seq 1, long executed here: help would send it state.
    cluster.tick(server, 1100)
    vote = cluster.prepare_vote(0, 1, 3, b"\x00" * 32)
    actions = cluster.deliver(server, vote)
    assert send_raws(actions, ("replica", 3)) == []
    assert server.drops["catch_up_budget_exceeded"] == refused + 1


def test_the_chunk_answering_a_fetch_is_small_and_the_next_ones_grow_back() -> None:
    """A FETCH is answered unasked-for, so its chunk is capped at OFFER_BYTES; the chunks
    the lagging replica asks for then grow as their start aligns with bigger blocks."""
    cluster = Cluster(state_chunk_leaves=4096)  # and the default 1 MiB state_chunk_bytes
    ledger = _busy_ledger(accounts=20_000)
    server = _server(cluster, 1, ledger)
    lagging = cluster.replica(3)
    cluster.tick(lagging, 1000)
    first = send_raws(cluster.deliver(server, cluster.fetch(3, 1)), ("replica", 3))
    assert sum(map(len, decode(first[0]).leaves)) <= OFFER_BYTES
    chunks = _pump(cluster, lagging, {1: server}, first)
    sizes = [len(chunk.leaves) for chunk in chunks]
    assert sizes[0] <= sizes[1] < sizes[2] == max(sizes) == 4096
    assert lagging.ledger.digest() == ledger.digest()


def test_the_transfer_benchmark_runs_on_a_small_ledger(capsys: pytest.CaptureFixture[str]) -> None:
    assert transfer_bench.main(["--accounts", "3000", "--chunk-leaves", "256"]) == 0
    printed = capsys.readouterr().out
    assert "chunked transfer" in printed and "baseline" in printed
    assert transfer_bench.main(["--chunk-leaves", "3"]) == 2


def test_a_lied_leaf_count_that_proves_is_caught_and_the_transfer_starts_over() -> None:
    """A proof binds a chunk's place only up to the tree's size: leaf 0 of a 3-leaf tree
    has the same path shape in a 4-leaf one. A liar may so get a wrong count adopted; the
    first honest chunk then conflicts with it, both senders are set aside, and the transfer
    starts over with a third replica."""
    ledger = Ledger({"a": Account(0, 5), "b": Account(1, 7)})
    leaves = ledger._leaves()
    assert len(leaves) == 3
    digest = ledger.digest()
    hashes = [leaf_hash(leaf) for leaf in leaves]

    def chunk(sender: int, count: int, start: int, path: list[bytes]) -> StateChunk:
        return StateChunk(
            sender, 8, CHAIN_HASH, digest, (), count, start, 0, (leaves[start],), tuple(path)
        )

    transfer = IncomingTransfer(8, CHAIN_HASH, digest, (), source=2, last_progress_ms=0)
    # The liar (replica 2) says 4 leaves; its paths verify for leaves 0 and 1 all the same.
    assert transfer.add(chunk(2, 4, 0, [hashes[1], hashes[2]]), 10) is None
    assert transfer.add(chunk(2, 4, 1, [hashes[0], hashes[2]]), 20) is None
    assert transfer.leaf_count == 4
    # Replica 1's leaf 2, in the real 3-leaf tree: proven, and in conflict.
    honest_path = [node_hash(hashes[0], hashes[1])]
    with pytest.raises(ChunkRejected) as caught:
        transfer.add(chunk(1, 3, 2, honest_path), 30)
    assert caught.value.reason == "state_chunk_conflict"
    assert transfer.distrusted == {1, 2} and transfer.next_leaf == 0
    assert transfer.next_source([0, 1, 2]) == 0
    # Neither is listened to any more in this transfer; replica 0 completes it.
    with pytest.raises(ChunkRejected):
        transfer.add(chunk(2, 4, 0, [hashes[1], hashes[2]]), 40)
    assert transfer.add(chunk(0, 3, 0, [hashes[1], hashes[2]]), 50) is None
    assert transfer.add(chunk(0, 3, 1, [hashes[0], hashes[2]]), 60) is None
    rebuilt = transfer.add(chunk(0, 3, 2, honest_path), 70)
    assert rebuilt is not None and rebuilt.snapshot() == ledger.snapshot()


# --- unsolicited help (issue 8, point 5) -----------------------------------------------------


def test_a_stale_vote_of_another_view_gets_no_help() -> None:
    """Only a vote of the view we are in shows its sender stuck in our view: an old vote
    (here of view 1, replayed to a replica in view 0, or the converse after a view change)
    is dropped as stale and answered with nothing."""
    cluster = _transfer_cluster()
    server = _server(cluster, 1, _busy_ledger())
    cluster.tick(server, 1100)
    other_view = cluster.prepare_vote(1, 1, 3, b"\x00" * 32)
    assert send_raws(cluster.deliver(server, other_view)) == []
    current = cluster.prepare_vote(0, 1, 3, b"\x00" * 32)
    assert send_raws(cluster.deliver(server, current), ("replica", 3))


def test_help_below_the_stable_checkpoint_is_one_signed_checkpoint_that_makes_it_fetch() -> None:
    """A replica voting at a seq our stable checkpoint covers lacks that state: it gets one
    CHECKPOINT (a few hundred bytes, already signed), not state, and asks for the state
    itself; the answer to that FETCH is paid from its byte budget."""
    cluster = _transfer_cluster()
    server = _server(cluster, 1, _busy_ledger())
    lagging = cluster.replica(3)
    cluster.tick(lagging, 1000)
    cluster.tick(server, 1100)
    (hint,) = send_raws(cluster.deliver(server, cluster.prepare_vote(0, 1, 3, b"\x00" * 32)))
    assert isinstance(decode(hint), Checkpoint) and len(hint) < 512
    cluster.deliver(lagging, hint)
    assert lagging.catchup.highest_seen_executed == SEQ
    asked = [decode(raw) for raw in send_raws(cluster.tick(lagging, 1000 + 10_000))]
    assert [type(message) for message in asked] == [Fetch]


def test_replaying_an_old_vote_costs_the_replica_about_what_it_costs_the_replayer() -> None:
    """A replayed old vote, as fast as help is given (once per retransmit interval), used
    to get a 64 KiB state chunk each time (the attack measured 397x the bytes sent). Now
    each gets one CHECKPOINT: the bytes out are within a small factor of the bytes in."""
    cluster = _transfer_cluster(state_chunk_leaves=4096, state_chunk_bytes=1024 * 1024)
    server = _server(cluster, 1, _busy_ledger(accounts=20_000))
    vote = cluster.prepare_vote(0, 1, 3, b"\x00" * 32)
    bytes_in = bytes_out = 0
    interval = cluster.config.retransmit_interval_ms
    for step in range(100):
        cluster.tick(server, 2000 + step * interval)
        bytes_in += len(vote)
        bytes_out += sum(map(len, send_raws(cluster.deliver(server, vote))))
    assert 0 < bytes_out <= 3 * bytes_in


def test_help_above_the_stable_checkpoint_is_one_commit_certificate() -> None:
    """A replica stuck on an executed seq above our stable checkpoint gets that seq's
    certificate only: it executes it and learns it is behind; the rest it FETCHes."""
    cluster = Cluster()
    server = cluster.replica(1)
    chain = cluster.chain()
    for seq in range(1, 4):
        chain.append([cluster.request(seq, seq)])
        cluster.drive_commit(server, chain[seq])
    assert server.last_executed == 3 and server.stable.seq == 0
    cluster.tick(server, 10_000)
    vote = cluster.prepare_vote(0, 2, 3, chain[2].digest)
    sent = send_raws(cluster.deliver(server, vote), ("replica", 3))
    assert [type(decode(raw)) for raw in sent] == [CommitCertificate]
    assert decode(decode(sent[0]).pre_prepare).seq == 2


@pytest.mark.parametrize("limit", [1, 40, 300, 2_000, 10**9])
def test_a_chunk_is_the_largest_aligned_block_within_the_limit(limit: int) -> None:
    """What the server sends, checked against the rule stated over whole blocks: the largest
    aligned block of at most state_chunk_leaves at `start` whose leaves fit the limit (one
    leaf if none does), its audit path the digest's."""
    ledger = _busy_ledger()
    snapshot, digest = ledger.snapshot(), ledger.digest()
    leaves = ledger._leaves()
    server = ChunkServer(16, 10**9)
    for start in range(len(leaves)):
        data = server.chunk(7, snapshot, start, MAX_FRAME_BYTES, byte_limit=limit)
        assert data is not None
        level = 4
        while level > 0 and (
            start % (1 << level) or sum(map(len, leaves[start : start + (1 << level)])) > limit
        ):
            level -= 1
        assert data.level == level
        assert data.leaves == tuple(leaves[start : start + (1 << level)])
        assert chunk_proves(digest, len(leaves), start, level, data.leaves, data.path)
    assert server.chunk(7, snapshot, len(leaves), MAX_FRAME_BYTES) is None
