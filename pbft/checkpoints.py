"""Checkpoints and the watermark window.

Every checkpoint_interval entries a replica snapshots its ledger and signs a CHECKPOINT;
a quorum of matching ones make it stable: the log below it is discarded and the window
of sequence numbers a replica accepts, (low, low + watermark_window], moves up. A
checkpoint proven by a NEW-VIEW that we do not hold yet is the anchor: the window starts
there too. State that differs from a quorum's at a checkpoint halts the replica.
"""

from __future__ import annotations

from pbft.codec import pack
from pbft.context import Anchor, Context, StableCheckpoint
from pbft.drops import DropReason
from pbft.events import NoteKind
from pbft.messages import Checkpoint
from pbft.signed import Opened, Rejected, seal

CHECKPOINT_RETRANSMIT_LIMIT = 2


class Checkpoints:
    """Own and others' checkpoint votes, the stable checkpoint and the anchor."""

    def __init__(self, ctx: Context, genesis: StableCheckpoint) -> None:
        self.ctx = ctx
        self.stable = genesis
        # The checkpoint a NEW-VIEW started from, when it is ahead of our own stable one.
        self.view_anchor: Anchor | None = None
        self.own_snapshots: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.checkpoint_votes: dict[int, dict[int, tuple[bytes, bytes, bytes]]] = {}

    def retransmit(self) -> None:
        """Checkpoints not yet stable: a lost CHECKPOINT would otherwise stall the window
        for good once the log fills up to the high watermark."""
        for seq in sorted(self.own_snapshots)[-CHECKPOINT_RETRANSMIT_LIMIT:]:
            own = self.checkpoint_votes.get(seq, {}).get(self.ctx.id)
            if seq > self.stable.seq and own is not None:
                self.ctx.broadcast(own[2])

    def window_low(self) -> int:
        anchor = self.view_anchor.seq if self.view_anchor is not None else 0
        return max(self.stable.seq, anchor)

    def take_checkpoint(self) -> None:
        snapshot = self.ctx.ordering.ledger.snapshot()
        ledger_digest = self.ctx.ordering.ledger.digest()
        seq = self.ctx.ordering.last_executed
        self.own_snapshots[seq] = (self.ctx.ordering.chain_hash, ledger_digest, snapshot)
        # Bounded: snapshots too old to become stable any more are of no use.
        for old in [
            old for old in self.own_snapshots if old < seq - 2 * self.ctx.config.watermark_window
        ]:
            del self.own_snapshots[old]
        raw = seal(
            Checkpoint(seq, self.ctx.id, self.ctx.ordering.chain_hash, ledger_digest), self.ctx.key
        )
        self.checkpoint_votes.setdefault(seq, {})[self.ctx.id] = (
            self.ctx.ordering.chain_hash,
            ledger_digest,
            raw,
        )
        self.ctx.broadcast(raw)
        self._check_stable(seq)

    def on_checkpoint(self, checkpoint: Checkpoint, opened: Opened) -> None:
        if checkpoint.seq % self.ctx.config.checkpoint_interval != 0 or checkpoint.seq == 0:
            raise Rejected(DropReason.BAD_CHECKPOINT, f"seq {checkpoint.seq}")
        if checkpoint.seq <= self.stable.seq:
            return
        self.ctx.catchup.saw_executed(checkpoint.seq)
        horizon = (
            max(self.stable.seq, self.ctx.ordering.last_executed)
            + 2 * self.ctx.config.watermark_window
        )
        if checkpoint.seq > horizon:
            # Far ahead: remember nothing (bounded memory) beyond the hint to catch up.
            self.ctx.catchup.maybe_fetch()
            return
        votes = self.checkpoint_votes.setdefault(checkpoint.seq, {})
        existing = votes.get(checkpoint.replica)
        claim = (checkpoint.chain_hash, checkpoint.ledger_digest, opened.raw)
        if existing is not None:
            if existing[:2] != claim[:2]:
                self.ctx.report_evidence("checkpoint", checkpoint.replica, existing[2], opened.raw)
            return
        votes[checkpoint.replica] = claim
        self._check_stable(checkpoint.seq)

    def set_anchor(self, anchor: Anchor) -> None:
        if self.view_anchor is not None and self.view_anchor.seq >= anchor.seq:
            return
        self.view_anchor = anchor
        # Durable: after a restart the chain rule needs the anchor's hash, and a view change
        # must still cite it.
        self.ctx.persist(("anchor",), anchor.encode())
        self._check_stable(anchor.seq)

    def _check_stable(self, seq: int) -> None:
        anchor = self.view_anchor
        if anchor is not None and anchor.seq == seq and seq <= self.ctx.ordering.last_executed:
            # The anchor's proof is as good as 2f + 1 CHECKPOINT messages of our own.
            own = self.own_snapshots.get(seq)
            if own is not None and own[:2] == (anchor.chain_hash, anchor.ledger_digest):
                self.make_stable(
                    StableCheckpoint(
                        seq, anchor.chain_hash, anchor.ledger_digest, own[2], anchor.proof
                    )
                )
                return
        votes = self.checkpoint_votes.get(seq, {})
        groups: dict[tuple[bytes, bytes], list[bytes]] = {}
        for _, (chain_hash, ledger_digest, raw) in sorted(votes.items()):
            groups.setdefault((chain_hash, ledger_digest), []).append(raw)
        for (chain_hash, ledger_digest), raws in groups.items():
            if len(raws) < self.ctx.config.quorum:
                continue
            if seq > self.ctx.ordering.last_executed:
                self.ctx.catchup.maybe_fetch()
                return
            own = self.own_snapshots.get(seq)
            if own is None:
                return
            if own[:2] != (chain_hash, ledger_digest):
                self.ctx.halt(f"state diverged from 2f + 1 replicas at checkpoint {seq}")
                return
            self.make_stable(StableCheckpoint(seq, chain_hash, ledger_digest, own[2], tuple(raws)))
            return

    def make_stable(self, checkpoint: StableCheckpoint) -> None:
        self.stable = checkpoint
        # Deferrable, with the deletes below: 2f + 1 replicas signed this state and the
        # log rebuilds it; nothing sent in this step depends on our copy (pbft/host.py).
        # pbft/checkpoint_size.py bounds this record from the configuration: keep them in step.
        self.ctx.persist(
            ("checkpoint",),
            pack(
                [
                    checkpoint.seq,
                    checkpoint.chain_hash,
                    checkpoint.ledger_digest,
                    checkpoint.snapshot,
                    list(checkpoint.proof),
                ]
            ),
            deferrable=True,
        )
        for seq in [seq for seq in self.ctx.ordering.slots if seq <= checkpoint.seq]:
            for key in self.ctx.ordering.slots.pop(seq).persisted_keys:
                self.ctx.persist(key, None, deferrable=True)
        for table in (self.checkpoint_votes, self.own_snapshots):
            for seq in [seq for seq in table if seq <= checkpoint.seq]:
                del table[seq]
        if self.view_anchor is not None and self.view_anchor.seq <= checkpoint.seq:
            self.view_anchor = None
            self.ctx.persist(("anchor",), None, deferrable=True)
        # Progress: the timeouts may come back down one step, but at most once per timeout
        # period, or frequent checkpoints would undo the backoff before it can help.
        self.ctx.viewchanges.ease_backoff()
        self.ctx.note(NoteKind.CHECKPOINT_STABLE, f"seq {checkpoint.seq}")
        self.ctx.ordering.maybe_propose()

    def stable_checkpoint_vote(self) -> bytes | None:
        """A signed CHECKPOINT for our stable checkpoint (ours if we hold it): already
        signed, so the hint costs no signature."""
        votes = self.checkpoint_votes.get(self.stable.seq, {})
        own = votes.get(self.ctx.id)
        if own is not None:
            return own[2]
        return self.stable.proof[0] if self.stable.proof else None

    def adopt_checkpoint_proof(
        self, seq: int, chain_hash: bytes, ledger_digest: bytes, proof: tuple[bytes, ...]
    ) -> None:
        """We ran past a proven checkpoint already: the proof lets our own snapshot there
        become stable."""
        own = self.own_snapshots.get(seq)
        if own is None:
            return
        if own[:2] != (chain_hash, ledger_digest):
            self.ctx.halt(f"state diverged from 2f + 1 replicas at checkpoint {seq}")
            return
        self.make_stable(StableCheckpoint(seq, chain_hash, ledger_digest, own[2], proof))
