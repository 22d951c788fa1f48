"""Catch-up: learning we are behind, FETCH, commit certificates and state transfer.

A replica that sees the others ahead (f + 1 heartbeat claims, f + 1 commits, checkpoints,
votes above its window) FETCHes commit certificates, or a stable checkpoint's state with
its proof, verifies them and applies them. The state comes in chunks, each proven against
the checkpoint's ledger digest (pbft/statetransfer.py). What a replica sends to each
catching-up peer, asked for or not, is paid from that peer's byte budget.
"""

from __future__ import annotations

from pbft.budget import TokenBuckets
from pbft.codec import MAX_FRAME_BYTES, DecodeError
from pbft.context import Context, StableCheckpoint
from pbft.drops import DropReason
from pbft.events import NoteKind
from pbft.ledger import Ledger, LedgerSnapshotError
from pbft.log import CommittedEntry
from pbft.messages import (
    CheckpointState,
    Commit,
    CommitCertificate,
    Fetch,
    Message,
    Prepare,
    PrePrepare,
    StateChunk,
    StateRequest,
)
from pbft.quorum import vouched_by
from pbft.signed import Envelope, Opened, Rejected, seal, verify_signature
from pbft.statetransfer import (
    OFFER_BYTES,
    ChunkRejected,
    ChunkServer,
    IncomingTransfer,
    StateTooLarge,
)
from pbft.status import ViewStatus
from pbft.timeout import Timeout

# Unsolicited help to a replica stuck on an executed entry: one certificate, enough to
# show it is behind (it then FETCHes, on its byte budget); see help_laggard.
HELP_CERTIFICATE_LIMIT = 1
# A state transfer that got no chunk for this many retransmit intervals asks another replica.
STATE_TRANSFER_TIMEOUT_INTERVALS = 25


class CatchUp:
    """How far the cluster got, fetching, serving laggards, and state transfer."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        config = ctx.config
        self.highest_seen_executed = 0
        # How far each replica's heartbeats said it executed. One voice proves nothing (a
        # Byzantine replica may claim anything), so only the (f + 1)-th highest counts.
        self.heartbeat_claims: dict[int, int] = {}
        self.fetch_rotation = 0
        # Rate limit: one FETCH per retransmit interval.
        self.fetch_timeout = Timeout("fetch", config.retransmit_interval_ms)
        self.help_served_ms: dict[int, int] = {}
        # Every byte of catch-up service (asked for or not) is paid from the requester's bucket.
        self.catch_up_budget = TokenBuckets(
            config.catch_up_bytes_per_second, config.catch_up_burst_bytes
        )
        self.chunk_server = ChunkServer(config.state_chunk_leaves, config.state_chunk_bytes)
        self.incoming: IncomingTransfer | None = None

    def saw_executed(self, seq: int) -> None:
        """Evidence that the cluster executed at least up to `seq`."""
        self.highest_seen_executed = max(self.highest_seen_executed, seq)

    def help_behind_primary(self, primary: int, last_executed: int) -> None:
        """The primary's heartbeat says it is behind us: send it what it lacks, at most once
        an interval, on the help budget."""
        helped = self.help_served_ms.get(primary)
        if helped is None or self.ctx.now_ms - helped >= self.ctx.config.retransmit_interval_ms:
            self.help_served_ms[primary] = self.ctx.now_ms
            self.serve_catch_up(primary, last_executed + 1, last_executed)

    def claim_executed(self, replica: int, last_executed: int) -> None:
        if last_executed <= self.heartbeat_claims.get(replica, -1):
            return
        self.heartbeat_claims[replica] = last_executed
        vouched = vouched_by(self.heartbeat_claims.values(), self.ctx.config.weak_quorum)
        if vouched is not None:
            self.saw_executed(vouched)

    def maybe_fetch(self) -> None:
        if self._resume_transfer():
            return
        interval = self.ctx.config.retransmit_interval_ms
        behind_execution = (
            self.highest_seen_executed > self.ctx.ordering.last_executed
            and self.ctx.now_ms - self.ctx.ordering.last_execution_ms >= interval
        )
        # Executed far enough but never saw 2f + 1 checkpoints: the window cannot move.
        behind_stability = (
            self.highest_seen_executed
            >= self.ctx.checkpoints.stable.seq + self.ctx.config.watermark_window
        )
        if not (behind_execution or behind_stability):
            return
        if not self.fetch_timeout.quiet(self.ctx.now_ms):
            return
        self.fetch()

    def fetch(self) -> None:
        peers = [replica for replica in self.ctx.config.replica_ids() if replica != self.ctx.id]
        target = peers[self.fetch_rotation % len(peers)]
        self.fetch_rotation += 1
        self._send_fetch(target)

    def fetch_from(self, target: int) -> None:
        """A FETCH to one peer that hinted we are behind, on the usual fetch interval."""
        if not self.fetch_timeout.quiet(self.ctx.now_ms):
            return
        self._send_fetch(target)

    def _send_fetch(self, target: int) -> None:
        self.fetch_timeout.start(self.ctx.now_ms)
        fetch = Fetch(
            self.ctx.id,
            self.ctx.ordering.last_executed + 1,
            self.ctx.checkpoints.stable.seq,
            self.ctx.view,
        )
        self.ctx.send(("replica", target), seal(fetch, self.ctx.key))

    def help_laggard(self, envelope: Envelope, message: Message) -> None:
        """A peer voting, in the view we are in, on an entry we executed a while ago is
        stuck there: send it, as if it had asked, what gets it moving, and no more.

        Unsolicited help is small, since whoever replays a replica's old vote makes us
        answer that replica: one commit certificate (the voted seq's), or, when the seq is
        at or below our stable checkpoint (it lacks that state), one signed CHECKPOINT as
        the hint to ask for it. Either makes it FETCH, and what a FETCH is answered with is
        paid from its byte budget. A vote of another view is no sign of being stuck in
        ours (a replica in an older view catches up through the NEW-VIEW), and a vote that
        is merely late (the entry committed moments ago) needs nothing."""
        if not isinstance(message, PrePrepare | Prepare | Commit):
            return
        if message.view != self.ctx.view or self.ctx.status is ViewStatus.VIEW_CHANGE:
            return  # (counted as stale by the caller)
        interval = self.ctx.config.retransmit_interval_ms
        slot = self.ctx.ordering.slots.get(message.seq)
        if slot is not None and self.ctx.now_ms - slot.last_progress_ms < interval:
            return
        # Unsolicited help has its own budget, so it never eats into answers to FETCH.
        helped = self.help_served_ms.get(message.replica)
        if helped is not None and self.ctx.now_ms - helped < interval:
            return
        # Only now is the vote worth a signature check: a forged one must cost us nothing.
        verify_signature(envelope, message, self.ctx.verifier.keyring, self.ctx.verifier.cache)
        self.help_served_ms[message.replica] = self.ctx.now_ms
        requester = message.replica
        if message.seq <= self.ctx.checkpoints.stable.seq:
            hint = self.ctx.checkpoints.stable_checkpoint_vote()
            if hint is not None and self._catch_up_allowed(requester):
                self._send_catch_up(requester, hint)
            return
        self._send_certificates(requester, message.seq, HELP_CERTIFICATE_LIMIT)

    def on_fetch(self, fetch: Fetch, opened: Opened) -> None:
        self.serve_catch_up(fetch.replica, fetch.from_seq, fetch.stable_seq)
        if (
            fetch.view < self.ctx.view
            and self.ctx.status is ViewStatus.NORMAL
            and self.ctx.viewchanges.new_view_message is not None
        ):
            # It missed the view we are in: the NEW-VIEW proves itself, it can install it.
            # Paid from the same byte budget as the rest of what catching up costs us.
            if self._catch_up_allowed(fetch.replica):
                self._send_catch_up(fetch.replica, self.ctx.viewchanges.new_view_message)

    def _catch_up_allowed(self, requester: int) -> bool:
        """Whether `requester` has byte budget left; checked before we build (and sign)
        anything for it, so a peer past its budget costs us nothing but this."""
        if self.catch_up_budget.may_spend(requester, self.ctx.now_ms):
            return True
        self.ctx.drop(DropReason.CATCH_UP_BUDGET_EXCEEDED, f"replica {requester}")
        return False

    def _send_catch_up(self, requester: int, raw: bytes) -> None:
        self.catch_up_budget.spend(requester, len(raw), self.ctx.now_ms)
        self.ctx.send(("replica", requester), raw)

    def serve_catch_up(self, requester: int, from_seq: int, stable_seq: int) -> None:
        """Send `requester` what it needs from `from_seq` on: the first chunk of our stable
        checkpoint if it lacks that state, else commit certificates; within its byte budget,
        as a peer that keeps asking must not make us stream without end."""
        if requester == self.ctx.id or requester not in self.ctx.config.replica_ids():
            return
        if self.ctx.checkpoints.stable.seq > 0 and (
            from_seq <= self.ctx.checkpoints.stable.seq
            or stable_seq < self.ctx.checkpoints.stable.seq
        ):
            # Certificates above the checkpoint are of no use to it until the state is in.
            if not self._send_state_chunk(requester, 0, OFFER_BYTES):
                return
        self._send_certificates(requester, from_seq, self.ctx.config.fetch_batch_limit)

    def _send_certificates(self, requester: int, from_seq: int, limit: int) -> None:
        """At most `limit` commit certificates from `from_seq` on, within the byte budget."""
        budget = limit
        for seq in range(
            max(from_seq, self.ctx.checkpoints.stable.seq + 1), self.ctx.ordering.last_executed + 1
        ):
            if budget == 0:
                break
            slot = self.ctx.ordering.slots.get(seq)
            if slot is None or slot.committed is None:
                continue
            if not self._catch_up_allowed(requester):
                return
            certificate = CommitCertificate(
                self.ctx.id, slot.committed.proposal.raw, slot.committed.commits
            )
            self._send_catch_up(requester, seal(certificate, self.ctx.key))
            budget -= 1

    def _send_state_chunk(self, requester: int, start: int, byte_limit: int = 0) -> bool:
        """Send the chunk of our stable checkpoint from leaf `start`; True if that was the
        rest of the state (so what follows the checkpoint is of use to the requester)."""
        if not self._catch_up_allowed(requester):
            return False
        stable = self.ctx.checkpoints.stable
        try:
            data = self.chunk_server.chunk(
                stable.seq, stable.snapshot, start, MAX_FRAME_BYTES, byte_limit
            )
            if data is None:
                raise Rejected(DropReason.BAD_STATE_REQUEST, f"no leaf {start}")
            raw = seal(
                StateChunk(
                    self.ctx.id,
                    stable.seq,
                    stable.chain_hash,
                    stable.ledger_digest,
                    stable.proof,
                    data.leaf_count,
                    data.start,
                    data.level,
                    data.leaves,
                    data.path,
                ),
                self.ctx.key,
            )
            if len(raw) > MAX_FRAME_BYTES:
                raise StateTooLarge(f"chunk at leaf {start} is {len(raw)} bytes")
        except (StateTooLarge, DecodeError) as error:
            # One ledger leaf (a client's dedup table) larger than a frame.
            self.ctx.count_drop(DropReason.STATE_TOO_LARGE_TO_SEND)
            self.ctx.note(NoteKind.STATE_TOO_LARGE, f"checkpoint {stable.seq}: {error}")
            return False
        self._send_catch_up(requester, raw)
        return data.start + len(data.leaves) == data.leaf_count

    def on_state_request(self, request: StateRequest, opened: Opened) -> None:
        if (
            request.replica == self.ctx.id
            or self.ctx.checkpoints.stable.seq == 0
            or request.seq > self.ctx.checkpoints.stable.seq
        ):
            raise Rejected(DropReason.STATE_REQUEST_AHEAD, f"checkpoint {request.seq}")
        # Asked for an older checkpoint than ours: we no longer hold it, start it on ours.
        start = request.start if request.seq == self.ctx.checkpoints.stable.seq else 0
        self._send_state_chunk(request.replica, start)

    def on_state_chunk(self, chunk: StateChunk, opened: Opened) -> None:
        if chunk.seq <= self.ctx.checkpoints.stable.seq:
            return
        incoming = self.incoming
        known = incoming is not None and incoming.same_checkpoint(chunk)
        if not known:
            if incoming is not None and chunk.seq <= incoming.seq:
                raise Rejected(DropReason.STATE_CHUNK_UNEXPECTED, f"checkpoint {chunk.seq}")
            # The proof first (a few signatures), the leaves only if the proof holds.
            self.ctx.verifier.checkpoint_proof(
                chunk.seq, chunk.chain_hash, chunk.ledger_digest, chunk.proof
            )
        if chunk.seq <= self.ctx.ordering.last_executed:
            self.incoming = None
            self.ctx.checkpoints.adopt_checkpoint_proof(
                chunk.seq, chunk.chain_hash, chunk.ledger_digest, chunk.proof
            )
            return
        if incoming is None or not known:
            if chunk.start != 0:
                raise Rejected(DropReason.STATE_CHUNK_UNEXPECTED, f"leaf {chunk.start} first")
            incoming = self.incoming = IncomingTransfer(
                chunk.seq,
                chunk.chain_hash,
                chunk.ledger_digest,
                chunk.proof,
                source=chunk.replica,
                last_progress_ms=self.ctx.now_ms,
            )
        try:
            ledger = incoming.add(chunk, self.ctx.now_ms)
        except ChunkRejected as rejection:
            if rejection.reason != "state_chunk_unexpected":
                # Someone lied: go on (or start over) with a replica not shown to lie.
                self._request_state(incoming, incoming.next_source(self._peers()))
            raise Rejected(rejection.reason, rejection.detail) from None
        if ledger is None:
            self._request_state(incoming, chunk.replica)
            return
        self.incoming = None
        self._install_state(
            chunk.seq,
            chunk.chain_hash,
            chunk.ledger_digest,
            ledger,
            ledger.snapshot(),
            chunk.proof,
            chunk.replica,
        )

    def _peers(self) -> list[int]:
        return [replica for replica in self.ctx.config.replica_ids() if replica != self.ctx.id]

    def _request_state(self, incoming: IncomingTransfer, target: int) -> None:
        incoming.source = target
        request = StateRequest(self.ctx.id, incoming.seq, incoming.next_leaf)
        self.ctx.send(("replica", target), seal(request, self.ctx.key))

    def _resume_transfer(self) -> bool:
        """True while a state transfer is under way: FETCH then waits (a replica asked for a
        chunk of a checkpoint it has moved past answers with its newer one). One that
        stalled (a lost chunk, a slow or silent replica) asks the next replica for the same
        leaf, waiting twice as long each time in a row, so a loaded cluster is not made
        to answer the same request over and over."""
        incoming = self.incoming
        if incoming is None:
            return False
        doublings = min(incoming.stalls, self.ctx.config.max_timeout_doublings)
        timeout = STATE_TRANSFER_TIMEOUT_INTERVALS * self.ctx.config.retransmit_interval_ms
        if self.ctx.now_ms - incoming.last_progress_ms < timeout * 2**doublings:
            return True
        incoming.stalls += 1
        incoming.last_progress_ms = self.ctx.now_ms
        self._request_state(incoming, incoming.next_source(self._peers()))
        return True

    def on_checkpoint_state(self, state: CheckpointState, opened: Opened) -> None:
        if state.seq <= self.ctx.checkpoints.stable.seq:
            return
        # The proof first (a few signatures), the snapshot only if the proof holds.
        ledger_digest = state.ledger_digest
        self.ctx.verifier.checkpoint_proof(state.seq, state.chain_hash, ledger_digest, state.proof)
        if state.seq <= self.ctx.ordering.last_executed:
            self.ctx.checkpoints.adopt_checkpoint_proof(
                state.seq, state.chain_hash, ledger_digest, state.proof
            )
            return
        try:
            ledger = Ledger.restore(
                state.ledger_snapshot,
                self.ctx.config.ledger_limits(),
                max_clients=len(self.ctx.verifier.keyring.client_ids()),
            )
        except LedgerSnapshotError as error:
            raise Rejected(DropReason.BAD_SNAPSHOT, str(error)) from None
        # Before the digest: a few bytes naming another (say, ten million account) genesis
        # must not make us build its Merkle tree only to find the digest differs.
        if ledger.genesis_rule() != self.ctx.ordering.ledger.genesis_rule():
            raise Rejected(DropReason.BAD_SNAPSHOT, "the snapshot names another genesis")
        if ledger.digest() != ledger_digest:
            raise Rejected(DropReason.BAD_SNAPSHOT, "the snapshot is not the state the proof names")
        self._install_state(
            state.seq,
            state.chain_hash,
            ledger_digest,
            ledger,
            state.ledger_snapshot,
            state.proof,
            state.replica,
        )

    def _install_state(
        self,
        seq: int,
        chain_hash: bytes,
        ledger_digest: bytes,
        ledger: Ledger,
        snapshot: bytes,
        proof: tuple[bytes, ...],
        source: int,
    ) -> None:
        """Replace our state with a proven checkpoint's (verified against its digest)."""
        self.ctx.ordering.install_state(ledger, seq, chain_hash)
        if self.incoming is not None and self.incoming.seq <= seq:
            self.incoming = None
        self.ctx.requests.forget_decided_requests()
        self.ctx.note(NoteKind.STATE_TRANSFER, f"to checkpoint {seq} from replica {source}")
        if seq > self.ctx.checkpoints.stable.seq:
            self.ctx.checkpoints.make_stable(
                StableCheckpoint(seq, chain_hash, ledger_digest, snapshot, proof)
            )
        self.ctx.ordering.execute_ready()

    def on_commit_certificate(self, message: CommitCertificate, opened: Opened) -> None:
        proposal = self.ctx.verifier.commit_certificate(message.pre_prepare, message.commits)
        if proposal.seq <= self.ctx.ordering.last_executed:
            return
        # A commit certificate proves itself: it may fill the gap below an anchor too.
        # Bounded all the same: at most a window ahead of what we executed or hold.
        if proposal.seq > self.ctx.ordering.last_executed + self.ctx.config.watermark_window:
            self.highest_seen_executed = max(self.highest_seen_executed, proposal.seq)
            raise Rejected(DropReason.ABOVE_WINDOW, str(proposal.seq))
        slot = self.ctx.ordering.slot(proposal.seq)
        self.ctx.ordering.check_proposal_conflict(proposal)
        if slot.committed is not None:
            return
        self.ctx.ordering.commit(slot, CommittedEntry(proposal, message.commits))
        self.ctx.ordering.execute_ready()
        self.ctx.ordering.advance(proposal.seq + 1)
