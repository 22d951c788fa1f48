"""Checking proposals and the certificates built from them.

Every check here works on untrusted bytes and raises `Rejected` with a reason
code; a passing check returns a verified, decoded view of what was proven. One
verifier serves a replica (or a client, or an offline receipt check), sharing
one bounded signature cache so a message met several times is verified once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crypto.keys import KeyRing
from crypto.signing import VerificationCache
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.config import ClusterConfig
from pbft.drops import DropReason
from pbft.messages import (
    Checkpoint,
    Commit,
    Message,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Request,
)
from pbft.signed import Opened, Rejected, open_envelope


@dataclass(frozen=True)
class Proposal:
    """A verified pre-prepare: its view's primary signed it, digest and requests check out."""

    view: int
    seq: int
    prev_hash: bytes
    batch_digest: bytes
    timestamp_ms: int
    entry_digest: bytes
    raw: bytes
    requests: tuple[Opened, ...]

    @property
    def is_null(self) -> bool:
        return not self.requests


@dataclass(frozen=True)
class CheckpointClaim:
    seq: int
    chain_hash: bytes
    ledger_digest: bytes


class Verifier:
    def __init__(
        self,
        config: ClusterConfig,
        keyring: KeyRing,
        genesis_ledger_digest: bytes,
        cache: VerificationCache | None = None,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self.cache = cache if cache is not None else VerificationCache()
        self.genesis_ledger_digest = genesis_ledger_digest
        self.genesis_chain_hash = genesis_hash(genesis_ledger_digest)

    def open(
        self, raw: bytes, expected: type[Message] | tuple[type[Message], ...] | None = None
    ) -> Opened:
        return open_envelope(raw, self.keyring, self.cache, expected)

    def proposal(self, raw: bytes) -> Proposal:
        opened = self.open(raw, PrePrepare)
        pre_prepare = opened.message
        if not isinstance(pre_prepare, PrePrepare):  # narrowing for the type checker
            raise Rejected(DropReason.UNEXPECTED_TYPE)
        if pre_prepare.replica != self.config.primary_of(pre_prepare.view):
            raise Rejected(DropReason.NOT_PRIMARY, f"pre-prepare for view {pre_prepare.view}")
        if pre_prepare.seq == 0:
            raise Rejected(DropReason.OUT_OF_RANGE, "sequence 0 is the genesis")
        if len(pre_prepare.requests) > self.config.batch_size:
            raise Rejected(DropReason.BATCH_TOO_LARGE, str(len(pre_prepare.requests)))
        if batch_digest(pre_prepare.requests) != pre_prepare.batch_digest:
            raise Rejected(DropReason.BAD_BATCH_DIGEST)
        requests = []
        seen: dict[tuple[int, int], None] = {}
        for request_raw in pre_prepare.requests:
            try:
                request = self.open(request_raw, Request)
            except Rejected as error:
                raise Rejected(f"batch_request_{error.reason}", error.detail) from None
            message = request.message
            if not isinstance(message, Request):
                raise Rejected(DropReason.UNEXPECTED_TYPE)
            identity = (message.client_id, message.request_id)
            if identity in seen:
                raise Rejected(
                    DropReason.BATCH_DUPLICATE_REQUEST, f"client {identity[0]} id {identity[1]}"
                )
            seen[identity] = None
            requests.append(request)
        return Proposal(
            view=pre_prepare.view,
            seq=pre_prepare.seq,
            prev_hash=pre_prepare.prev_hash,
            batch_digest=pre_prepare.batch_digest,
            timestamp_ms=pre_prepare.timestamp_ms,
            entry_digest=entry_digest(
                pre_prepare.seq,
                pre_prepare.prev_hash,
                pre_prepare.batch_digest,
                pre_prepare.timestamp_ms,
            ),
            raw=raw,
            requests=tuple(requests),
        )

    def prepared_certificate(self, certificate: PreparedCertificate) -> Proposal:
        """A pre-prepare plus quorum - 1 prepares for its entry from distinct backups."""
        proposal = self.proposal(certificate.pre_prepare)
        primary = self.config.primary_of(proposal.view)
        voters = self._votes(
            certificate.prepares, Prepare, proposal.view, proposal.seq, proposal.entry_digest
        )
        if primary in voters:
            raise Rejected(
                DropReason.BAD_CERTIFICATE, "the primary does not prepare its own proposal"
            )
        if len(voters) < self.config.prepare_quorum:
            need = self.config.prepare_quorum
            raise Rejected(DropReason.BAD_CERTIFICATE, f"{len(voters)} prepares, need {need}")
        return proposal

    def commit_certificate(self, pre_prepare_raw: bytes, commits: Sequence[bytes]) -> Proposal:
        """A pre-prepare plus a quorum of commits for its entry from distinct replicas."""
        proposal = self.proposal(pre_prepare_raw)
        voters = self._votes(commits, Commit, proposal.view, proposal.seq, proposal.entry_digest)
        if len(voters) < self.config.quorum:
            raise Rejected(
                DropReason.BAD_CERTIFICATE, f"{len(voters)} commits, need {self.config.quorum}"
            )
        return proposal

    def checkpoint_proof(
        self, seq: int, chain_hash: bytes, ledger_digest: bytes, proof: Sequence[bytes]
    ) -> CheckpointClaim:
        """A quorum of distinct replicas signed this checkpoint; sequence 0 is the genesis."""
        claim = CheckpointClaim(seq, chain_hash, ledger_digest)
        if seq == 0:
            if (chain_hash, ledger_digest) != (
                self.genesis_chain_hash,
                self.genesis_ledger_digest,
            ):
                raise Rejected(DropReason.BAD_CHECKPOINT_PROOF, "not the genesis state")
            return claim
        if seq % self.config.checkpoint_interval != 0:
            raise Rejected(DropReason.BAD_CHECKPOINT_PROOF, f"{seq} is not a checkpoint sequence")
        signers: dict[int, None] = {}
        for raw in proof:
            opened = self.open(raw, Checkpoint)
            checkpoint = opened.message
            if not isinstance(checkpoint, Checkpoint):
                raise Rejected(DropReason.UNEXPECTED_TYPE)
            if (checkpoint.seq, checkpoint.chain_hash, checkpoint.ledger_digest) != (
                seq,
                chain_hash,
                ledger_digest,
            ):
                raise Rejected(DropReason.BAD_CHECKPOINT_PROOF, "a checkpoint in the proof differs")
            signers[checkpoint.replica] = None
        if len(signers) < self.config.quorum:
            need = self.config.quorum
            raise Rejected(DropReason.BAD_CHECKPOINT_PROOF, f"{len(signers)} signers, need {need}")
        return claim

    def _votes(
        self,
        raws: Sequence[bytes],
        kind: type[Prepare] | type[Commit],
        view: int,
        seq: int,
        digest: bytes,
    ) -> dict[int, None]:
        voters: dict[int, None] = {}
        for raw in raws:
            vote = self.open(raw, kind).message
            if not isinstance(vote, kind):
                raise Rejected(DropReason.UNEXPECTED_TYPE)
            if (vote.view, vote.seq, vote.entry_digest) != (view, seq, digest):
                raise Rejected(DropReason.BAD_CERTIFICATE, f"a {kind.__name__} does not match")
            if vote.replica in voters:
                raise Rejected(DropReason.BAD_CERTIFICATE, f"replica {vote.replica} votes twice")
            voters[vote.replica] = None
        return voters
