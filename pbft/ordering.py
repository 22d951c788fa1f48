"""Ordering: slots, certificates, the chain rule, proposing and execution.

The normal case of PBFT. The primary batches requests into a PRE-PREPARE chained to the
previous entry's digest; backups PREPARE it once the entry before it is settled with the
digest it names (the chain rule: prepared entries always form one chain, which view change
relies on); prepare_quorum matching prepares make an entry prepared and the replica
COMMITs; a quorum of matching commits make it committed; committed entries execute
strictly in sequence order. Every vote is signed at most once per (kind, view, seq) and
is durable before it is sent.

Batch time: the ledger decides expiry against a timestamp agreed with the batch, never
against a replica's clock. The primary stamps each batch with max(its clock, the stamp of
the batch before it), so stamps never go back. A backup accepts a fresh PRE-PREPARE only if
its stamp lies between those of the batches it accepted at lower and higher sequence
numbers, and within config.max_clock_skew_ms of its own clock; a stamp that only repeats
the one before it may be ahead of the backup's clock (a primary whose clock is behind keeps
the time still, it cannot push it on). Anything else is dropped as `bad_timestamp`, like
any invalid proposal: the batch never prepares here and the backup's timers depose the
primary. NEW-VIEW re-proposals keep their batches' stamps (the entry digest binds them);
they are old, so only the plan decides them (pbft/viewchange.py), not the skew bound.

Owns the slots, the next sequence number to propose, the executed state (ledger, last
executed entry and its chain hash) and the signed replies kept for retransmissions: one
signature per executed batch covers the Merkle root of its results (pbft/replies.py).
"""

from __future__ import annotations

import hashlib

from pbft.certificates import Proposal
from pbft.chain import batch_digest
from pbft.codec import pack
from pbft.context import Context, ReplicaInvariantError
from pbft.drops import DropReason
from pbft.events import Executed, ExecutedRequest
from pbft.ledger import Ledger, Payment
from pbft.log import CommittedEntry, PreparedEntry, Slot
from pbft.messages import Commit, Message, Prepare, PreparedCertificate, PrePrepare, Request
from pbft.replies import ReplyResult, SignedReplies, sign_replies
from pbft.signed import Opened, Rejected, seal
from pbft.status import ViewStatus

RETRANSMIT_SLOT_LIMIT = 8
# Replies the ledger does not store a decision for: never kept for retransmissions.
UNSTORED_REASON_CODES = ("id_reused", "request_expired")
# Of the batches in flight, at most this fraction may hold nothing but requests of clients
# over their quota, so that a correct client's request finds the pipeline open (see
# maybe_propose).
OVER_QUOTA_PIPELINE_SHARE = 2


class Ordering:
    """The normal case at one replica; owns the slots and the executed state."""

    def __init__(self, ctx: Context, ledger: Ledger) -> None:
        self.ctx = ctx
        self.slots: dict[int, Slot] = {}
        self.next_seq = 1
        # The highest sequence number the current view's NEW-VIEW assigned. In this view a
        # proposal at or below it is accepted only as that assignment (also after a restart:
        # recovery re-installs the plan), never as a fresh PRE-PREPARE from the primary.
        self.new_view_planned_high = 0
        # The executed state.
        self.ledger = ledger
        self.last_executed = 0
        self.chain_hash = ctx.verifier.genesis_chain_hash
        self.last_execution_ms = 0
        self.signed_replies = SignedReplies()

    @property
    def last_executed_timestamp_ms(self) -> int:
        """The agreed timestamp of the last executed batch: where the next stamps start. The
        ledger keeps it (in its snapshots and digest too), so it is right after a state
        transfer or a restart from a checkpoint, not only after executing here."""
        return self.ledger.batch_time_ms

    def vote(self, slot: Slot, kind: str, message: Prepare | Commit | PrePrepare) -> bytes:
        """Sign a vote, after checking we never signed a different one at (kind, view, seq)."""
        digest = (
            message.entry_digest
            if not isinstance(message, PrePrepare)
            else hashlib.sha256(message.encode()).digest()
        )
        if self.ctx.silent_through_view is not None:
            raise ReplicaInvariantError(
                f"replica {self.ctx.id} may have lost its votes; not signing"
            )
        previous = slot.own_votes.get((kind, message.view))
        if previous is not None and previous != digest:
            raise ReplicaInvariantError(
                f"replica {self.ctx.id} about to sign a second {kind} at "
                f"view {message.view} seq {slot.seq}"
            )
        slot.own_votes[(kind, message.view)] = digest
        raw = seal(message, self.ctx.key)
        key = ("vote", kind, message.view, slot.seq)
        slot.persisted_keys[key] = None
        self.ctx.persist(key, raw)
        return raw

    def is_redundant(self, message: Message) -> bool:
        if not isinstance(message, Prepare | Commit) or message.view != self.ctx.view:
            return False
        slot = self.slots.get(message.seq)
        if slot is None:
            return False
        if isinstance(message, Prepare):
            return slot.prepared_in_view
        return slot.committed is not None

    def _check_window(self, seq: int) -> None:
        low = self.ctx.checkpoints.window_low()
        if seq <= low:
            raise Rejected(DropReason.BELOW_WINDOW, str(seq))
        if seq > low + self.ctx.config.watermark_window:
            # The others are this far ahead: we are behind and should catch up.
            self.ctx.catchup.saw_executed(seq - self.ctx.config.watermark_window)
            raise Rejected(DropReason.ABOVE_WINDOW, str(seq))

    def install_state(self, ledger: Ledger, seq: int, chain_hash: bytes) -> None:
        """Continue from a proven checkpoint's state (state transfer) as if executed here."""
        self.ledger = ledger
        self.last_executed = seq
        self.chain_hash = chain_hash
        self.last_execution_ms = self.ctx.now_ms

    def leave_view(self) -> None:
        """The view is given up: no slot keeps this view's prepares or commits."""
        self.new_view_planned_high = 0
        for slot in self.slots.values():
            slot.reset_view()

    def enter_view(self, last_planned: int) -> None:
        """A NEW-VIEW assigned everything up to `last_planned`: propose after it."""
        self.next_seq = last_planned + 1
        self.new_view_planned_high = last_planned

    def slot(self, seq: int) -> Slot:
        slot = self.slots.get(seq)
        if slot is None:
            slot = Slot(seq, last_progress_ms=self.ctx.now_ms)
            self.slots[seq] = slot
        return slot

    def on_pre_prepare(self, message: PrePrepare, opened: Opened) -> None:
        self.ctx.viewchanges.check_view(message.view, message.replica)
        self._check_window(message.seq)
        proposal = self.ctx.verifier.proposal(opened.raw)
        self.ctx.viewchanges.heard_from_primary()
        slot = self.slot(proposal.seq)
        if slot.proposal is not None:
            if slot.proposal.entry_digest != proposal.entry_digest:
                self.ctx.report_evidence(
                    "pre_prepare", message.replica, slot.proposal.raw, opened.raw
                )
                raise Rejected(DropReason.CONFLICTING_PRE_PREPARE, f"seq {proposal.seq}")
            return
        if proposal.seq <= self.new_view_planned_high:
            # The NEW-VIEW filled this sequence number; only its assignment may stand here.
            raise Rejected(DropReason.NOT_THE_NEW_VIEW_PRE_PREPARE, f"seq {proposal.seq}")
        if slot.committed is not None and slot.committed.proposal.entry_digest != (
            proposal.entry_digest
        ):
            raise Rejected(DropReason.CONFLICTS_WITH_COMMITTED, f"seq {proposal.seq}")
        own = slot.own_votes.get(("prepare", proposal.view))
        if own is not None and own != proposal.entry_digest:
            raise Rejected(DropReason.CONFLICTS_WITH_OWN_VOTE, f"seq {proposal.seq}")
        predecessor = self._known_entry(proposal.seq - 1)
        if predecessor is not None and predecessor != proposal.prev_hash:
            raise Rejected(DropReason.BAD_CHAIN, f"seq {proposal.seq}")
        self._check_timestamp(proposal)
        slot.accept(proposal)
        self.advance(proposal.seq)

    def timestamp_bounds(self, seq: int) -> tuple[int, int | None]:
        """The stamps a batch at `seq` must lie between: the highest of the batches this
        replica executed, accepted (in this view) or knows committed below `seq`, and the
        lowest of those above it (None when there is none)."""
        low = self.last_executed_timestamp_ms if seq > self.last_executed else 0
        high: int | None = None
        for other, slot in self.slots.items():
            if other == seq or other <= self.last_executed:
                continue
            known = slot.committed.proposal if slot.committed is not None else slot.proposal
            if known is None:
                continue
            if other < seq:
                low = max(low, known.timestamp_ms)
            elif high is None or known.timestamp_ms < high:
                high = known.timestamp_ms
        return low, high

    def _check_timestamp(self, proposal: Proposal) -> None:
        """A fresh proposal's stamp: in order with its neighbours and near our clock."""
        stamp = proposal.timestamp_ms
        low, high = self.timestamp_bounds(proposal.seq)
        where = f"seq {proposal.seq} stamped {stamp}"
        if stamp < low:
            raise Rejected(DropReason.BAD_TIMESTAMP, f"{where}, before {low} at a lower seq")
        if high is not None and stamp > high:
            raise Rejected(DropReason.BAD_TIMESTAMP, f"{where}, after {high} at a higher seq")
        clock = self.ctx.wall_ms
        bound = self.ctx.config.max_clock_skew_ms
        if clock - stamp > bound:
            raise Rejected(DropReason.BAD_TIMESTAMP, f"{where}, our clock {clock}")
        if stamp - clock > bound and stamp != low:
            raise Rejected(DropReason.BAD_TIMESTAMP, f"{where}, our clock {clock}")

    def on_vote(self, vote: Prepare | Commit, opened: Opened) -> None:
        self.ctx.viewchanges.check_view(vote.view, vote.replica)
        self._check_window(vote.seq)
        is_prepare = isinstance(vote, Prepare)
        if is_prepare and vote.replica == self.ctx.config.primary_of(vote.view):
            raise Rejected(DropReason.PRIMARY_PREPARE)
        slot = self.slot(vote.seq)
        votes = slot.prepares if is_prepare else slot.commits
        existing = votes.get(vote.replica)
        if existing is not None:
            if existing[0] != vote.entry_digest:
                kind = "prepare" if is_prepare else "commit"
                self.ctx.report_evidence(kind, vote.replica, existing[1], opened.raw)
                raise Rejected(DropReason.CONFLICTING_VOTE, f"seq {vote.seq}")
            return
        votes[vote.replica] = (vote.entry_digest, opened.raw)
        if (
            not is_prepare
            and slot.committed is None
            and (len(slot.matching(slot.commits, vote.entry_digest)) >= self.ctx.config.weak_quorum)
        ):
            # f + 1 commits: a correct replica prepared this entry, so the cluster is at
            # least this far along. If we cannot commit it ourselves (we lost the proposal,
            # or the primary hides it from us), catch-up will fetch its certificate.
            self.ctx.catchup.saw_executed(vote.seq)
        self.advance(vote.seq)

    def _known_entry(self, seq: int) -> bytes | None:
        """The entry digest at `seq`, where this replica knows it for certain."""
        if seq == self.last_executed:
            return self.chain_hash
        if seq == self.ctx.checkpoints.stable.seq:
            return self.ctx.checkpoints.stable.chain_hash
        if (
            self.ctx.checkpoints.view_anchor is not None
            and seq == self.ctx.checkpoints.view_anchor.seq
        ):
            return self.ctx.checkpoints.view_anchor.chain_hash
        slot = self.slots.get(seq)
        if slot is None:
            return None
        if slot.committed is not None:
            return slot.committed.proposal.entry_digest
        if slot.proposal is not None:
            return slot.proposal.entry_digest
        return None

    def _predecessor_settled(self, slot: Slot) -> bool:
        """The chain rule: prepare s only once s - 1 is settled with the digest s names."""
        proposal = slot.proposal
        if proposal is None:
            return False
        if slot.committed is not None:
            return slot.committed.proposal.entry_digest == proposal.entry_digest
        seq = slot.seq - 1
        if seq == self.last_executed:
            return self.chain_hash == proposal.prev_hash
        if seq == self.ctx.checkpoints.stable.seq:
            return self.ctx.checkpoints.stable.chain_hash == proposal.prev_hash
        if (
            self.ctx.checkpoints.view_anchor is not None
            and seq == self.ctx.checkpoints.view_anchor.seq
        ):
            return self.ctx.checkpoints.view_anchor.chain_hash == proposal.prev_hash
        previous = self.slots.get(seq)
        if previous is None:
            return False
        if previous.committed is not None:
            return previous.committed.proposal.entry_digest == proposal.prev_hash
        if previous.prepared_in_view and previous.proposal is not None:
            return previous.proposal.entry_digest == proposal.prev_hash
        return False

    def advance(self, seq: int) -> None:
        """Move slot `seq` (and any successors it unblocks) through prepare and commit."""
        while True:
            slot = self.slots.get(seq)
            if slot is None or not self._step_slot(slot):
                break
            seq += 1
        self.execute_ready()

    def _step_slot(self, slot: Slot) -> bool:
        """One pass of the phase rules over a slot; True if it became prepared or committed."""
        proposal = slot.proposal
        if (
            proposal is None
            or self.ctx.status is ViewStatus.VIEW_CHANGE
            or self.ctx.silent_through_view is not None
        ):
            return False
        changed = False
        primary = self.ctx.config.primary_of(self.ctx.view)
        if self.ctx.id != primary and slot.own_prepare is None and self._predecessor_settled(slot):
            raw = self.vote(
                slot,
                "prepare",
                Prepare(self.ctx.view, slot.seq, self.ctx.id, proposal.entry_digest),
            )
            slot.own_prepare = raw
            slot.prepares[self.ctx.id] = (proposal.entry_digest, raw)
            slot.last_progress_ms = self.ctx.now_ms
            self.ctx.broadcast(raw)
        ready_to_prepare = self.ctx.id == primary or slot.own_prepare is not None
        if ready_to_prepare and not slot.prepared_in_view:
            prepares = slot.matching(slot.prepares, proposal.entry_digest)
            if len(prepares) >= self.ctx.config.prepare_quorum:
                certificate = PreparedCertificate(proposal.raw, tuple(prepares))
                slot.prepared_in_view = True
                slot.best_prepared = PreparedEntry(self.ctx.view, proposal, certificate)
                prepared_key = ("prepared", slot.seq)
                slot.persisted_keys[prepared_key] = None
                self.ctx.persist(prepared_key, pack([self.ctx.view, certificate.to_wire()]))
                raw = self.vote(
                    slot,
                    "commit",
                    Commit(self.ctx.view, slot.seq, self.ctx.id, proposal.entry_digest),
                )
                slot.own_commit = raw
                slot.commits[self.ctx.id] = (proposal.entry_digest, raw)
                slot.last_progress_ms = self.ctx.now_ms
                self.ctx.broadcast(raw)
                changed = True
        if slot.prepared_in_view and slot.committed is None:
            commits = slot.matching(slot.commits, proposal.entry_digest)
            if len(commits) >= self.ctx.config.quorum:
                self.commit(slot, CommittedEntry(proposal, tuple(commits)))
                changed = True
        return changed

    def commit(self, slot: Slot, entry: CommittedEntry) -> None:
        slot.committed = entry
        slot.last_progress_ms = self.ctx.now_ms
        key = ("committed", slot.seq)
        slot.persisted_keys[key] = None
        # Others' durable COMMITs fix the decision; the replies may precede this record.
        self.ctx.persist(key, entry.encode(), deferrable=True)

    def maybe_propose(self) -> None:
        if (
            not (self.ctx.is_primary and self.ctx.status is ViewStatus.NORMAL)
            or self.ctx.silent_through_view is not None
        ):
            return
        window_high = self.ctx.checkpoints.window_low() + self.ctx.config.watermark_window
        inflight_high = self.last_executed + self.ctx.config.max_inflight_batches
        while self.ctx.requests.proposal_queue and self.next_seq <= min(window_high, inflight_high):
            # Adaptive batching: with nothing in flight a request is proposed at once (no
            # tick in its way); while batches are in flight, requests gather into the next
            # one until it is full or its oldest has waited batch_timeout_ms.
            in_flight = self.next_seq - 1 > self.last_executed
            if in_flight and len(self.ctx.requests.proposal_queue) < self.ctx.config.batch_size:
                oldest = self.ctx.requests.pending[next(iter(self.ctx.requests.proposal_queue))]
                if self.ctx.now_ms - oldest.arrived_ms < self.ctx.config.batch_timeout_ms:
                    return
            identities = self.ctx.requests.next_batch()
            if self.ctx.requests.backlog_only(identities):
                # Only over-quota clients' requests: they may fill part of the pipeline,
                # never all of it, or a correct client's request arriving now would wait
                # for batches of theirs to drain (the flood's latency, not its own).
                reserve = max(1, self.ctx.config.max_inflight_batches // OVER_QUOTA_PIPELINE_SHARE)
                if self.next_seq > self.last_executed + reserve:
                    return
            self.ctx.requests.charge_backlog(identities)
            batch: list[bytes] = []
            for identity in identities:
                del self.ctx.requests.proposal_queue[identity]
                pending = self.ctx.requests.pending.get(identity)
                if pending is not None:
                    batch.append(pending.opened.raw)
            if not batch:
                return
            self._propose(tuple(batch))

    def _propose(self, requests: tuple[bytes, ...]) -> None:
        # A primary that restarted or caught up by state transfer may hold a stale
        # next_seq: everything up to the window's low end is already decided.
        self.next_seq = max(self.next_seq, self.ctx.checkpoints.window_low() + 1)
        seq = self.next_seq
        prev_hash = self._known_entry(seq - 1)
        if prev_hash is None:
            raise ReplicaInvariantError(f"primary {self.ctx.id} lost the chain before seq {seq}")
        # Never before a batch accepted below (monotonic), nor after one above (there is
        # none from a correct primary; the clamp keeps our proposal acceptable regardless).
        low, high = self.timestamp_bounds(seq)
        stamp = max(self.ctx.wall_ms, low)
        if high is not None:
            stamp = min(stamp, high)
        pre_prepare = PrePrepare(
            self.ctx.view, seq, self.ctx.id, prev_hash, batch_digest(requests), requests, stamp
        )
        slot = self.slot(seq)
        raw = self.vote(slot, "pre_prepare", pre_prepare)
        slot.proposal = self.ctx.verifier.proposal(raw)
        self.next_seq = seq + 1
        self.ctx.broadcast(raw)
        self.advance(seq)

    def execute_ready(self) -> None:
        executed_before = self.last_executed
        while True:
            slot = self.slots.get(self.last_executed + 1)
            if slot is None or slot.committed is None:
                break
            proposal = slot.committed.proposal
            if proposal.prev_hash != self.chain_hash:
                # Only possible with more than f faulty replicas: refuse to run on a fork.
                self.ctx.halt(f"chain fork at seq {slot.seq}")
                return
            self._execute(proposal)
        if self.last_executed > executed_before:
            # Room in the pipeline again: propose what gathered meanwhile.
            self.maybe_propose()

    def _batch_time_ms(self, proposal: Proposal) -> int:
        """The time the ledger decides expiry against: the batch's agreed timestamp."""
        return proposal.timestamp_ms

    def _execute(self, proposal: Proposal) -> None:
        executed = []
        results: list[ReplyResult] = []
        released = self.ledger.begin_batch(proposal.seq, self._batch_time_ms(proposal))
        for opened in proposal.requests:
            request = opened.message
            if not isinstance(request, Request):
                raise ReplicaInvariantError("a verified proposal holds a non-request")
            digest = opened.body_digest
            payment = Payment(
                request.client_id,
                request.request_id,
                request.payer,
                request.payee,
                request.amount,
                request.op,
                request.ref_client,
                request.ref_request,
                request.expires_in_ms,
            )
            result = self.ledger.execute(payment, digest, proposal.seq)
            decision = result.decision
            identity = (request.client_id, request.request_id)
            pending = self.ctx.requests.pending.get(identity)
            if pending is not None and (pending.body_digest == digest or result.fresh):
                self.ctx.requests.unpend(identity)
            executed.append(
                ExecutedRequest(
                    request.client_id,
                    request.request_id,
                    digest,
                    request.payer,
                    request.payee,
                    request.amount,
                    decision.outcome.value,
                    decision.reason.value,
                    result.fresh,
                    request.op,
                    request.ref_client,
                    request.ref_request,
                    request.expires_in_ms,
                    result.postings,
                )
            )
            results.append(ReplyResult.of(request.client_id, request.request_id, digest, decision))
        if results:
            self.reply(proposal.seq, results)
        self.last_executed = proposal.seq
        self.chain_hash = proposal.entry_digest
        self.last_execution_ms = self.ctx.now_ms
        self.ctx.requests.count_ordered(len(proposal.requests))
        self.ctx.viewchanges.progress_made()
        self.ctx.outbox.append(
            Executed(
                proposal.view,
                proposal.seq,
                proposal.entry_digest,
                tuple(executed),
                self.ledger.batch_time_ms,
                self.ctx.config.primary_of(proposal.view),
                proposal.batch_digest,
                released,
            )
        )
        if proposal.seq % self.ctx.config.checkpoint_interval == 0:
            self.ctx.checkpoints.take_checkpoint()

    def reply(self, batch_seq: int, results: list[ReplyResult]) -> None:
        """Answer each result's client, under one signature for the whole batch (a
        forgotten reply answered again is a batch of one at its decision's seq)."""
        frames = sign_replies(
            self.ctx.key, self.ctx.id, self.ctx.view, batch_seq, self.ctx.cluster_id, results
        )
        for result, raw in zip(results, frames, strict=True):
            if result.reason not in UNSTORED_REASON_CODES:
                # Decided for good: the same reply answers every retransmission.
                self.signed_replies.put(
                    result.client_id, result.request_id, result.request_digest, raw
                )
            self.ctx.send(("client", result.client_id), raw)

    def retransmit_slots(self) -> None:
        """Send again what we signed for slots that have not moved for an interval, each slot
        on its own clock, so one lost message costs one interval, not two."""
        interval = self.ctx.config.retransmit_interval_ms
        resent = 0
        for seq in sorted(self.slots):
            if resent >= RETRANSMIT_SLOT_LIMIT:
                break
            slot = self.slots[seq]
            if seq <= self.last_executed or slot.proposal is None:
                continue
            if self.ctx.now_ms - slot.last_progress_ms < interval:
                continue
            resent += 1
            slot.last_progress_ms = self.ctx.now_ms
            if self.ctx.is_primary:
                self.ctx.broadcast(slot.proposal.raw)
            for raw in (slot.own_prepare, slot.own_commit):
                if raw is not None:
                    self.ctx.broadcast(raw)

    def check_proposal_conflict(self, proposal: Proposal) -> None:
        """A certified proposal that differs from the one its primary showed us."""
        slot = self.slots.get(proposal.seq)
        seen = slot.conflicting(proposal) if slot is not None else None
        if seen is not None:
            primary = self.ctx.config.primary_of(proposal.view)
            self.ctx.report_evidence("pre_prepare", primary, seen.raw, proposal.raw)
