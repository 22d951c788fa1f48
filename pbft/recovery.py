"""Recovery from storage: rebuild a replica's parts from what it persisted.

Committed entries, prepared certificates and own votes are verified again as if they came
from the network; the active view's NEW-VIEW plan is re-installed, so a restarted backup
never takes a fresh PRE-PREPARE where the NEW-VIEW assigned one. Nothing is re-sent.

A commit certificate's record ("committed") is deferrable (pbft/host.py): a crash may
leave the last ones out while the replies they led to were sent. Such a slot comes back
with its prepared certificate and own COMMIT only; execution stops before it, and the
entry runs again, to the same result, once catch-up fetches the others' certificate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from pbft.codec import MAX_LOCAL_RECORD_BYTES, DecodeError, unpack
from pbft.context import Anchor, Context, ReplicaInvariantError, StableCheckpoint
from pbft.drops import DropReason
from pbft.events import Executed
from pbft.ledger import Ledger, LedgerSnapshotError
from pbft.log import CommittedEntry, PreparedEntry
from pbft.messages import Commit, NewView, Prepare, PreparedCertificate, PrePrepare
from pbft.signed import Rejected
from pbft.status import ViewStatus
from pbft.viewchange import verify_view_change


class Recovery:
    """Rebuilds the parts of a replica under construction from its records."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def recover(self, records: Mapping[tuple[str | int, ...], bytes]) -> tuple[Executed, ...]:
        """Rebuild from what was persisted; outputs are discarded (nothing is re-sent)
        but for the batches re-executed from the checkpoint, returned for the driver's
        history store (pbft/history.py), which rewrites their rows idempotently."""
        try:
            self._recover_records(records)
        except (DecodeError, Rejected, LedgerSnapshotError, ValueError, TypeError) as error:
            raise ReplicaInvariantError(
                f"replica {self.ctx.id}: unreadable storage: {error}"
            ) from None
        executed = tuple(action for action in self.ctx.outbox if isinstance(action, Executed))
        self.ctx.outbox = []
        return executed

    def _recover_records(self, records: Mapping[tuple[str | int, ...], bytes]) -> None:
        checkpoint = records.get(("checkpoint",))
        if checkpoint is not None:
            seq, chain_hash, ledger_digest, snapshot, proof = unpack(
                checkpoint, MAX_LOCAL_RECORD_BYTES
            )
            self.ctx.ordering.ledger = Ledger.restore(
                snapshot, max_clients=len(self.ctx.verifier.keyring.client_ids())
            )
            self.ctx.checkpoints.stable = StableCheckpoint(
                seq, chain_hash, ledger_digest, snapshot, tuple(proof)
            )
            self.ctx.ordering.last_executed = seq
            self.ctx.ordering.chain_hash = chain_hash
        anchor_record = records.get(("anchor",))
        if anchor_record is not None:
            seq, chain_hash, ledger_digest, proof = unpack(anchor_record)
            self.ctx.verifier.checkpoint_proof(seq, chain_hash, ledger_digest, proof)
            if seq > self.ctx.checkpoints.stable.seq:
                self.ctx.checkpoints.view_anchor = Anchor(
                    seq, chain_hash, ledger_digest, tuple(proof)
                )
        view_record = records.get(("view",))
        if view_record is not None:
            self.ctx.view, active = unpack(view_record)
            self.ctx.status = ViewStatus.NORMAL if active else ViewStatus.VIEW_CHANGE
            self.ctx.viewchanges.view_records[("view",)] = None
        for key in sorted(records, key=_record_order):
            value = records[key]
            kind = key[0]
            if kind == "committed":
                pre_prepare, commits = unpack(value)
                proposal = self.ctx.verifier.commit_certificate(pre_prepare, commits)
                slot = self.ctx.ordering.slot(proposal.seq)
                slot.committed = CommittedEntry(proposal, tuple(commits))
                slot.persisted_keys[key] = None
            elif kind == "prepared":
                view, certificate_wire = unpack(value)
                certificate = PreparedCertificate.from_wire(certificate_wire)
                proposal = self.ctx.verifier.prepared_certificate(certificate)
                slot = self.ctx.ordering.slot(proposal.seq)
                slot.best_prepared = PreparedEntry(view, proposal, certificate)
                slot.persisted_keys[key] = None
            elif kind == "vote":
                _, vote_kind, view, seq = key
                if vote_kind in ("view_change", "new_view"):
                    self.ctx.viewchanges.view_records[key] = None
                    if (
                        vote_kind == "view_change"
                        and view == self.ctx.view
                        and self.ctx.status is ViewStatus.VIEW_CHANGE
                    ):
                        self.ctx.viewchanges.own_view_change = value
                    if vote_kind == "new_view" and view == self.ctx.view:
                        self.ctx.viewchanges.new_view_message = value
                    continue
                self._recover_vote(str(vote_kind), int(view), int(seq), key, value)
        if (
            self.ctx.status is ViewStatus.NORMAL
            and self.ctx.viewchanges.new_view_message is not None
        ):
            self._recover_new_view(self.ctx.viewchanges.new_view_message)
        self.ctx.ordering.execute_ready()
        if (
            self.ctx.status is ViewStatus.VIEW_CHANGE
            and self.ctx.viewchanges.own_view_change is not None
        ):
            self.ctx.viewchanges.store_view_change(
                verify_view_change(self.ctx.viewchanges.own_view_change, self.ctx.verifier)
            )

    def _recover_new_view(self, raw: bytes) -> None:
        """Re-install the active view's NEW-VIEW plan into the slots, verified again as if it
        came from the network. Without it a restarted backup would take a fresh PRE-PREPARE
        from the primary at a sequence number the NEW-VIEW assigned (a fork)."""
        message = self.ctx.verifier.open(raw, NewView).message
        if not isinstance(message, NewView) or message.view != self.ctx.view:
            raise Rejected(
                DropReason.BAD_NEW_VIEW, "the recorded NEW-VIEW is not for the current view"
            )
        plan, proposals = self.ctx.viewchanges.verify_new_view(message)
        for proposal in proposals:
            if proposal.seq <= self.ctx.checkpoints.stable.seq:
                continue
            slot = self.ctx.ordering.slot(proposal.seq)
            if slot.proposal is None:
                slot.accept(proposal)
            elif slot.proposal.entry_digest != proposal.entry_digest:
                raise ReplicaInvariantError(
                    f"replica {self.ctx.id}: own pre-prepare at seq {proposal.seq} differs from "
                    f"the NEW-VIEW of view {self.ctx.view}"
                )
        last_planned = plan.last_seq
        self.ctx.ordering.new_view_planned_high = last_planned
        self.ctx.ordering.next_seq = max(self.ctx.ordering.next_seq, last_planned + 1)

    def _recover_vote(
        self, kind: str, view: int, seq: int, key: tuple[str | int, ...], raw: bytes
    ) -> None:
        slot = self.ctx.ordering.slot(seq)
        slot.persisted_keys[key] = None
        opened = self.ctx.verifier.open(raw)
        message = opened.message
        if isinstance(message, PrePrepare):
            slot.own_votes[(kind, view)] = hashlib.sha256(message.encode()).digest()
            if view == self.ctx.view and self.ctx.status is ViewStatus.NORMAL:
                slot.proposal = self.ctx.verifier.proposal(raw)
                self.ctx.ordering.next_seq = max(self.ctx.ordering.next_seq, seq + 1)
        elif isinstance(message, Prepare | Commit):
            slot.own_votes[(kind, view)] = message.entry_digest


def _record_order(key: tuple[str | int, ...]) -> tuple[int, int]:
    """Replay committed entries in sequence order, the rest after them."""
    kind = key[0]
    if kind == "committed":
        return (0, int(key[1]))
    if kind == "prepared":
        return (1, int(key[1]))
    if kind == "vote":
        return (2, int(key[3]))
    return (3, 0)
