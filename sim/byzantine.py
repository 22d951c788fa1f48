"""Byzantine replicas: wrappers that rewrite, withhold or duplicate a replica's outgoing messages.

A Byzantine replica runs the unmodified core; its behaviour sits between the core
and the network. It holds only its own signing key, so it can sign anything as
itself and nothing as anyone else. Behaviours in one simulation share an
`Adversary`, so several Byzantine replicas can collude (split the correct
replicas the same way, vote for the same forked batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crypto.keys import Principal, SigningKey
from pbft.chain import batch_digest, entry_digest
from pbft.codec import DecodeError
from pbft.messages import MESSAGE_CLASSES, Commit, Message, MessageType, Prepare, PrePrepare
from pbft.signed import Envelope, seal


@dataclass
class Adversary:
    """What colluding Byzantine replicas share: who sees which fork, and the forks made."""

    # Correct replicas that are shown the forked history ("side B"); the rest see the original.
    fork_side: frozenset[int]
    # Original entry digest -> forked entry digest, so votes and later entries follow the fork.
    forked_entries: dict[bytes, bytes] = field(default_factory=dict)
    forked_pre_prepares: dict[tuple[int, int], bytes] = field(default_factory=dict)

    @classmethod
    def for_cluster(cls, replica_count: int, byzantine: frozenset[int]) -> Adversary:
        correct = [replica for replica in range(replica_count) if replica not in byzantine]
        return cls(frozenset(correct[len(correct) // 2 :]))


def _decode(data: bytes) -> Message | None:
    """Read our own outgoing message; no signature check is needed for what we signed."""
    try:
        envelope = Envelope.decode(data)
        return MESSAGE_CLASSES[MessageType(envelope.type_code)].decode(envelope.body)
    except (DecodeError, ValueError, KeyError):
        return None


class Behavior:
    name = "correct"

    def __init__(self, replica_id: int, key: SigningKey, adversary: Adversary) -> None:
        self.replica_id = replica_id
        self.key = key
        self.adversary = adversary

    def outgoing(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        """The messages actually sent to `destination` in place of `data`."""
        return [data]


class Silent(Behavior):
    """Sends nothing at all, to anyone: a replica that is up but mute."""

    name = "silent"

    def outgoing(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return []


class Equivocate(Behavior):
    """As primary, proposes a different batch at each sequence number to the correct replicas
    on the fork side; as any replica, votes for the forked batches towards that side."""

    name = "equivocate"

    def outgoing(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        if destination[0] != "replica" or destination[1] not in self.adversary.fork_side:
            return [data]
        message = _decode(data)
        if isinstance(message, PrePrepare):
            forked = self._fork(message)
            return [forked if forked is not None else data]
        if isinstance(message, Prepare | Commit):
            forked_digest = self.adversary.forked_entries.get(message.entry_digest)
            if forked_digest is not None:
                vote = type(message)(message.view, message.seq, message.replica, forked_digest)
                return [seal(vote, self.key)]
        return [data]

    def _fork(self, original: PrePrepare) -> bytes | None:
        slot = (original.view, original.seq)
        known = self.adversary.forked_pre_prepares.get(slot)
        if known is not None:
            return known
        prev_hash = self.adversary.forked_entries.get(original.prev_hash, original.prev_hash)
        # Drop the last request: a valid batch that differs from the original one.
        requests = original.requests[:-1]
        if not original.requests and prev_hash == original.prev_hash:
            return None
        forked = PrePrepare(
            original.view,
            original.seq,
            original.replica,
            prev_hash,
            batch_digest(requests),
            requests,
        )
        raw = seal(forked, self.key)
        original_entry = entry_digest(original.seq, original.prev_hash, original.batch_digest)
        self.adversary.forked_entries[original_entry] = entry_digest(
            forked.seq, forked.prev_hash, forked.batch_digest
        )
        self.adversary.forked_pre_prepares[slot] = raw
        return raw


BEHAVIORS: dict[str, type[Behavior]] = {
    behavior.name: behavior for behavior in (Silent, Equivocate)
}
