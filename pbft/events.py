"""What goes into the replica and client cores (events) and what comes out (actions).

A driver (the simulator or the trio runtime) does not carry out the actions itself:
pbft/host.py steps the core and hands the driver a `Ready`, writing every `Persist`
of the step before any message of it leaves (a `Persist` always precedes, in the
list, the sends that depend on it; the host loop makes the whole step durable first),
unless all of the step's records are deferrable (see `Persist`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from crypto.keys import Principal
from pbft.operations import Posting, Release

# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageReceived:
    """Bytes from the network. The sender is whoever signed them, never the link they came on.

    `link` is the authenticated peer that delivered them, when the driver knows it. It
    never stands in for a signature; it only says whose budget the message is charged to:
    a client's request relayed by a backup is charged to that backup, not to the client
    (see `Requests._relay_share`, pbft/requests.py)."""

    data: bytes
    link: Principal | None = None


@dataclass(frozen=True)
class Tick:
    """The driver's clock, in ms. The only notion of time the cores have.

    `now_ms` runs the timers and must never go back. `wall_ms`, if the driver has one, is
    the clock batch timestamps are compared against: it must agree across replicas (Unix
    time in the runtime, whose `now_ms` counts from each process's start). Without it the
    core takes `now_ms` (the simulator, where every replica's clock counts from one zero)."""

    now_ms: int
    wall_ms: int | None = None


Event = MessageReceived | Tick

# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    to: Principal
    data: bytes


@dataclass(frozen=True)
class Broadcast:
    """Send to every replica but oneself."""

    data: bytes


@dataclass(frozen=True)
class Persist:
    """Write `value` under `key` durably before carrying out any later action; None deletes.

    `deferrable` records may become durable after the messages of their own step have left
    (still in step order, ahead of any later record): nothing this replica says depends on
    them, because they only hold what others already made durable (a commit certificate:
    2f + 1 replicas' COMMITs, each written before it was sent; a stable checkpoint: 2f + 1
    CHECKPOINTs over a state re-execution rebuilds). See pbft/host.py for the whole rule.
    """

    key: tuple[str | int, ...]
    value: bytes | None
    deferrable: bool = False


@dataclass(frozen=True)
class ExecutedRequest:
    client_id: int
    request_id: int
    request_digest: bytes
    payer: str
    payee: str
    amount: int
    outcome: str
    reason: str
    # False when the ledger already held a decision for this request (a re-proposal).
    fresh: bool
    op: str
    ref_client: int
    ref_request: int
    expires_in_ms: int
    # What it did to each account, in a fixed order; empty unless confirmed and fresh.
    postings: tuple[Posting, ...]


@dataclass(frozen=True)
class Executed:
    """A committed batch was applied to the ledger (for observers: checkers, metrics, apps,
    history)."""

    view: int
    seq: int
    entry_digest: bytes
    requests: tuple[ExecutedRequest, ...]
    # The batch's agreed timestamp, the only time the ledger decides expiry against.
    timestamp_ms: int
    # The replica that proposed the batch (the primary of `view`).
    primary: int
    batch_digest: bytes
    # Holds that expired by `timestamp_ms`, released before the batch's first request.
    released: tuple[Release, ...]


class NoteKind(StrEnum):
    """What a `Note` is about. A StrEnum: each kind is still the string traces and logs show."""

    DROP = "drop"
    EVIDENCE = "evidence"
    SUSPECT = "suspect"
    VIEW_CHANGE = "view_change"
    NEW_VIEW = "new_view"
    VOTING = "voting"
    CHECKPOINT_STABLE = "checkpoint_stable"
    STATE_TRANSFER = "state_transfer"
    STATE_TOO_LARGE = "state_too_large"
    HALT = "halt"


@dataclass(frozen=True)
class Note:
    """A notable event for the trace and logs: view change, checkpoint, drop, evidence.

    `detail` is for people (for a drop it starts with the reason); `reason` is the drop
    reason alone (a pbft.drops.DropReason), for counters and filters, empty for other
    kinds. Drivers read it, never parse `detail`."""

    kind: str
    detail: str
    reason: str = ""


Action = Send | Broadcast | Persist | Executed | Note
