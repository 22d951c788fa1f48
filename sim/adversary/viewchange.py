"""View change and checkpoints: spam, lies in VIEW-CHANGE, bad NEW-VIEW, bad CHECKPOINT."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from crypto.keys import Principal
from pbft.certificates import Verifier
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.messages import (
    Checkpoint,
    CheckpointState,
    Commit,
    Heartbeat,
    Message,
    MessageType,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Request,
    StateChunk,
    ViewChange,
)
from pbft.signed import Rejected, seal
from pbft.viewchange import plan_new_view, verify_view_change
from sim.adversary.base import Behavior, decode_own, made_up, remember, type_code_of, view_of


class ViewChangeSpam(Behavior):
    """Each time it sends a replica anything (at most once per 50 ms per replica), also
    sends it VIEW-CHANGE messages, signed as itself, for an absurd view (2**61) and for
    the next three views. They are well-formed and valid: they cite the highest checkpoint
    this replica has proven in its own messages (a view change or a state transfer it
    sent), else the genesis, and claim nothing prepared."""

    name = "view_change_spam"
    ABSURD_VIEW = 2**61
    INTERVAL_MS = 50
    AHEAD = 3

    def setup(self) -> None:
        self.view = 0
        self.last_spam_ms: dict[int, int] = {}
        # (seq, chain hash, ledger digest, proof) of the best checkpoint we can prove
        self.checkpoint: tuple[int, bytes, bytes, tuple[bytes, ...]] | None = None
        if self.genesis_ledger_digest is not None:
            digest = self.genesis_ledger_digest
            self.checkpoint = (0, genesis_hash(digest), digest, ())
        self.spam: tuple[tuple[int, int], list[bytes]] | None = None

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        self._learn(decode_own(data))
        out = [data]
        if destination[0] != "replica" or self.checkpoint is None:
            return out
        last = self.last_spam_ms.get(destination[1])
        if last is not None and now_ms - last < self.INTERVAL_MS:
            return out
        self.last_spam_ms[destination[1]] = now_ms
        out.extend(self._messages())
        return out

    def _learn(self, message: Message | None) -> None:
        view = view_of(message)
        if view is not None and view < self.ABSURD_VIEW:
            self.view = max(self.view, view)
        claim: tuple[int, bytes, bytes, tuple[bytes, ...]] | None = None
        if isinstance(message, ViewChange):
            claim = (
                message.checkpoint_seq,
                message.checkpoint_chain_hash,
                message.checkpoint_ledger_digest,
                message.checkpoint_proof,
            )
        elif isinstance(message, CheckpointState | StateChunk):
            claim = (message.seq, message.chain_hash, message.ledger_digest, message.proof)
        if claim is not None and (self.checkpoint is None or claim[0] > self.checkpoint[0]):
            self.checkpoint = claim

    def _messages(self) -> list[bytes]:
        checkpoint = self.checkpoint
        if checkpoint is None:
            return []
        key = (self.view, checkpoint[0])
        if self.spam is not None and self.spam[0] == key:
            return self.spam[1]
        views = [self.ABSURD_VIEW, *range(self.view + 1, self.view + 1 + self.AHEAD)]
        messages = [
            seal(ViewChange(view, self.replica_id, *checkpoint, ()), self.key) for view in views
        ]
        self.spam = (key, messages)
        return messages


class _RewriteOnce(Behavior):
    """Rewrites every message of one type identically, whoever it goes to, remembering each
    rewrite by the original's digest so retransmissions carry the same lie."""

    TYPE: ClassVar[MessageType]

    def setup(self) -> None:
        # digest of an original message -> what was sent instead (bounded)
        self.rewritten: dict[bytes, bytes] = {}
        # how many distinct messages were rewritten (a rewrite may be a no-op)
        self.lies = 0

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if type_code_of(data) != self.TYPE:
            return [data]
        digest = hashlib.sha256(data).digest()
        known = self.rewritten.get(digest)
        if known is None:
            message = decode_own(data)
            lie = self.lie(message) if message is not None else None
            known = seal(lie, self.key) if lie is not None else data
            if lie is not None:
                self.lies += 1
            remember(self.rewritten, digest, known)
        return [known]

    def lie(self, message: Message) -> Message | None:
        """What to send instead, signed as itself by the caller; None: the original."""
        raise NotImplementedError


def _pre_prepare_of(certificate: PreparedCertificate) -> PrePrepare | None:
    message = decode_own(certificate.pre_prepare)
    return message if isinstance(message, PrePrepare) else None


class LieInViewChange(_RewriteOnce):
    """Lies in its own VIEW-CHANGE messages (signed as itself, so they verify). `kind`:
    - "omit_prepared": claims it prepared nothing (drops its prepared certificates);
    - "stale_checkpoint": cites the genesis instead of its stable checkpoint (keeping only the
      certificates that fit the genesis window, or the view change would be refused at once);
    - "forge_certificate": adds a prepared certificate it cannot have: a null batch at the
      next free sequence number, its pre-prepare claiming the previous view's primary and its
      2f prepares claiming that view's backups, every one signed with its own key. Valid
      only where it was itself the signer it claims to be, so receivers must refuse the whole
      view change (bad_signature or bad_certificate)."""

    name = "lie_in_view_change"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    TYPE = MessageType.VIEW_CHANGE
    KINDS: ClassVar[tuple[str, ...]] = ("omit_prepared", "stale_checkpoint", "forge_certificate")

    def setup(self) -> None:
        super().setup()
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(
                f"lie_in_view_change kind must be one of {self.KINDS}, got {self.kind!r}"
            )

    def lie(self, message: Message) -> Message | None:
        if not isinstance(message, ViewChange) or message.replica != self.replica_id:
            return None
        if self.kind == "omit_prepared":
            return replace(message, prepared=()) if message.prepared else None
        if self.kind == "stale_checkpoint":
            digest = self.genesis_ledger_digest
            if message.checkpoint_seq == 0 or digest is None:
                return None
            window = self.config.watermark_window
            kept = tuple(
                certificate
                for certificate in message.prepared
                if (pre_prepare := _pre_prepare_of(certificate)) is not None
                and 0 < pre_prepare.seq <= window
            )
            return replace(
                message,
                checkpoint_seq=0,
                checkpoint_chain_hash=genesis_hash(digest),
                checkpoint_ledger_digest=digest,
                checkpoint_proof=(),
                prepared=kept,
            )
        return replace(message, prepared=self._with_forged_certificate(message))

    def _with_forged_certificate(self, message: ViewChange) -> tuple[PreparedCertificate, ...]:
        certificates = list(message.prepared)
        seqs = [
            pre_prepare.seq
            for certificate in certificates
            if (pre_prepare := _pre_prepare_of(certificate)) is not None
        ]
        high = message.checkpoint_seq + self.config.watermark_window
        seq = max(seqs, default=message.checkpoint_seq) + 1
        if seq > high:
            # The window is full: the forged certificate replaces the last real one.
            seq = high
            certificates = [
                certificate
                for certificate, real_seq in zip(certificates, seqs, strict=True)
                if real_seq != seq
            ]
        view = max(0, message.new_view - 1)
        primary = self.config.primary_of(view)
        prev_hash = made_up(b"forged-certificate", message.new_view, seq)
        pre_prepare = PrePrepare(view, seq, primary, prev_hash, batch_digest(()), (), 0)
        digest = entry_digest(seq, prev_hash, pre_prepare.batch_digest, pre_prepare.timestamp_ms)
        backups = [replica for replica in self.replica_ids if replica != primary]
        prepares = tuple(
            seal(Prepare(view, seq, backup, digest), self.key)
            for backup in backups[: self.config.prepare_quorum]
        )
        forged = PreparedCertificate(seal(pre_prepare, self.key), prepares)
        return (*certificates, forged)


class BadNewView(Behavior):
    """As the new primary, sends a NEW-VIEW that is not the one the view changes call for,
    re-signed as itself. `kind`:
    - "omit_prepared": the first re-proposal of a prepared batch becomes a null batch;
    - "invent": the first null re-proposal gets a real batch (requests it saw earlier), or,
      with no null entry, one more entry with such a batch is appended;
    - "few_view_changes": it cites only 2f view changes instead of 2f + 1;
    - "split": the backups on the Adversary's fork side get another NEW-VIEW, equally
      valid: its own view change replaced by a second one that claims nothing prepared, and
      the re-proposals recomputed from that set (identical to the first when its own view
      change added nothing the others lacked). Needs the cluster's public keys;
    - "refork": the NEW-VIEW itself is honest, but with every HEARTBEAT afterwards the
      primary offers each backup a different batch (the last request dropped) at every
      sequence number that NEW-VIEW assigned, chained like the original, and its COMMITs
      there vote for the fork. A correct replica holds the NEW-VIEW's assignment (also
      after a restart) and refuses them all.
    Later entries and votes are sent as the core wrote them (chained on its own NEW-VIEW)."""

    name = "bad_new_view"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = (
        "omit_prepared",
        "invent",
        "few_view_changes",
        "split",
        "refork",
    )
    # refork: at most this many forked PRE-PREPAREs ride along with one heartbeat.
    REFORKS_PER_HEARTBEAT = 8
    # Request envelopes it remembers (from requests it relayed and pre-prepares it sent).
    REQUESTS = 64

    def setup(self) -> None:
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(f"bad_new_view kind must be one of {self.KINDS}, got {self.kind!r}")
        self.requests: deque[bytes] = deque(maxlen=self.REQUESTS)
        # (digest of the original NEW-VIEW, side) -> what was sent instead
        self.rewritten: dict[tuple[bytes, int], bytes] = {}
        self.lies = 0
        # split: how many second NEW-VIEWs re-proposed something else than the first
        self.split_plans_differ = 0
        # refork: the forked re-proposals of the latest NEW-VIEW this replica sent.
        self.reforks: list[tuple[int, bytes]] = []
        self.refork_view = -1
        self.refork_turn = 0
        self.verifier: Verifier | None = None
        if self.keyring is not None and self.genesis_ledger_digest is not None:
            self.verifier = Verifier(self.config, self.keyring, self.genesis_ledger_digest)

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        code = type_code_of(data)
        if code == MessageType.REQUEST:
            self._learn((data,))
            return [data]
        if code == MessageType.PRE_PREPARE:
            message = decode_own(data)
            if isinstance(message, PrePrepare):
                self._learn(message.requests)
            return [data]
        if self.kind == "refork":
            return self._refork(destination, code, data)
        if code != MessageType.NEW_VIEW:
            return [data]
        side = 0
        if self.kind == "split":
            if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
                return [data]
            side = 1
        key = (hashlib.sha256(data).digest(), side)
        known = self.rewritten.get(key)
        if known is None:
            message = decode_own(data)
            lie = self.lie(message) if isinstance(message, NewView) else None
            known = seal(lie, self.key) if lie is not None else data
            if lie is not None:
                self.lies += 1
            remember(self.rewritten, key, known)
        return [known]

    def _refork(self, destination: Principal, code: int | None, data: bytes) -> list[bytes]:
        if code == MessageType.NEW_VIEW:
            message = decode_own(data)
            if (
                isinstance(message, NewView)
                and message.replica == self.replica_id
                and message.view > self.refork_view
            ):
                self.refork_view = message.view
                self.reforks = []
                self.refork_digests: dict[int, bytes] = {}
                for raw in message.pre_prepares:
                    original = decode_own(raw)
                    if not isinstance(original, PrePrepare) or not original.requests:
                        continue
                    requests = original.requests[:-1]
                    forked = replace(
                        original, batch_digest=batch_digest(requests), requests=requests
                    )
                    self.reforks.append((forked.seq, seal(forked, self.key)))
                    self.refork_digests[forked.seq] = entry_digest(
                        forked.seq, forked.prev_hash, forked.batch_digest, forked.timestamp_ms
                    )
            return [data]
        if code == MessageType.COMMIT and destination[0] == "replica":
            vote = decode_own(data)
            if isinstance(vote, Commit) and vote.view == self.refork_view:
                forked_digest = self.refork_digests.get(vote.seq)
                if forked_digest is not None:
                    return [seal(replace(vote, entry_digest=forked_digest), self.key)]
        if code == MessageType.HEARTBEAT and destination[0] == "replica":
            message = decode_own(data)
            if isinstance(message, Heartbeat) and message.view == self.refork_view:
                # The forks past what is executed, a few per heartbeat, taking turns.
                open_forks = [raw for seq, raw in self.reforks if seq > message.last_executed]
                if not open_forks:
                    return [data]
                start = self.refork_turn % len(open_forks)
                self.refork_turn += 1
                chosen = (open_forks[start:] + open_forks[:start])[: self.REFORKS_PER_HEARTBEAT]
                return [data, *chosen]
        return [data]

    def _learn(self, requests: Sequence[bytes]) -> None:
        for raw in requests:
            if raw not in self.requests:
                self.requests.append(raw)

    def lie(self, message: NewView) -> NewView | None:
        if message.replica != self.replica_id:
            return None
        if self.kind == "few_view_changes":
            kept = message.view_changes[: self.config.quorum - 1]
            return replace(message, view_changes=kept)
        if self.kind == "split":
            return self._second_new_view(message)
        low_hash, proposals = self._planned(message)
        if low_hash is None:
            return None
        entries = [
            (proposal.seq, proposal.requests, proposal.timestamp_ms) for proposal in proposals
        ]
        if self.kind == "omit_prepared":
            index = next((i for i, (_, requests, _) in enumerate(entries) if requests), None)
            if index is None:
                return None
            entries[index] = (entries[index][0], (), entries[index][2])
        else:  # invent
            invented = self._invented_batch()
            index = next((i for i, (_, requests, _) in enumerate(entries) if not requests), None)
            if index is not None and invented:
                entries[index] = (entries[index][0], invented, entries[index][2])
            else:
                low_seq = self._low_seq(message)
                last, stamp = (entries[-1][0], entries[-1][2]) if entries else (low_seq, 0)
                entries.append((last + 1, invented, stamp))
        return replace(message, pre_prepares=self._chain(message.view, low_hash, entries))

    def _invented_batch(self) -> tuple[bytes, ...]:
        chosen: dict[tuple[int, int], bytes] = {}
        for raw in self.requests:
            request = decode_own(raw)
            if isinstance(request, Request):
                chosen.setdefault((request.client_id, request.request_id), raw)
            if len(chosen) >= self.config.batch_size:
                break
        return tuple(chosen.values())

    def _view_changes(self, message: NewView) -> list[ViewChange]:
        changes = [decode_own(raw) for raw in message.view_changes]
        return [change for change in changes if isinstance(change, ViewChange)]

    def _low_seq(self, message: NewView) -> int:
        return max((change.checkpoint_seq for change in self._view_changes(message)), default=0)

    def _planned(self, message: NewView) -> tuple[bytes | None, list[PrePrepare]]:
        """The chain hash the re-proposals start from, and the re-proposals."""
        changes = sorted(self._view_changes(message), key=lambda change: change.replica)
        if not changes:
            return None, []
        anchor = max(changes, key=lambda change: change.checkpoint_seq)
        proposals = [decode_own(raw) for raw in message.pre_prepares]
        return anchor.checkpoint_chain_hash, [
            proposal for proposal in proposals if isinstance(proposal, PrePrepare)
        ]

    def _chain(
        self, view: int, prev_hash: bytes, entries: list[tuple[int, tuple[bytes, ...], int]]
    ) -> tuple[bytes, ...]:
        """Signed re-proposals of (seq, requests, timestamp) entries, chained from prev_hash."""
        out = []
        for seq, requests, stamp in entries:
            digest = batch_digest(requests)
            proposal = PrePrepare(view, seq, self.replica_id, prev_hash, digest, requests, stamp)
            out.append(seal(proposal, self.key))
            prev_hash = entry_digest(seq, prev_hash, digest, stamp)
        return tuple(out)

    def _claim_less(self, change: ViewChange) -> ViewChange:
        """Its own view change without its prepared certificates, or, if it had none, citing
        the genesis: either way a different, valid view change for the same view."""
        digest = self.genesis_ledger_digest
        if change.prepared or change.checkpoint_seq == 0 or digest is None:
            return replace(change, prepared=())
        return replace(
            change,
            checkpoint_seq=0,
            checkpoint_chain_hash=genesis_hash(digest),
            checkpoint_ledger_digest=digest,
            checkpoint_proof=(),
        )

    def _second_new_view(self, message: NewView) -> NewView | None:
        verifier = self.verifier
        if verifier is None:
            return None
        raws = []
        for raw in message.view_changes:
            change = decode_own(raw)
            if isinstance(change, ViewChange) and change.replica == self.replica_id:
                # A second view change of its own for the same view: valid, claims less.
                raw = seal(self._claim_less(change), self.key)
            raws.append(raw)
        try:
            changes = [verify_view_change(raw, verifier) for raw in raws]
        except Rejected:
            return None
        plan = plan_new_view(message.view, changes)
        entries = [(entry.seq, entry.requests, entry.timestamp_ms) for entry in plan.entries]
        pre_prepares = self._chain(message.view, plan.checkpoint.chain_hash, entries)
        if pre_prepares != message.pre_prepares:
            self.split_plans_differ += 1
        return replace(message, view_changes=tuple(raws), pre_prepares=pre_prepares)


class BadCheckpoint(_RewriteOnce):
    """Every CHECKPOINT it sends names a wrong ledger digest (its chain hash is right): a vote
    for a state no correct replica has, which must never count towards a stable checkpoint."""

    name = "bad_checkpoint"
    TYPE = MessageType.CHECKPOINT

    def lie(self, message: Message) -> Message | None:
        if not isinstance(message, Checkpoint):
            return None
        wrong = made_up(b"bad-checkpoint", message.ledger_digest)
        return replace(message, ledger_digest=wrong)
