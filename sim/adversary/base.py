"""What every Byzantine replica behaviour shares: the colluders' common state (`Adversary`),
the `Behavior` base class (a wrapper around what an unmodified core sends, acting only in
its window of simulated time), `Silent`, and helpers to read what the core wrote and to
make up deterministic lies."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from crypto.keys import KeyRing, Principal, SigningKey
from pbft.codec import DecodeError
from pbft.config import ClusterConfig
from pbft.messages import MESSAGE_CLASSES, Message, MessageType, ViewChange
from pbft.signed import Envelope

# Most entries a behaviour remembers in one table (rewritten proposals, digest maps):
# enough for several watermark windows, never more whatever the run length.
MEMORY_LIMIT = 4096

K = TypeVar("K")
V = TypeVar("V")


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


def decode_own(data: bytes) -> Message | None:
    """Read our own outgoing message; no signature check is needed for what we signed."""
    try:
        envelope = Envelope.decode(data)
        return MESSAGE_CLASSES[MessageType(envelope.type_code)].decode(envelope.body)
    except (DecodeError, ValueError, KeyError):
        return None


def type_code_of(data: bytes) -> int | None:
    try:
        return Envelope.decode(data).type_code
    except DecodeError:
        return None


def remember(table: dict[K, V], key: K, value: V) -> None:
    """Insert into a bounded table, forgetting the oldest entry when it is full."""
    table[key] = value
    while len(table) > MEMORY_LIMIT:
        del table[next(iter(table))]


def made_up(tag: bytes, *parts: bytes | int) -> bytes:
    """A random-looking 32-byte digest that is a pure function of its inputs."""
    hasher = hashlib.sha256(b"pbft-sim/byzantine/" + tag)
    for part in parts:
        hasher.update(part.to_bytes(8, "big") if isinstance(part, int) else part)
    return hasher.digest()


def view_of(message: Message | None) -> int | None:
    if isinstance(message, ViewChange):
        return message.new_view
    view = getattr(message, "view", None)
    return view if isinstance(view, int) else None


class Behavior:
    """Correct behaviour; subclasses override `act` (inside the window) and maybe `idle`.

    A subclass names itself (`name`), the parameters a scenario entry may give it besides
    replica, behavior, at_ms and until_ms (`PARAMETERS`), and, if it takes `kind`, its
    kinds, the first one the default (`KINDS`). The scenario loader (sim/scenario/) and
    the fuzzer read them from sim/adversary/registry.py: this is their one source."""

    name = "correct"
    PARAMETERS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        replica_id: int,
        key: SigningKey,
        adversary: Adversary,
        *,
        config: ClusterConfig | None = None,
        replica_ids: Sequence[int] | None = None,
        params: Mapping[str, int | str] | None = None,
        at_ms: int = 0,
        until_ms: int | None = None,
        genesis_ledger_digest: bytes | None = None,
        keyring: KeyRing | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.key = key
        self.adversary = adversary
        self.config = config if config is not None else ClusterConfig()
        self.replica_ids = (
            tuple(replica_ids) if replica_ids is not None else tuple(self.config.replica_ids())
        )
        self.params = dict(params or {})
        self.at_ms = at_ms
        self.until_ms = until_ms
        self.genesis_ledger_digest = genesis_ledger_digest
        # The cluster's public keys (everyone has them): to check what it builds as others would.
        self.keyring = keyring
        self.setup()

    def setup(self) -> None:
        """Per-behaviour state and parameters; called once the common fields are set."""

    def active(self, now_ms: int) -> bool:
        return now_ms >= self.at_ms and (self.until_ms is None or now_ms < self.until_ms)

    def outgoing(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        """The messages actually sent to `destination` in place of `data`."""
        if self.active(now_ms):
            return self.act(destination, data, now_ms)
        return self.idle(destination, data, now_ms)

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return [data]

    def idle(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return [data]


class Silent(Behavior):
    """Sends nothing at all, to anyone: a replica that is up but mute."""

    name = "silent"

    def act(self, destination: Principal, data: bytes, now_ms: int) -> list[bytes]:
        return []
