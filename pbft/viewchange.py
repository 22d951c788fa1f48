"""View change: checking VIEW-CHANGE messages and computing the NEW-VIEW proposal.

`plan_new_view` is a pure function of 2f + 1 verified view changes. The new
primary runs it to build its NEW-VIEW; every backup runs it again and rejects a
NEW-VIEW whose re-proposals differ (PBFT's rule that O is recomputed, not trusted).

The plan (PBFT section 4.4, with a hash chain):
- start from the highest stable checkpoint h any view change proves;
- for each sequence number from h + 1 to the highest prepared one, re-propose the
  batch of the prepared certificate with the highest view, or a null batch where
  none of the view changes prepared anything;
- chain the entries again from the checkpoint's chain hash. A correct replica only
  prepares an entry once its predecessor is prepared with the matching hash, so the
  prepared entries form an unbroken chain and re-chaining them keeps their digests.
- timestamps: a re-proposed batch keeps its own (the entry digest binds it); a null batch
  takes the timestamp of the nearest re-proposed batch above it (there always is one: the
  plan ends at a prepared entry). So the plan's stamps are in order wherever the prepared
  ones are, which the backups that prepared them checked, and a null batch never moves
  time past what a correct replica already accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pbft.certificates import CheckpointClaim, Proposal, Verifier
from pbft.chain import batch_digest, entry_digest
from pbft.drops import DropReason
from pbft.messages import ViewChange
from pbft.signed import Opened, Rejected


@dataclass(frozen=True)
class VerifiedViewChange:
    opened: Opened
    message: ViewChange
    checkpoint: CheckpointClaim
    # seq -> the prepared proposal this replica reported (one per sequence number).
    prepared: dict[int, Proposal]


@dataclass(frozen=True)
class PlannedEntry:
    seq: int
    prev_hash: bytes
    batch_digest: bytes
    timestamp_ms: int
    entry_digest: bytes
    requests: tuple[bytes, ...]


@dataclass(frozen=True)
class NewViewPlan:
    view: int
    checkpoint: CheckpointClaim
    checkpoint_proof: tuple[bytes, ...]
    entries: tuple[PlannedEntry, ...]

    @property
    def last_seq(self) -> int:
        """The highest sequence number this plan assigns (the checkpoint's when none)."""
        return self.entries[-1].seq if self.entries else self.checkpoint.seq


def verify_view_change(raw: bytes, verifier: Verifier) -> VerifiedViewChange:
    opened = verifier.open(raw, ViewChange)
    message = opened.message
    if not isinstance(message, ViewChange):
        raise Rejected(DropReason.UNEXPECTED_TYPE)
    config = verifier.config
    checkpoint = verifier.checkpoint_proof(
        message.checkpoint_seq,
        message.checkpoint_chain_hash,
        message.checkpoint_ledger_digest,
        message.checkpoint_proof,
    )
    prepared: dict[int, Proposal] = {}
    for certificate in message.prepared:
        proposal = verifier.prepared_certificate(certificate)
        if proposal.view >= message.new_view:
            raise Rejected(DropReason.BAD_VIEW_CHANGE, "a prepared certificate from a future view")
        if not checkpoint.seq < proposal.seq <= checkpoint.seq + config.watermark_window:
            raise Rejected(
                DropReason.BAD_VIEW_CHANGE, f"prepared seq {proposal.seq} outside the window"
            )
        if proposal.seq in prepared:
            raise Rejected(DropReason.BAD_VIEW_CHANGE, f"two certificates for seq {proposal.seq}")
        prepared[proposal.seq] = proposal
    return VerifiedViewChange(opened, message, checkpoint, prepared)


def plan_new_view(view: int, view_changes: Sequence[VerifiedViewChange]) -> NewViewPlan:
    """The deterministic NEW-VIEW proposal for `view` from verified view changes for it."""
    if not view_changes:
        raise ValueError("plan_new_view needs view changes")
    ordered = sorted(view_changes, key=lambda change: change.message.replica)
    # The highest proven checkpoint; ties between senders are broken by replica id.
    anchor = max(ordered, key=lambda change: change.checkpoint.seq)
    low = anchor.checkpoint.seq
    best: dict[int, Proposal] = {}
    for change in ordered:
        for seq, proposal in change.prepared.items():
            if seq <= low:
                continue
            current = best.get(seq)
            if current is None or proposal.view > current.view:
                best[seq] = proposal
    high = max(best, default=low)
    # Each null batch's timestamp: the nearest re-proposed batch's above it.
    stamps: dict[int, int] = {}
    stamp = 0
    for seq in range(high, low, -1):
        chosen = best.get(seq)
        if chosen is not None:
            stamp = chosen.timestamp_ms
        stamps[seq] = stamp
    entries = []
    prev_hash = anchor.checkpoint.chain_hash
    for seq in range(low + 1, high + 1):
        chosen = best.get(seq)
        requests = tuple(request.raw for request in chosen.requests) if chosen else ()
        batch = batch_digest(requests)
        digest = entry_digest(seq, prev_hash, batch, stamps[seq])
        entries.append(PlannedEntry(seq, prev_hash, batch, stamps[seq], digest, requests))
        prev_hash = digest
    return NewViewPlan(view, anchor.checkpoint, anchor.message.checkpoint_proof, tuple(entries))
