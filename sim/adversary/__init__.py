"""Byzantine replicas and clients, the simulator's adversary: wrappers that rewrite,
withhold or duplicate what an unmodified core sends.

A Byzantine replica runs the unmodified core; its behaviour sits between the core
and the network. It holds only its own signing key, so it can sign anything as
itself and nothing as anyone else. Behaviours in one simulation share an
`Adversary`, so several Byzantine replicas can collude (split the correct
replicas the same way, vote for the same forked batches). `twin` is the exception
that rewrites nothing: the simulator runs a second copy of the replica with the same
key and splits the network between the copies (`Twins`).

A Byzantine client (`ClientBehavior`) wraps the actions of an unmodified client core
the same way: it holds only its own key, so what it adds are requests it signed.

Every behaviour is deterministic: it reads no clock but the `now_ms` it is given and
draws no random numbers; what looks random (a made-up digest, garbage bytes) is a
hash of its inputs. Memory is bounded whatever the run length.

A behaviour acts only in its window [at_ms, until_ms) of simulated time; outside it
the replica's messages go out as the core wrote them (`idle`). Two exceptions keep a
replica that stopped lying consistent with what it already said: `slow` still releases
what it held back, and the proposal rewriters keep chaining new pre-prepares (and
votes) onto the entries they rewrote, rather than onto entries nobody ever saw.

Modules: base (Adversary, Behavior, Silent), proposals (as primary), votes (as backup),
viewchange (view changes and checkpoints), noise (lies to clients, replays, garbage,
forged senders), twins, clients (Byzantine clients), registry (every behaviour by name).
"""

from sim.adversary.base import Adversary, Behavior, Silent
from sim.adversary.clients import (
    AbuseHolds,
    ClientBehavior,
    ClientReplay,
    ReuseRequestId,
    Steal,
)
from sim.adversary.noise import Forge, Garbage, Replay, WrongReply, flip_reply
from sim.adversary.proposals import (
    BadChain,
    BadSequence,
    BadTimestamp,
    Censor,
    Equivocate,
    InvalidBatch,
    Slow,
)
from sim.adversary.registry import (
    BEHAVIORS,
    CLIENT_BEHAVIORS,
    build_behavior,
    build_client_behavior,
)
from sim.adversary.twins import Twin, Twins
from sim.adversary.viewchange import BadCheckpoint, BadNewView, LieInViewChange, ViewChangeSpam
from sim.adversary.votes import DoubleVote, VoteWithoutProposal, WithholdVotes

__all__ = [
    "BEHAVIORS",
    "CLIENT_BEHAVIORS",
    "AbuseHolds",
    "Adversary",
    "BadChain",
    "BadCheckpoint",
    "BadNewView",
    "BadSequence",
    "BadTimestamp",
    "Behavior",
    "Censor",
    "ClientBehavior",
    "ClientReplay",
    "DoubleVote",
    "Equivocate",
    "Forge",
    "Garbage",
    "InvalidBatch",
    "LieInViewChange",
    "Replay",
    "ReuseRequestId",
    "Silent",
    "Slow",
    "Steal",
    "Twin",
    "Twins",
    "ViewChangeSpam",
    "VoteWithoutProposal",
    "WithholdVotes",
    "WrongReply",
    "build_behavior",
    "build_client_behavior",
    "flip_reply",
]
