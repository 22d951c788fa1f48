"""The replica's message log: one slot per sequence number inside the watermark window."""

from __future__ import annotations

from dataclasses import dataclass, field

from pbft.certificates import Proposal
from pbft.codec import pack
from pbft.messages import PreparedCertificate

ACCEPTED_VIEWS = 4


@dataclass(frozen=True)
class PreparedEntry:
    """This replica prepared `proposal` in `view`; kept across view changes for VIEW-CHANGE."""

    view: int
    proposal: Proposal
    certificate: PreparedCertificate


@dataclass(frozen=True)
class CommittedEntry:
    """A commit certificate: the proposal plus 2f + 1 matching commits, as received."""

    proposal: Proposal
    commits: tuple[bytes, ...]

    def encode(self) -> bytes:
        return pack([self.proposal.raw, list(self.commits)])


@dataclass
class Slot:
    seq: int
    # State of the current view, reset when a new view is installed.
    proposal: Proposal | None = None
    prepares: dict[int, tuple[bytes, bytes]] = field(
        default_factory=dict
    )  # replica -> (digest, raw)
    commits: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    own_prepare: bytes | None = None
    own_commit: bytes | None = None
    prepared_in_view: bool = False
    # State that survives view changes.
    best_prepared: PreparedEntry | None = None
    committed: CommittedEntry | None = None
    # What this replica signed here: (kind, view) -> entry digest. Guards against
    # signing a conflicting vote, also after a restart (restored from storage).
    own_votes: dict[tuple[str, int], bytes] = field(default_factory=dict)
    persisted_keys: dict[tuple[str | int, ...], None] = field(default_factory=dict)
    # Pre-prepares accepted here in recent views, to catch a primary that showed others
    # a different batch (seen later in a certificate). Bounded to ACCEPTED_VIEWS views.
    accepted: dict[int, Proposal] = field(default_factory=dict)
    last_progress_ms: int = 0

    def accept(self, proposal: Proposal) -> None:
        self.proposal = proposal
        self.accepted[proposal.view] = proposal
        while len(self.accepted) > ACCEPTED_VIEWS:
            del self.accepted[min(self.accepted)]

    def conflicting(self, proposal: Proposal) -> Proposal | None:
        """What this slot accepted in `proposal`'s view, if it differs: equivocation."""
        seen = self.accepted.get(proposal.view)
        if seen is not None and seen.entry_digest != proposal.entry_digest:
            return seen
        return None

    def reset_view(self) -> None:
        self.proposal = None
        self.prepares = {}
        self.commits = {}
        self.own_prepare = None
        self.own_commit = None
        self.prepared_in_view = False

    def matching(self, votes: dict[int, tuple[bytes, bytes]], digest: bytes) -> list[bytes]:
        """Raw votes for `digest`, in replica-id order so certificates are deterministic."""
        return [raw for replica, (vote, raw) in sorted(votes.items()) if vote == digest]
