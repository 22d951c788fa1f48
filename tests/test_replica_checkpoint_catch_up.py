"""Checkpoints, catch-up (FETCH / COMMIT_CERTIFICATE / CHECKPOINT_STATE) and restart from
persisted records, at one replica driven with hand-made signed messages."""

from __future__ import annotations

import pytest
from replica_harness import (
    Chain,
    Cluster,
    apply_persists,
    broadcasts,
    executed,
    notes,
    persisted_keys,
    persists,
    send_raws,
    sends,
)

import pbft.ledger
from pbft.codec import unpack
from pbft.events import Send, Tick
from pbft.ledger import MAX_GENERATED_ACCOUNTS, GeneratedAccounts, Ledger
from pbft.messages import (
    Checkpoint,
    CheckpointState,
    CommitCertificate,
    Fetch,
    Prepare,
    PrePrepare,
    StateChunk,
)
from pbft.replica import Replica
from pbft.signed import open_envelope, seal


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def build_chain(cluster: Cluster, length: int) -> Chain:
    chain = cluster.chain()
    for seq in range(1, length + 1):
        chain.append([cluster.request(seq, seq)])
    return chain


def execute_through(cluster: Cluster, replica: Replica, chain: Chain, last: int) -> list:
    actions: list = []
    for seq in range(replica.last_executed + 1, last + 1):
        actions += cluster.drive_commit(replica, chain[seq])
    assert replica.last_executed == last
    return actions


def make_stable(cluster: Cluster, replica: Replica, chain: Chain, seq: int) -> list:
    """Deliver checkpoints at `seq` from 2f others, matching the chain and the model ledger."""
    ledger_digest = cluster.model_ledger(chain[s] for s in range(1, seq + 1)).digest()
    others = [i for i in range(cluster.n) if i != replica.id][: 2 * cluster.f]
    return cluster.deliver(
        replica, *cluster.checkpoint_proof(seq, chain[seq].digest, ledger_digest, others)
    )


# --- checkpoints --------------------------------------------------------------------------


def test_replica_broadcasts_checkpoint_after_executing_checkpoint_sequence(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 4)
    actions = execute_through(cluster, replica, chain, 3)
    assert broadcasts(actions, Checkpoint) == []

    actions = execute_through(cluster, replica, chain, 4)

    (checkpoint,) = broadcasts(actions, Checkpoint)
    model = cluster.model_ledger(chain[s] for s in range(1, 5))
    assert (checkpoint.seq, checkpoint.replica) == (4, 1)
    assert checkpoint.chain_hash == chain[4].digest
    assert checkpoint.ledger_digest == model.digest() == replica.ledger.digest()
    assert replica.statistics().stable_checkpoint == 0


def test_two_f_plus_one_matching_checkpoints_make_checkpoint_stable(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 5)
    execute_through(cluster, replica, chain, 4)
    cluster.drive_prepared(replica, chain[5])  # seq 5 survives the garbage collection
    ledger_digest = replica.ledger.digest()

    first = cluster.deliver(replica, cluster.checkpoint(4, 0, chain[4].digest, ledger_digest))
    assert notes(first, "checkpoint_stable") == []
    assert replica.statistics().stable_checkpoint == 0

    actions = cluster.deliver(replica, cluster.checkpoint(4, 2, chain[4].digest, ledger_digest))

    assert replica.statistics().stable_checkpoint == 4
    assert [note.detail for note in notes(actions, "checkpoint_stable")] == ["seq 4"]
    (record,) = [p for p in persists(actions) if p.key == ("checkpoint",)]
    assert record.value is not None
    seq, chain_hash, digest, snapshot, proof = unpack(record.value)
    assert (seq, chain_hash, digest) == (4, chain[4].digest, ledger_digest)
    assert Ledger.restore(snapshot).digest() == ledger_digest
    signers = sorted(
        open_envelope(raw, cluster.keyring, cluster.cache, Checkpoint).message.replica
        for raw in proof
    )
    assert signers == [0, 1, 2]
    # Slots up to the checkpoint are discarded, with their records; seq 5 stays.
    assert sorted(replica.ordering.slots) == [5]
    deleted = {p.key for p in persists(actions) if p.value is None}
    for s in range(1, 5):
        assert {("committed", s), ("prepared", s), ("vote", "prepare", 0, s)} <= deleted
    assert not any(key[-1] == 5 for key in deleted if key[0] != "checkpoint")
    # Late checkpoints and votes for the discarded slots are ignored.
    assert cluster.deliver(replica, cluster.checkpoint(4, 3, chain[4].digest, ledger_digest)) == []


def test_checkpoint_with_different_digest_is_not_counted_towards_stable(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 4)
    execute_through(cluster, replica, chain, 4)
    good = replica.ledger.digest()
    bad = b"\x66" * 32

    actions = cluster.deliver(
        replica,
        cluster.checkpoint(4, 0, chain[4].digest, good),
        cluster.checkpoint(4, 2, chain[4].digest, bad),
    )
    assert notes(actions, "checkpoint_stable") == []
    assert replica.statistics().stable_checkpoint == 0

    actions = cluster.deliver(replica, cluster.checkpoint(4, 3, chain[4].digest, good))
    assert replica.statistics().stable_checkpoint == 4
    signers = sorted(
        open_envelope(raw, cluster.keyring, cluster.cache, Checkpoint).message.replica
        for raw in replica.stable.proof
    )
    assert signers == [0, 1, 3]


def test_checkpoint_agreed_by_two_f_plus_one_others_on_another_state_is_not_adopted(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 4)
    execute_through(cluster, replica, chain, 4)
    own = replica.ledger.digest()
    other = b"\x66" * 32

    actions = cluster.deliver(
        replica, *cluster.checkpoint_proof(4, chain[4].digest, other, [0, 2, 3])
    )

    assert replica.statistics().stable_checkpoint == 0
    assert replica.stable.ledger_digest != other
    assert replica.ledger.digest() == own
    # The replica's state diverged from 2f + 1 others: it stops rather than run on.
    assert replica.halted is not None
    assert notes(actions, "halt")


def test_checkpoint_votes_arriving_before_execution_count_once_executed(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(2)
    chain = build_chain(cluster, 4)
    execute_through(cluster, replica, chain, 3)
    make_stable(cluster, replica, chain, 4)
    assert replica.statistics().stable_checkpoint == 0
    actions = execute_through(cluster, replica, chain, 4)
    assert replica.statistics().stable_checkpoint == 4
    assert notes(actions, "checkpoint_stable")


def test_checkpoint_at_non_checkpoint_sequence_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    cluster.deliver(replica, cluster.checkpoint(3, 0, b"\x01" * 32, b"\x02" * 32))
    assert replica.drops["bad_checkpoint"] == 1


def test_conflicting_checkpoints_from_one_replica_are_kept_as_evidence(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    first = cluster.checkpoint(4, 2, b"\x01" * 32, b"\x02" * 32)
    second = cluster.checkpoint(4, 2, b"\x01" * 32, b"\x03" * 32)
    cluster.deliver(replica, first, second)
    assert replica.evidence == [("checkpoint", 2, first, second)]


def test_stable_checkpoint_moves_watermark_window(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 4 + cluster.config.watermark_window)
    execute_through(cluster, replica, chain, 4)
    high = chain[4 + cluster.config.watermark_window]
    # Before the checkpoint is stable, a proposal 12 is above the window (0 + 8).
    beyond = cluster.pre_prepare(high.seq, high.requests, prev_hash=high.prev_hash)
    cluster.deliver(replica, beyond.raw)
    assert replica.drops["above_window"] == 1
    make_stable(cluster, replica, chain, 4)
    # Now seq 5 is in the window and gets prepared.
    assert [p.seq for p in broadcasts(cluster.deliver(replica, chain[5].raw), Prepare)] == [5]


def test_replica_behind_checkpoint_quorum_fetches(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 4)
    cluster.tick(replica, 0)
    make_stable(cluster, replica, chain, 4)
    actions = cluster.tick(replica, cluster.config.retransmit_interval_ms)
    sent = [action for action in actions if isinstance(action, Send)]
    assert len(sent) == 1
    fetch = open_envelope(sent[0].data, cluster.keyring, cluster.cache, Fetch).message
    assert isinstance(fetch, Fetch)
    assert sent[0].to[0] == "replica" and sent[0].to[1] != 3
    assert (fetch.replica, fetch.from_seq) == (3, 1)


# --- catch-up -----------------------------------------------------------------------------


def test_replica_executes_valid_commit_certificate_for_next_sequence(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 2)
    actions = cluster.deliver(replica, cluster.commit_certificate(chain[1], [0, 1, 2]))
    assert [e.seq for e in executed(actions)] == [1]
    assert replica.last_executed == 1
    assert ("committed", 1) in persisted_keys(actions)
    assert [r.seq for r in sends(actions, ("client", 0))] == [1]
    actions = cluster.deliver(replica, cluster.commit_certificate(chain[2], [1, 2, 3], sender=2))
    assert [e.seq for e in executed(actions)] == [2]
    assert replica.ledger.digest() == cluster.model_ledger([chain[1], chain[2]]).digest()


def test_commit_certificate_ahead_waits_for_its_predecessor(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 2)
    assert executed(cluster.deliver(replica, cluster.commit_certificate(chain[2]))) == []
    actions = cluster.deliver(replica, cluster.commit_certificate(chain[1]))
    assert [e.seq for e in executed(actions)] == [1, 2]


def test_commit_certificate_with_only_two_f_commits_is_rejected(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 1)
    actions = cluster.deliver(replica, cluster.commit_certificate(chain[1], [0, 1]))
    assert executed(actions) == []
    assert replica.last_executed == 0
    assert replica.drops["bad_certificate"] == 1


def test_commit_certificate_counting_one_replica_twice_is_rejected(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    entry = build_chain(cluster, 1)[1]
    commits = (cluster.commit(0, entry), cluster.commit(1, entry), cluster.commit(1, entry))
    message = CommitCertificate(0, entry.raw, commits)
    cluster.deliver(replica, seal(message, cluster.replica_keys[0]))
    assert replica.last_executed == 0
    assert replica.drops["bad_certificate"] == 1


def test_commit_certificate_with_commits_for_another_entry_is_rejected(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    other = cluster.pre_prepare(1, [cluster.request(2)])
    commits = (*cluster.commits(entry, [0, 1]), cluster.commit(2, other))
    cluster.deliver(
        replica, seal(CommitCertificate(0, entry.raw, commits), cluster.replica_keys[0])
    )
    assert replica.last_executed == 0
    assert replica.drops["bad_certificate"] == 1


def test_checkpoint_state_with_valid_proof_moves_replica_forward(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 5)
    model = cluster.model_ledger(chain[s] for s in range(1, 5))
    snapshot = model.snapshot()
    proof = cluster.checkpoint_proof(4, chain[4].digest, model.digest(), [0, 1, 2])

    actions = cluster.deliver(
        replica, cluster.checkpoint_state(4, chain[4].digest, snapshot, proof)
    )

    assert replica.last_executed == 4
    assert replica.ledger.digest() == model.digest()
    assert replica.ordering.chain_hash == chain[4].digest
    assert replica.statistics().stable_checkpoint == 4
    assert ("checkpoint",) in persisted_keys(actions)
    assert notes(actions, "state_transfer")
    # It carries on from there: seq 5 chains onto the transferred state.
    assert [p.seq for p in broadcasts(cluster.deliver(replica, chain[5].raw), Prepare)] == [5]
    cluster.deliver(replica, cluster.prepare(2, chain[5]), *cluster.commits(chain[5], [0, 2]))
    assert replica.last_executed == 5


def test_checkpoint_state_with_snapshot_not_matching_proven_digest_is_rejected(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 4)
    model = cluster.model_ledger(chain[s] for s in range(1, 5))
    proof = cluster.checkpoint_proof(4, chain[4].digest, model.digest(), [0, 1, 2])
    wrong_snapshot = cluster.genesis_snapshot

    actions = cluster.deliver(
        replica, cluster.checkpoint_state(4, chain[4].digest, wrong_snapshot, proof)
    )

    assert replica.last_executed == 0
    assert replica.ledger.digest() == cluster.genesis_ledger_digest
    assert replica.drops["bad_checkpoint_proof"] == 1
    assert notes(actions, "state_transfer") == []


def test_checkpoint_state_whose_snapshot_is_not_the_proven_state_is_rejected(
    cluster: Cluster,
) -> None:
    """The proof is valid for the digest the message names; the snapshot it carries is not
    that state. Nothing of it may be applied."""
    replica = cluster.replica(3)
    chain = build_chain(cluster, 4)
    model = cluster.model_ledger(chain[s] for s in range(1, 5))
    proof = cluster.checkpoint_proof(4, chain[4].digest, model.digest(), [0, 1, 2])
    message = cluster.checkpoint_state(
        4, chain[4].digest, cluster.genesis_snapshot, proof, ledger_digest=model.digest()
    )
    actions = cluster.deliver(replica, message)
    assert replica.last_executed == 0
    assert replica.ledger.digest() == cluster.genesis_ledger_digest
    assert replica.drops["bad_snapshot"] == 1
    assert notes(actions, "state_transfer") == []


def test_checkpoint_state_naming_another_genesis_is_rejected_before_its_tree_is_built(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few bytes of snapshot can name a ten-million-account generated genesis: refused for
    not being ours, before the digest (which would build that genesis's Merkle tree)."""
    replica = cluster.replica(3)
    chain = build_chain(cluster, 4)
    model = cluster.model_ledger(chain[s] for s in range(1, 5))
    proof = cluster.checkpoint_proof(4, chain[4].digest, model.digest(), [0, 1, 2])
    huge = Ledger(GeneratedAccounts(MAX_GENERATED_ACCOUNTS, 1, "a", [0]), 4096).snapshot()
    message = cluster.checkpoint_state(
        4, chain[4].digest, huge, proof, ledger_digest=model.digest()
    )
    build = pbft.ledger._generated_tree

    def only_ours(genesis: GeneratedAccounts, header: bytes) -> tuple[bytes, ...]:
        assert genesis.count != MAX_GENERATED_ACCOUNTS, "built the tree of another genesis"
        return build(genesis, header)

    monkeypatch.setattr(pbft.ledger, "_generated_tree", only_ours)
    actions = cluster.deliver(replica, message)
    assert replica.last_executed == 0
    assert replica.drops["bad_snapshot"] == 1
    assert notes(actions, "state_transfer") == []


def test_checkpoint_state_with_too_small_proof_is_rejected(cluster: Cluster) -> None:
    replica = cluster.replica(3)
    chain = build_chain(cluster, 4)
    model = cluster.model_ledger(chain[s] for s in range(1, 5))
    proof = cluster.checkpoint_proof(4, chain[4].digest, model.digest(), [0, 1])
    cluster.deliver(replica, cluster.checkpoint_state(4, chain[4].digest, model.snapshot(), proof))
    assert replica.last_executed == 0
    assert replica.drops["bad_checkpoint_proof"] == 1


def test_replica_answers_fetch_with_commit_certificates(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 3)
    execute_through(cluster, replica, chain, 3)

    actions = cluster.deliver(replica, cluster.fetch(3, 2))

    raws = send_raws(actions, ("replica", 3), CommitCertificate)
    assert len(raws) == 2
    checked = cluster.replica(3).verifier
    seqs = []
    for raw in raws:
        certificate = open_envelope(raw, cluster.keyring, cluster.cache, CommitCertificate).message
        assert isinstance(certificate, CommitCertificate) and certificate.replica == 1
        proposal = checked.commit_certificate(certificate.pre_prepare, certificate.commits)
        seqs.append(proposal.seq)
    assert seqs == [2, 3]
    assert send_raws(actions, kind=CheckpointState) == []


def test_fetch_ahead_of_replica_gets_nothing(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    assert cluster.deliver(replica, cluster.fetch(3, 1)) == []


def test_replica_answers_fetch_from_below_stable_checkpoint_with_state_chunk(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 6)
    execute_through(cluster, replica, chain, 4)
    make_stable(cluster, replica, chain, 4)
    execute_through(cluster, replica, chain, 6)

    actions = cluster.deliver(replica, cluster.fetch(3, 1))

    (state,) = sends(actions, ("replica", 3), StateChunk)
    assert (state.replica, state.seq, state.chain_hash) == (1, 4, chain[4].digest)
    # The whole (small) state in one chunk, so the certificates after it are of use.
    assert (state.start, len(state.leaves)) == (0, state.leaf_count)
    certificates = sends(actions, ("replica", 3), CommitCertificate)
    assert len(certificates) == 2
    # The state comes first, then the certificates after it.
    assert isinstance(sends(actions, ("replica", 3))[0], StateChunk)
    # A lagging replica that applies everything ends in the same state.
    lagging = cluster.replica(3)
    cluster.deliver(lagging, *send_raws(actions, ("replica", 3)))
    assert lagging.last_executed == 6
    assert lagging.ledger.digest() == replica.ledger.digest()


def test_fetch_is_limited_by_a_byte_budget_per_requester() -> None:
    cluster = Cluster(catch_up_bytes_per_second=1024, catch_up_burst_bytes=1024)
    replica = cluster.replica(1)
    chain = build_chain(cluster, 1)
    execute_through(cluster, replica, chain, 1)
    cluster.tick(replica, 100)
    sizes = []
    for _ in range(10):  # a FETCH storm within one millisecond
        sizes += map(len, send_raws(cluster.deliver(replica, cluster.fetch(3, 1))))
    served = sum(sizes)
    # Served while the bucket was above zero; the last message went out whole, into debt.
    assert len(sizes) == 2 and served - sizes[-1] < 1024 <= served
    assert replica.drops["catch_up_budget_exceeded"] == 8
    refused = replica.drops["catch_up_budget_exceeded"]
    # Another requester has its own bucket.
    assert len(sends(cluster.deliver(replica, cluster.fetch(2, 1)))) == 1
    # The debt is paid back at 1024 bytes a second, then replica 3 is served again.
    debt = served - 1024
    cluster.tick(replica, 100 + 1000 * debt // 1024 - 1)
    assert sends(cluster.deliver(replica, cluster.fetch(3, 1))) == []
    assert replica.drops["catch_up_budget_exceeded"] == refused + 1
    cluster.tick(replica, 100 + 1000 * debt // 1024 + 2)
    assert len(sends(cluster.deliver(replica, cluster.fetch(3, 1)))) == 1


# --- restart ------------------------------------------------------------------------------


def test_replica_rebuilt_from_persisted_records_has_same_state(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 3)
    records = apply_persists({}, execute_through(cluster, replica, chain, 3))

    restarted = cluster.replica(1, records=records)

    assert restarted.last_executed == 3
    assert restarted.ordering.chain_hash == chain[3].digest
    assert restarted.ledger.digest() == replica.ledger.digest()
    assert restarted.ledger.snapshot() == replica.ledger.snapshot()


def test_replica_rebuilt_after_stable_checkpoint_has_same_state(cluster: Cluster) -> None:
    replica = cluster.replica(2)
    chain = build_chain(cluster, 6)
    actions = execute_through(cluster, replica, chain, 4)
    actions += make_stable(cluster, replica, chain, 4)
    actions += execute_through(cluster, replica, chain, 6)
    records = apply_persists({}, actions)
    # Records below the stable checkpoint were deleted.
    assert not any(key[0] == "committed" and int(key[1]) <= 4 for key in records)

    restarted = cluster.replica(2, records=records)

    assert (restarted.last_executed, restarted.statistics().stable_checkpoint) == (6, 4)
    assert restarted.ledger.digest() == replica.ledger.digest()
    assert restarted.ordering.chain_hash == replica.ordering.chain_hash


def test_restarted_replica_refuses_to_prepare_conflicting_pre_prepare(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    chain = build_chain(cluster, 2)
    actions = execute_through(cluster, replica, chain, 1)
    actions += cluster.deliver(replica, chain[2].raw)  # signs a prepare for seq 2
    assert ("vote", "prepare", 0, 2) in persisted_keys(actions)
    records = apply_persists({}, actions)

    restarted = cluster.replica(1, records=records)
    restarted.handle(Tick(0))
    conflicting = cluster.pre_prepare(2, [cluster.request(99)], prev_hash=chain[1].digest)
    actions = cluster.deliver(restarted, conflicting.raw)

    assert broadcasts(actions, Prepare) == []
    assert restarted.drops["conflicts_with_own_vote"] == 1
    # The pre-prepare it did vote for is still fine: it re-sends the same prepare.
    again = cluster.deliver(restarted, chain[2].raw)
    assert [p.entry_digest for p in broadcasts(again, Prepare)] == [chain[2].digest]


def test_restarted_primary_does_not_reuse_a_proposed_sequence_number(cluster: Cluster) -> None:
    primary = cluster.replica(0)
    actions = cluster.deliver(primary, cluster.request(1))
    records = apply_persists({}, actions)
    restarted = cluster.replica(0, records=records)
    actions = cluster.deliver(restarted, cluster.request(2))
    assert [p.seq for p in broadcasts(actions, PrePrepare)] == [2]
