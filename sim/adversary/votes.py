"""As backup: how a Byzantine replica votes."""

from __future__ import annotations

from crypto.keys import Principal
from pbft.messages import Commit, MessageType, Prepare
from pbft.signed import seal
from sim.adversary.base import Behavior, decode_own, made_up, type_code_of


class DoubleVote(Behavior):
    """Sends conflicting PREPAREs and COMMITs: the real vote to one half of the correct
    replicas, a vote for a made-up digest (a hash of the real one) to the other half
    (the Adversary's fork side, so colluders split the replicas the same way)."""

    name = "double_vote"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
            return [data]
        message = decode_own(data)
        if not isinstance(message, Prepare | Commit):
            return [data]
        fake = made_up(b"double-vote", message.entry_digest)
        return [seal(type(message)(message.view, message.seq, message.replica, fake), self.key)]


class VoteWithoutProposal(Behavior):
    """Whenever it sends a vote at (view, seq), also sends a PREPARE and a COMMIT for each of
    seq + 1 .. seq + 3, for made-up digests of entries nobody proposed."""

    name = "vote_without_proposal"
    AHEAD = 3

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        message = decode_own(data)
        if not isinstance(message, Prepare | Commit):
            return [data]
        out = [data]
        for seq in range(message.seq + 1, message.seq + 1 + self.AHEAD):
            digest = made_up(b"phantom", message.view, seq)
            for kind in (Prepare, Commit):
                out.append(seal(kind(message.view, seq, message.replica, digest), self.key))
        return out


class WithholdVotes(Behavior):
    """Never sends a PREPARE or a COMMIT; everything else goes out as the core wrote it."""

    name = "withhold_votes"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if type_code_of(data) in (MessageType.PREPARE, MessageType.COMMIT):
            return []
        return [data]
