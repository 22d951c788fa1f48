"""The behaviour registry: every Byzantine behaviour by name, and building one for a
[[byzantine]] entry of a scenario. The scenario loader and the fuzzer take names,
parameters and kinds from here: this is their one source."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from crypto.keys import KeyRing, SigningKey
from pbft.config import ClusterConfig
from pbft.ledger import Account
from sim.adversary.base import Adversary, Behavior, Silent
from sim.adversary.clients import (
    AbuseHolds,
    ClientBehavior,
    ClientReplay,
    ReuseRequestId,
    Steal,
)
from sim.adversary.noise import Forge, Garbage, Replay, WrongReply
from sim.adversary.proposals import (
    BadChain,
    BadSequence,
    BadTimestamp,
    Censor,
    Equivocate,
    InvalidBatch,
    Slow,
)
from sim.adversary.twins import Twin
from sim.adversary.viewchange import BadCheckpoint, BadNewView, LieInViewChange, ViewChangeSpam
from sim.adversary.votes import DoubleVote, VoteWithoutProposal, WithholdVotes

BEHAVIORS: dict[str, type[Behavior]] = {
    behavior.name: behavior
    for behavior in (
        Silent,
        Equivocate,
        Slow,
        Censor,
        InvalidBatch,
        BadSequence,
        BadChain,
        BadTimestamp,
        DoubleVote,
        VoteWithoutProposal,
        WithholdVotes,
        WrongReply,
        Replay,
        Garbage,
        ViewChangeSpam,
        LieInViewChange,
        BadNewView,
        BadCheckpoint,
        Forge,
        Twin,
    )
}

CLIENT_BEHAVIORS: dict[str, type[ClientBehavior]] = {
    behavior.name: behavior for behavior in (ReuseRequestId, ClientReplay, Steal, AbuseHolds)
}


def build_behavior(
    behavior: str,
    replica_id: int,
    key: SigningKey,
    adversary: Adversary,
    *,
    config: ClusterConfig,
    params: Mapping[str, int | str] | None = None,
    at_ms: int = 0,
    until_ms: int | None = None,
    genesis_ledger_digest: bytes | None = None,
    keyring: KeyRing | None = None,
) -> Behavior:
    """The behaviour of one [[byzantine]] entry of a scenario."""
    factory: Callable[..., Behavior] = BEHAVIORS[behavior]
    return factory(
        replica_id,
        key,
        adversary,
        config=config,
        replica_ids=tuple(config.replica_ids()),
        params=params,
        at_ms=at_ms,
        until_ms=until_ms,
        genesis_ledger_digest=genesis_ledger_digest,
        keyring=keyring,
    )


def build_client_behavior(
    behavior: str,
    client_id: int,
    key: SigningKey,
    *,
    config: ClusterConfig,
    accounts: Mapping[str, Account],
    params: Mapping[str, int | str] | None = None,
    at_ms: int = 0,
    until_ms: int | None = None,
) -> ClientBehavior:
    """The behaviour of one [[byzantine]] entry of a scenario that names a client."""
    factory: Callable[..., ClientBehavior] = CLIENT_BEHAVIORS[behavior]
    return factory(
        client_id,
        key,
        config=config,
        accounts=accounts,
        params=params,
        at_ms=at_ms,
        until_ms=until_ms,
    )
