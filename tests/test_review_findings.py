"""Review findings: tests that demonstrate protocol bugs (they fail until fixed) and a few
regression checks named after the rule they pin down.

The harness cluster has n = 4 (f = 1), checkpoint_interval K = 4 and watermark window W = 8.
"""

from __future__ import annotations

import functools

import pytest
from replica_harness import (
    Chain,
    Cluster,
    Entry,
    Network,
    apply_persists,
    broadcast_raws,
    broadcasts,
    decode,
)

from crypto.keys import Principal
from pbft.client import ClientError, Decided
from pbft.codec import MAX_FRAME_BYTES, pack
from pbft.context import StableCheckpoint
from pbft.events import Event, MessageReceived, Send
from pbft.ledger import Ledger, Payment
from pbft.messages import (
    Commit,
    MessageType,
    Prepare,
    Reply,
    StateChunk,
    Suspect,
    ViewChange,
)
from pbft.receipt import RECEIPT_VERSION, Receipt, ReceiptError, verify_receipt
from pbft.replica import Replica
from pbft.status import ViewStatus
from sim.scenario import parse_scenario
from sim.simulator import Simulation

# --- helpers ----------------------------------------------------------------------------------


def _checkpoint_claim(
    cluster: Cluster, chain: Chain, seq: int, signers: list[int]
) -> tuple[int, bytes, bytes, tuple[bytes, ...]]:
    """(seq, chain hash, ledger digest, proof) of the checkpoint after `chain`'s first `seq`."""
    ledger = cluster.model_ledger([chain[s] for s in range(1, seq + 1)])
    chain_hash = chain[seq].digest
    digest = ledger.digest()
    return seq, chain_hash, digest, cluster.checkpoint_proof(seq, chain_hash, digest, signers)


def _install_view_1_with_anchor_ahead(cluster: Cluster, replica: Replica) -> Chain:
    """View 0 decided seqs 1..4 and checkpoint 4 became stable at replicas 0, 1, 2, while
    `replica` (3) saw none of it. A NEW-VIEW for view 1 whose quorum includes the view change
    of a replica holding checkpoint 4 makes 4 the anchor at `replica`: window_low = 4 while its
    own stable checkpoint stays at 0 (its state transfer has not arrived yet)."""
    chain = cluster.chain()
    for seq in range(1, 5):
        chain.append([cluster.request(seq)])
    anchor = _checkpoint_claim(cluster, chain, 4, [0, 1, 2])
    changes = [
        cluster.view_change(1, 0, checkpoint=anchor),
        cluster.view_change(1, 1),
        cluster.view_change(1, 2),
    ]
    cluster.deliver(replica, cluster.new_view(1, changes, []))
    assert (replica.view, replica.status) == (1, ViewStatus.NORMAL)
    assert replica.stable.seq == 0 and replica.checkpoints.view_anchor is not None
    return chain


def _commits_at(actions: list, seq: int) -> list[Commit]:
    return [commit for commit in broadcasts(actions, Commit) if commit.seq == seq]


# --- finding 1: VIEW-CHANGE drops prepared certificates above stable + W -----------------------


def test_view_change_reports_every_entry_prepared_above_the_anchor() -> None:
    """A replica whose window was moved by a NEW-VIEW anchor (anchor > own stable checkpoint)
    prepares up to anchor + W, but its VIEW-CHANGE cites its own stable checkpoint and keeps only
    certificates in (stable, stable + W]: what it prepared in (stable + W, anchor + W] vanishes."""
    cluster = Cluster()
    replica = cluster.replica(3)
    chain = _install_view_1_with_anchor_ahead(cluster, replica)
    for seq in range(5, 13):
        entry = chain.append([cluster.request(100 + seq)], view=1)
        cluster.drive_prepared(replica, entry)
    assert all(replica.ordering.slots[seq].best_prepared is not None for seq in range(5, 13))

    actions = cluster.deliver(replica, cluster.suspect(1, 0), cluster.suspect(1, 2))

    (view_change,) = [vc for vc in broadcasts(actions, ViewChange) if vc.new_view == 2]
    prepared_seqs = set()
    for certificate in view_change.prepared:
        prepared_seqs.add(replica.verifier.prepared_certificate(certificate).seq)
    # Certificates above the cited checkpoint's window may not appear (verify_view_change
    # rejects them), so the view change must cite a checkpoint that covers them.
    assert prepared_seqs == set(range(5, 13)), (
        f"view change cites checkpoint {view_change.checkpoint_seq} and reports only "
        f"{sorted(prepared_seqs)}; seqs 9..12 were prepared and are lost"
    )


def test_entry_committed_in_view_1_is_not_replaced_in_view_2_when_anchor_ahead() -> None:
    """End to end at one correct replica (3), with replica 0 Byzantine and replica 2 correct
    and in the same state as 3:

    view 1: replicas 1, 2, 3 prepare batch A at seq 9 and send COMMIT for it, so a commit
            certificate exists; replica 1 receives it, executes A and answers the client,
            while the commits to 2 and 3 are late (they are prepared, not committed);
    view 2: NEW-VIEW from {0 (Byzantine, cites checkpoint 4), 2, 3}; 2 and 3 cite checkpoint 0
            and so cannot report seq 9; the recomputed plan stops at 8 and the new primary (2)
            proposes batch B at seq 9; 0, 2, 3 prepare and commit B.

    Two commit certificates for different batches at seq 9, each signed by 2f + 1 replicas of
    which only one is Byzantine: correct replicas execute different batches at seq 9."""
    cluster = Cluster()
    replica = cluster.replica(3)
    chain = _install_view_1_with_anchor_ahead(cluster, replica)
    all_actions: list = []
    view_1: dict[int, Entry] = {}
    for seq in range(5, 10):
        entry = chain.append([cluster.request(100 + seq)], view=1)
        view_1[seq] = entry
        all_actions += cluster.drive_prepared(replica, entry)
        if seq < 9:
            all_actions += cluster.deliver(replica, *cluster.commits(entry, [1, 2]))
    (commit_a,) = _commits_at(all_actions, 9)
    assert commit_a.view == 1 and commit_a.entry_digest == view_1[9].digest

    actions = cluster.deliver(replica, cluster.suspect(1, 0), cluster.suspect(1, 2))
    own_change = broadcast_raws(actions, ViewChange)
    assert len(own_change) == 1
    # Replica 2 is in the same state as 3 and sends the same kind of view change: checkpoint 0,
    # certificates for 5..8 only (9 is above 0 + W).
    certificates = [cluster.prepared_certificate(view_1[seq], [0, 3]) for seq in range(5, 9)]
    anchor = _checkpoint_claim(cluster, chain, 4, [0, 1, 2])
    changes = [
        cluster.view_change(2, 0, checkpoint=anchor),
        cluster.view_change(2, 2, certificates),
        own_change[0],
    ]
    # The new primary's re-proposals for 5..8 (the recomputed plan) in view 2.
    view_2: dict[int, Entry] = {}
    previous = chain[4].digest
    for seq in range(5, 9):
        entry = cluster.pre_prepare(seq, view_1[seq].requests, view=2, prev_hash=previous)
        view_2[seq] = entry
        previous = entry.digest
    # Its own view change cites the anchor and reports A at seq 9, so the recomputed plan
    # re-proposes A at 9: a NEW-VIEW that stops at 8 (leaving 9 to a batch of the new
    # primary's choice) differs from the recomputation and is refused.
    own = decode(own_change[0])
    assert isinstance(own, ViewChange)
    assert own.checkpoint_seq == 4
    reported = {decode(certificate.pre_prepare).seq for certificate in own.prepared}
    assert 9 in reported
    cluster.deliver(replica, cluster.new_view(2, changes, [view_2[s].raw for s in range(5, 9)]))
    assert (replica.view, replica.status) == (2, ViewStatus.VIEW_CHANGE)
    assert replica.drops["bad_new_view"] == 1
    # Whatever comes next, replica 3 never signs a COMMIT for another batch at seq 9.
    batch_b = cluster.pre_prepare(9, [cluster.request(999)], view=2, prev_hash=previous)
    actions = cluster.deliver(replica, batch_b.raw, cluster.prepare(0, batch_b))
    actions += cluster.deliver(replica, *cluster.commits(batch_b, [0, 2]))
    assert all(commit.entry_digest == view_1[9].digest for commit in _commits_at(actions, 9))


# --- finding: CHECKPOINT messages are sent once and never again --------------------------------

_CHECKPOINT_LOSS_SCENARIO = """
name = "checkpoint-loss"
seed = 3
[cluster]
replicas = 4
batch_size = 4
checkpoint_interval = 4
view_change_timeout_ms = 200
[network]
latency_ms = { min = 1, max = 5 }
[workload]
payments = 300
rate_per_s = 100
[expect]
safety = true
liveness = true
"""


class _LoseCheckpointsForASecond(Simulation):
    """Every CHECKPOINT between replicas sent in [0.5 s, 1.5 s) is lost; nothing else is, and
    after 1.5 s the network is perfect again. All four replicas are correct."""

    def _transmit(self, source: Principal, destination: Principal, data: bytes) -> None:
        if (
            source[0] == destination[0] == "replica"
            and len(data) > 2
            and data[2] == MessageType.CHECKPOINT
            and 500_000 <= self.now_us < 1_500_000
        ):
            return
        super()._transmit(source, destination, data)


def test_cluster_recovers_from_lost_checkpoint_messages_once_the_network_heals() -> None:
    """Regression check for checkpoint retransmission. At commit 130db56 checkpoints were
    broadcast once, at execution, and never again; nothing else makes a checkpoint stable when
    all replicas sit at the same stable checkpoint (FETCH only serves an already stable one), so
    after two lost checkpoints the primary reached stable + W and stopped for good (stable 36,
    everyone at 44, 235 of 300 payments undecided). Fixed by 2b6897d (own checkpoint votes
    are retransmitted until stable)."""
    scenario = parse_scenario(_CHECKPOINT_LOSS_SCENARIO)
    result = _LoseCheckpointsForASecond(scenario).run()
    assert result.checks["liveness"].ok, (
        f"{result.undecided} of {result.submitted} payments undecided; "
        f"{result.checks['liveness'].details[:2]}"
    )


# --- finding: catch-up served on the word of an unverified message -----------------------------


def test_forged_stale_vote_does_not_make_a_replica_serve_catch_up() -> None:
    """`_on_bytes` checks staleness before the signature and calls `_help_laggard` with the
    unverified message: a PREPARE for an old seq with a garbage signature, naming any replica,
    makes this replica sign and send that replica up to fetch_batch_limit commit certificates
    (and its stable checkpoint's whole ledger), and uses up that replica's fetch rate limit."""
    cluster = Cluster()
    replica = cluster.replica(2)
    chain = cluster.chain()
    for seq in range(1, 4):
        cluster.drive_commit(replica, chain.append([cluster.request(seq)]))
    assert replica.last_executed == 3
    cluster.tick(replica, 10_000)

    # Signed with replica 0's key but naming replica 1: the signature is invalid.
    forged = cluster.prepare_vote(0, 1, 1, chain[1].digest, key=cluster.replica_keys[0])
    actions = cluster.deliver(replica, forged)

    served = [a for a in actions if isinstance(a, Send) and a.to == ("replica", 1)]
    assert served == [], f"{len(served)} messages signed and sent on a forged vote"


def test_forged_stale_vote_does_not_use_up_a_replicas_fetch_budget() -> None:
    """The same unverified path stamps fetch_served_ms for the replica the forged vote names:
    that replica's genuine FETCH right after is refused as fetch_rate_limited. Forged votes
    naming a high stale seq, repeated every retransmit_interval / 2, starve it of the
    certificates below that seq."""
    cluster = Cluster()
    replica = cluster.replica(2)
    chain = cluster.chain()
    for seq in range(1, 4):
        cluster.drive_commit(replica, chain.append([cluster.request(seq)]))
    cluster.tick(replica, 10_000)
    forged = cluster.prepare_vote(0, 3, 1, chain[3].digest, key=cluster.replica_keys[0])
    cluster.deliver(replica, forged)

    actions = cluster.deliver(replica, cluster.fetch(1, 1))
    served = [a for a in actions if isinstance(a, Send) and a.to == ("replica", 1)]
    assert replica.drops.get("fetch_rate_limited", 0) == 0 and len(served) == 3


# --- finding: a receipt that says "rejected" for a payment that took effect --------------------


def test_client_never_runs_dedup_window_requests_ahead_of_an_unanswered_one() -> None:
    """The replicas remember a client's last dedup_window decisions. A client that kept
    submitting while an old request stayed unanswered could make them forget it before it
    learns the outcome; the client core refuses instead."""
    cluster = Cluster(dedup_window=2)
    network = Network(cluster, client_ids=(0,))
    client = network.clients[0]
    client.submit(1, "alice", "carol", 10)
    client.submit(2, "alice", "carol", 10)
    with pytest.raises(ClientError):
        client.submit(3, "alice", "carol", 10)


def test_receipt_never_says_rejected_for_a_payment_that_was_confirmed() -> None:
    """If the cluster has forgotten a request anyway (here: a second client instance with the
    same key ran ahead, as after a client restart), a retransmission is answered (rejected,
    request_expired). That must never become a receipt saying the payment was rejected, since
    every replica confirmed it and moved the money: the client reports the outcome as unknown,
    and verify_receipt refuses a receipt built from such replies."""
    cluster = Cluster(dedup_window=2)
    network = Network(cluster, client_ids=(0,))
    waiting = network.clients.pop(0)  # its replies are lost for a while
    for action in waiting.submit(1, "alice", "carol", 10):
        assert isinstance(action, Send)
        network.queue.append((None, action.to, action.data))
    network.run()
    network.clients[0] = cluster.client(0)  # another instance of client 0 runs ahead
    for request_id in (2, 3):
        network.submit(0, request_id, "alice", "carol", 10)
    network.run()
    assert {replica.ledger.balance("alice") for replica in network.replicas.values()} == {970}
    request_raw = waiting.outstanding[1].raw
    seen: list[bytes] = []
    handle = waiting.handle

    def recording(event: Event) -> list[Send | Decided]:
        if isinstance(event, MessageReceived):
            seen.append(event.data)
        return handle(event)

    waiting.handle = recording  # type: ignore[method-assign]
    network.clients[0] = waiting  # the network heals; the waiting client retransmits
    network.advance(3_000)

    decided = {d.request_id: d for d in network.decided if d.request_id == 1}
    assert 1 in decided
    assert (decided[1].outcome, decided[1].reason, decided[1].receipt) == (
        "unknown",
        "request_expired",
        None,
    )
    replies = []
    for raw in seen:
        reply = decode(raw)
        if isinstance(reply, Reply) and reply.request_id == 1:
            assert reply.reason == "request_expired"
            replies.append(raw)
    assert len(replies) >= cluster.f + 1
    forged_receipt = Receipt(
        RECEIPT_VERSION, cluster.cluster_id, request_raw, tuple(replies[: cluster.f + 1])
    )
    with pytest.raises(ReceiptError, match="request expired"):
        verify_receipt(forged_receipt, cluster.keyring, cluster.cluster_id)


# --- finding: a ledger snapshot larger than one frame -------------------------------------------


@functools.cache
def _large_checkpoint() -> tuple[Cluster, Ledger, bytes, tuple[bytes, ...]]:
    """A stable checkpoint at seq 4 whose ledger holds 100 clients x a full dedup window of
    decisions (reachable by 409,600 payments): a ~20 MB snapshot, in a cluster of 100 client
    keys (restore refuses a snapshot with more clients than keys)."""
    cluster = Cluster(clients=100)
    ledger = cluster.genesis_ledger()
    body = b"\x01" * 32
    for client in range(100):
        for request_id in range(cluster.config.dedup_window):
            ledger.execute(Payment(client, request_id, "alice", "bob", 1), body, 4)
    chain_hash = b"\x02" * 32
    proof = cluster.checkpoint_proof(4, chain_hash, ledger.digest(), [0, 1, 2])
    return cluster, ledger, chain_hash, proof


def test_replica_restarts_from_a_large_persisted_checkpoint() -> None:
    """Ledger snapshots may be up to 256 MiB (MAX_SNAPSHOT_SIZE_BYTES), but `_recover_records`
    reads the ("checkpoint",) record with codec.unpack, which refuses anything above one frame
    (16 MiB): a replica whose stable checkpoint grew past that cannot restart from its own
    storage (ReplicaInvariantError "unreadable storage")."""
    cluster, ledger, chain_hash, proof = _large_checkpoint()
    snapshot = ledger.snapshot()
    assert len(snapshot) > MAX_FRAME_BYTES
    record = pack([4, chain_hash, ledger.digest(), snapshot, list(proof)])
    replica = cluster.replica(0, records={("checkpoint",): record})
    assert replica.stable.seq == 4


def test_serving_a_large_stable_checkpoint_does_not_crash_the_replica() -> None:
    """The same large checkpoint, reached by execution (installed directly here to keep the test
    fast): any FETCH, or a stale vote via _help_laggard (unverified, see above), makes the
    replica build a CHECKPOINT_STATE whose ledger_snapshot field is longer than a frame; the
    field check raises DecodeError out of handle(), which is not caught: the replica crashes."""
    cluster, ledger, chain_hash, proof = _large_checkpoint()
    replica = cluster.replica(0)
    snapshot = ledger.snapshot()
    replica.ordering.ledger = ledger
    replica.ordering.last_executed = 4
    replica.ordering.chain_hash = chain_hash
    replica.checkpoints.stable = StableCheckpoint(4, chain_hash, ledger.digest(), snapshot, proof)

    actions = cluster.deliver(replica, cluster.fetch(1, 1, 0))  # raised DecodeError (oversize)
    # Now it goes in chunks: the first one, well within a frame.
    (chunk,) = [decode(a.data) for a in actions if isinstance(a, Send)]
    assert isinstance(chunk, StateChunk) and (chunk.start, chunk.seq) == (0, 4)
    assert 0 < len(chunk.leaves) < chunk.leaf_count and replica.drops == {}


# --- regression checks (pass today) -------------------------------------------------------------


def test_chain_rule_successor_accepted_early_is_never_prepared_on_another_predecessor() -> None:
    """Suspicion (1): a backup accepts seq 2 naming predecessor P while seq 1 is unknown; seq 1
    then arrives with another digest and becomes prepared and committed. Seq 2 must stay
    unprepared (its predecessor is settled with a digest other than the one it names)."""
    cluster = Cluster()
    replica = cluster.replica(2)
    phantom = cluster.pre_prepare(1, [cluster.request(7)])
    stray = cluster.pre_prepare(2, [cluster.request(2)], prev_hash=phantom.digest)
    real = cluster.pre_prepare(1, [cluster.request(1)])
    assert real.digest != phantom.digest
    actions = cluster.deliver(replica, stray.raw)
    actions += cluster.drive_commit(replica, real)
    actions += cluster.deliver(replica, *cluster.prepares(stray, [1, 3]))
    actions += cluster.deliver(replica, cluster.commit_certificate(real, sender=1))
    assert replica.last_executed == 1
    prepared = [(p.seq, p.entry_digest) for p in broadcasts(actions, Prepare)]
    assert prepared == [(1, real.digest)]
    assert (
        not replica.ordering.slots[2].prepared_in_view
        and replica.ordering.slots[2].committed is None
    )


def test_new_view_reproposals_at_or_below_own_stable_checkpoint_are_skipped() -> None:
    """Suspicion (2), NEW-VIEW checkpoint below our stable one: re-proposals <= our stable
    checkpoint are dropped, the first one above it chains onto our stable chain hash."""
    cluster = Cluster()
    replica = cluster.replica(3)
    chain = cluster.chain()
    for seq in range(1, 7):
        chain.append([cluster.request(seq)])
    for seq in range(1, 5):
        cluster.drive_commit(replica, chain[seq])
    _, chain_hash, digest, _ = _checkpoint_claim(cluster, chain, 4, [0, 1, 2])
    cluster.deliver(replica, *(cluster.checkpoint(4, i, chain_hash, digest) for i in (0, 1)))
    assert replica.stable.seq == 4
    certificates = [cluster.prepared_certificate(chain[seq]) for seq in range(1, 7)]
    changes = [cluster.view_change(1, i, certificates) for i in (0, 1, 2)]
    reproposals = [
        cluster.pre_prepare(seq, chain[seq].requests, view=1, prev_hash=chain[seq].prev_hash)
        for seq in range(1, 7)
    ]
    actions = cluster.deliver(replica, cluster.new_view(1, changes, [e.raw for e in reproposals]))
    assert (replica.view, replica.status, replica.halted) == (1, ViewStatus.NORMAL, None)
    assert sorted(replica.ordering.slots) == [5, 6]
    assert [(p.view, p.seq) for p in broadcasts(actions, Prepare)] == [(1, 5)]
    actions = cluster.deliver(replica, cluster.prepare(0, reproposals[4]))
    assert [(p.view, p.seq) for p in broadcasts(actions, Prepare)] == [(1, 6)]


# --- finding: a primary that censors one request is never suspected -----------------------------


def test_backup_suspects_a_primary_that_never_proposes_a_pending_request() -> None:
    """The progress timer is per replica, not per request: `_execute` clears
    progress_deadline_ms after ANY batch. A Byzantine primary that keeps ordering other
    payments (one batch per 100 ms, timeout 300 ms) but never proposes client 1's payment is
    never suspected, although every backup holds that payment (the client sent it to all of
    them): the payment is censored forever. PBFT's timer waits for a specific request."""
    cluster = Cluster()
    replica = cluster.replica(2)
    cluster.tick(replica, 0)
    censored = cluster.request(1, client=1)
    cluster.deliver(replica, censored)
    assert (1, 1) in replica.requests.pending
    chain = cluster.chain()
    suspected = []
    for step in range(1, 61):  # 3 s = 10 timeouts
        now = 50 * step
        suspected += broadcasts(cluster.tick(replica, now), Suspect)
        if step % 2 == 0:
            entry = chain.append([cluster.request(step)])  # client 0's payments only
            cluster.drive_commit(replica, entry)
            cluster.deliver(replica, cluster.heartbeat(0, last_executed=entry.seq))
            if entry.seq % cluster.config.checkpoint_interval == 0:
                state = (replica.ordering.chain_hash, replica.ledger.digest())
                cluster.deliver(
                    replica, *(cluster.checkpoint(entry.seq, i, *state) for i in (0, 1))
                )
    assert replica.last_executed == 30 and (1, 1) in replica.requests.pending
    assert suspected, "client 1's payment waited 3 s (10 timeouts) and nobody suspected"


# --- finding: a replica behind the NEW-VIEW anchor can only be rescued by a stable copy of it --


def test_replica_behind_the_anchor_catches_up_from_commit_certificates() -> None:
    """Replica 3 installs a NEW-VIEW anchored at checkpoint 4 while it has executed nothing.
    A peer that executed 1..4 (but, having lost CHECKPOINT messages, holds 4 unstable) sends the
    commit certificates for 1..4: `_on_commit_certificate` refuses them as below_window (the
    window starts at the anchor), so only a CHECKPOINT_STATE for >= 4 can help replica 3."""
    cluster = Cluster()
    replica = cluster.replica(3)
    chain = _install_view_1_with_anchor_ahead(cluster, replica)
    certificates = [cluster.commit_certificate(chain[seq], sender=1) for seq in range(1, 5)]
    cluster.deliver(replica, *certificates)
    assert replica.last_executed == 4, f"dropped: {dict(replica.drops)}"


def test_new_view_checkpoint_proof_makes_own_matching_snapshot_stable() -> None:
    """Replica 2 executed 1..4 itself but lost the CHECKPOINT messages for 4. The NEW-VIEW it
    installs carries a 2f + 1 proof for checkpoint 4 (plan.checkpoint_proof, unused), which
    matches replica 2's own snapshot; it keeps 4 unstable, so it cannot serve 4 by state
    transfer to a replica behind the anchor. With f Byzantine replicas withholding their copy,
    no correct replica may ever hold 4 stable: replica 3 (above) is stuck below the anchor,
    and no later checkpoint can become stable without it."""
    cluster = Cluster()
    replica = cluster.replica(2)
    chain = cluster.chain()
    for seq in range(1, 5):
        cluster.drive_commit(replica, chain.append([cluster.request(seq)]))
    assert (replica.last_executed, replica.stable.seq) == (4, 0)
    anchor = _checkpoint_claim(cluster, chain, 4, [0, 1, 3])
    changes = [
        cluster.view_change(1, 0, checkpoint=anchor),
        cluster.view_change(1, 1),
        cluster.view_change(1, 3),
    ]
    cluster.deliver(replica, cluster.new_view(1, changes, []))
    assert replica.view == 1 and replica.status is ViewStatus.NORMAL
    actions = cluster.tick(replica, 10_000)
    actions += cluster.deliver(replica, cluster.fetch(3, 1, 0))
    states = [a for a in actions if isinstance(a, Send) and isinstance(decode(a.data), StateChunk)]
    assert replica.stable.seq == 4 and states, "checkpoint 4 stays unstable; nothing to serve"


# --- finding: the NEW-VIEW anchor is not persisted ----------------------------------------------


def test_restarted_replica_keeps_the_new_view_anchor() -> None:
    """`view_anchor` lives only in memory. Replica 3 installs a NEW-VIEW anchored at
    checkpoint 4 (its own stable checkpoint is 0), persists the view, crashes and restarts
    from its records: the anchor is gone, so it can neither settle the chain rule for seq 5
    (the predecessor, the anchor's chain hash, is unknown) nor accept seqs above 0 + W; a
    restarted primary likewise proposes at stable + 1 <= anchor, which every backup refuses."""
    cluster = Cluster()
    replica = cluster.replica(3)
    chain = cluster.chain()
    for seq in range(1, 5):
        chain.append([cluster.request(seq)])
    anchor = _checkpoint_claim(cluster, chain, 4, [0, 1, 2])
    changes = [
        cluster.view_change(1, 0, checkpoint=anchor),
        cluster.view_change(1, 1),
        cluster.view_change(1, 2),
    ]
    records = apply_persists({}, cluster.deliver(replica, cluster.new_view(1, changes, [])))
    assert replica.checkpoints.view_anchor is not None

    restarted = cluster.replica(3, records=records)
    assert (restarted.view, restarted.status) == (1, ViewStatus.NORMAL)
    entry = chain.append([cluster.request(5)], view=1)
    # Control: the replica that did not restart prepares seq 5 at once.
    assert [p.seq for p in broadcasts(cluster.deliver(replica, entry.raw), Prepare)] == [5]
    actions = cluster.deliver(restarted, entry.raw)
    assert [p.seq for p in broadcasts(actions, Prepare)] == [5], (
        "after the restart replica 3 no longer knows the anchor and does not prepare seq 5"
    )
