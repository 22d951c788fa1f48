"""The replica: one sans-I/O state machine for the whole protocol, made of parts.

`Replica.handle(event) -> list[Action]`. Events are bytes from the network and
clock ticks; actions are sends, durable writes, executions and notes. The replica
never reads a clock, touches a socket or draws a random number: the simulator and
the trio runtime drive the same code.

The protocol (any n >= 4, f = (n - 1) // 3, quorum q = ceil((n + f + 1) / 2) from
pbft/config.py, which is 2f + 1 when n = 3f + 1; primary = view mod n), by part:
- pbft/ordering.py, the normal case (PBFT): the primary batches client requests into a
  PRE-PREPARE chained to the previous entry's digest; backups PREPARE it; q - 1
  matching prepares make a replica prepared and it COMMITs; q matching commits make the
  entry committed, and committed entries execute strictly in sequence order. Chain
  rule: a backup prepares entry s only once entry s - 1 is prepared (or committed, or
  the checkpoint) with the digest s names as its predecessor, so the prepared entries
  always form one chain, which view change relies on.
- pbft/requests.py: which client requests are admitted (quotas) and in what order they
  are batched.
- pbft/viewchanges.py, liveness (Raft): the primary sends heartbeats when idle. A backup
  whose timer expires (no heartbeat, or work that does not complete) sends SUSPECT;
  f + 1 suspicions of the same view start a VIEW-CHANGE, so one cut-off replica cannot
  unseat a working primary. f + 1 view changes for higher views make a replica join.
- pbft/checkpoints.py: checkpoints every K entries; a quorum of matching ones are stable
  and move the window.
- pbft/catchup.py: a replica that sees the others ahead FETCHes commit certificates, or
  a stable checkpoint's state with its proof, verifies them and applies them. The state
  comes in chunks, each proven against the checkpoint's ledger digest
  (pbft/statetransfer.py); what a replica sends to each catching-up peer is paid from a
  byte budget.
- pbft/recovery.py: rebuilding the parts from what was persisted.

This module is the facade: the shared context (pbft/context.py) and the router. Every
message class the replica takes is matched in `_route`, and every timeout that fires is
named in `_on_tick`: what moves the state machine starts in this file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.catchup import CatchUp
from pbft.certificates import Verifier
from pbft.checkpoints import Checkpoints
from pbft.config import ClusterConfig
from pbft.context import Context, ReplicaInvariantError, StableCheckpoint
from pbft.drops import DropReason
from pbft.events import Action, Event, Executed, MessageReceived, Tick
from pbft.genesis import compute_cluster_id
from pbft.history import HistoryReader
from pbft.ledger import Account, Ledger
from pbft.lookups import Lookups
from pbft.messages import (
    BalanceQuery,
    Checkpoint,
    CheckpointState,
    Commit,
    CommitCertificate,
    Fetch,
    Heartbeat,
    LookupQuery,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    Request,
    StateChunk,
    StateRequest,
    StatusQuery,
    Suspect,
    ViewChange,
)
from pbft.ordering import Ordering
from pbft.recovery import Recovery
from pbft.requests import Requests
from pbft.signed import Opened, Rejected, peek, verify_signature
from pbft.status import ViewStatus
from pbft.timeout import Timeout
from pbft.viewchanges import ViewChanges


@dataclass(frozen=True)
class ReplicaStatistics:
    replica_id: int
    view: int
    status: ViewStatus
    last_executed: int
    stable_checkpoint: int
    view_changes_started: int
    new_views_installed: int
    messages_sent: int
    pending_requests: int
    drops: dict[str, int]
    evidence: int
    halted: str | None


class Replica(Context):
    """The facade: routes events to the parts and hands back what they produced. It is the
    parts' shared `Context` and owns the parts."""

    def __init__(
        self,
        replica_id: int,
        config: ClusterConfig,
        signing_key: SigningKey,
        keyring: KeyRing,
        genesis_accounts: Mapping[str, Account],
        *,
        records: Mapping[tuple[str | int, ...], bytes] | None = None,
        cache: VerificationCache | None = None,
        lost_votes: bool = False,
        history: HistoryReader | None = None,
    ) -> None:
        if replica_id not in config.replica_ids():
            raise ValueError(f"replica id {replica_id} not in 0..{config.replica_count - 1}")
        if keyring.get(("replica", replica_id)) != signing_key.verify_key:
            raise ValueError(f"the key ring holds another key for replica {replica_id}")
        ledger = Ledger(genesis_accounts, config.dedup_window, config.ledger_limits())
        genesis_snapshot = ledger.snapshot()
        genesis_digest = ledger.digest()
        verifier = Verifier(config, keyring, genesis_digest, cache)
        cluster_id = compute_cluster_id(config, keyring, genesis_accounts)
        super().__init__(replica_id, config, signing_key, verifier, cluster_id)
        self.ordering: Ordering = Ordering(self, ledger)
        self.requests: Requests = Requests(self)
        genesis = StableCheckpoint(
            0, verifier.genesis_chain_hash, genesis_digest, genesis_snapshot, ()
        )
        self.checkpoints: Checkpoints = Checkpoints(self, genesis)
        self.viewchanges: ViewChanges = ViewChanges(self)
        self.catchup: CatchUp = CatchUp(self)
        # `history`: what lookups read (pbft/history.py); the driver writes it from the
        # Executed outputs. None: this replica keeps none and answers every lookup not_held.
        self.lookups = Lookups(self, history)
        # Send again what is not yet stable or installed (checkpoints, our VIEW-CHANGE).
        self.retransmit_timeout = Timeout("retransmit", config.retransmit_interval_ms, started_ms=0)
        self.fresh_start = True
        # What recovery re-executed from the checkpoint: the driver feeds it to its history
        # store before the first event (pbft.history.HistoryStore.record is idempotent).
        self.recovered_executions: tuple[Executed, ...] = ()
        if records:
            self.recovered_executions = Recovery(self).recover(records)
        # `lost_votes`: storage repaired a torn last batch, whose votes may have been sent
        # (a disk that lied about the fsync, a file cut at its last boundary). Signing
        # again in that view could contradict them, so sign no PRE-PREPARE, PREPARE, COMMIT
        # or NEW-VIEW until we install a NEW-VIEW another replica made for a later view.
        # Not just "a later view": one lost event can both enter view w and, as w's
        # primary, sign its NEW-VIEW and PRE-PREPAREs; a backup's votes in w come from a
        # later event than the one that entered w, so w is then the recovered view.
        # Meanwhile we follow by catch-up (commit certificates, checkpoints).
        if lost_votes:
            self.silent_through_view = self.view

    # --- read-only views for drivers and observers --------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self.ordering.ledger

    @property
    def last_executed(self) -> int:
        return self.ordering.last_executed

    @property
    def next_seq(self) -> int:
        return self.ordering.next_seq

    @property
    def stable(self) -> StableCheckpoint:
        return self.checkpoints.stable

    @property
    def new_view_message(self) -> bytes | None:
        return self.viewchanges.new_view_message

    # --- the driver's interface ---------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        self.outbox = []
        if self.halted is not None:
            self.count_drop(DropReason.HALTED)
        elif isinstance(event, Tick):
            self._on_tick(event.now_ms, event.wall_ms)
        elif isinstance(event, MessageReceived):
            self._on_bytes(event.data, event.link)
        else:
            raise TypeError(f"not an event: {event!r}")
        out, self.outbox = self.outbox, []
        return out

    def statistics(self) -> ReplicaStatistics:
        return ReplicaStatistics(
            replica_id=self.id,
            view=self.view,
            status=self.status,
            last_executed=self.ordering.last_executed,
            stable_checkpoint=self.checkpoints.stable.seq,
            view_changes_started=self.viewchanges.view_changes_started,
            new_views_installed=self.viewchanges.new_views_installed,
            messages_sent=self.messages_sent,
            pending_requests=len(self.requests.pending),
            drops=dict(sorted(self.drops.items())),
            evidence=len(self.evidence),
            halted=self.halted,
        )

    def _on_bytes(self, data: bytes, link: Principal | None) -> None:
        try:
            envelope, message = peek(data)
            if message.SIGNER == "replica" and message.sender == self.id:
                raise Rejected(DropReason.FROM_SELF)
            handler = self._route(message)
            if self._is_stale(message):
                # Late votes for what is already executed: not worth a signature check.
                self.count_drop(DropReason.STALE)
                self.catchup.help_laggard(envelope, message)
                return
            if self.ordering.is_redundant(message):
                # The slot already has the quorum this vote would add to.
                self.count_drop(DropReason.REDUNDANT_VOTE)
                return
            if isinstance(message, Request) and self.requests.refused_for_quota(message, link):
                # A flood from a client over its quota costs a parse, not a signature check.
                raise Rejected(DropReason.CLIENT_QUOTA_FULL, f"client {message.client_id}")
            verify_signature(envelope, message, self.verifier.keyring, self.verifier.cache)
            handler(Opened(message, data, envelope.body, link))
        except Rejected as rejection:
            self.drop(rejection.reason, rejection.detail)

    def _route(self, message: Message) -> Callable[[Opened], None]:
        """Which handler takes a message, by its class: every message the replica accepts
        from the network is named here (and the handler's signature says what it gets).
        Called before the signature check; the handler runs only once it passed."""
        match message:
            case Request():
                return partial(self.requests.on_request, message)
            case PrePrepare():
                return partial(self.ordering.on_pre_prepare, message)
            case Prepare() | Commit():
                return partial(self.ordering.on_vote, message)
            case Heartbeat():
                return partial(self.viewchanges.on_heartbeat, message)
            case Suspect():
                return partial(self.viewchanges.on_suspect, message)
            case Checkpoint():
                return partial(self.checkpoints.on_checkpoint, message)
            case ViewChange():
                return partial(self.viewchanges.on_view_change, message)
            case NewView():
                return partial(self.viewchanges.on_new_view, message)
            case Fetch():
                return partial(self.catchup.on_fetch, message)
            case CheckpointState():
                return partial(self.catchup.on_checkpoint_state, message)
            case StateChunk():
                return partial(self.catchup.on_state_chunk, message)
            case StateRequest():
                return partial(self.catchup.on_state_request, message)
            case CommitCertificate():
                return partial(self.catchup.on_commit_certificate, message)
            case BalanceQuery():
                return partial(self.requests.on_balance_query, message)
            case LookupQuery():
                return partial(self.lookups.on_query, message)
            case StatusQuery():
                return partial(self.lookups.on_status_query, message)
            case _:
                # Replies, balance replies, lookup and status answers are for clients; a
                # replica never takes them.
                raise Rejected(DropReason.UNEXPECTED_TYPE, type(message).__name__)

    def _is_stale(self, message: Message) -> bool:
        if isinstance(message, PrePrepare | Prepare | Commit):
            return (
                message.seq <= self.ordering.last_executed
                or message.seq <= self.checkpoints.stable.seq
            )
        if isinstance(message, Checkpoint):
            return message.seq <= self.checkpoints.stable.seq
        return False

    def _on_tick(self, now_ms: int, wall_ms: int | None) -> None:
        """Tick each named timeout; the ones that fired call on_<name>_timeout."""
        if now_ms < self.now_ms:
            raise ReplicaInvariantError(f"clock went back from {self.now_ms} to {now_ms}")
        self.now_ms = now_ms
        # A wall clock may step back (NTP); batch timestamps stay monotonic regardless.
        self.wall_ms = now_ms if wall_ms is None else max(0, wall_ms)
        if self.fresh_start:
            self._on_start()
        if self.status is ViewStatus.NORMAL:
            if self.is_primary:
                self.ordering.maybe_propose()
                if self.viewchanges.heartbeat_timeout.fired(now_ms):
                    self.viewchanges.on_heartbeat_timeout()
            elif self.viewchanges.primary_timeout.fired(now_ms):
                self.viewchanges.on_primary_timeout()
            elif self.viewchanges.request_timer_fired():
                self.viewchanges.on_request_timeout()
            else:
                self.viewchanges.watch_progress()
        elif self.viewchanges.view_change_timeout.fired(now_ms):
            self.viewchanges.on_view_change_timeout()
        if self.retransmit_timeout.fired(now_ms):
            self._on_retransmit_timeout()
        if self.status is ViewStatus.NORMAL:
            self.ordering.retransmit_slots()
        self.catchup.maybe_fetch()

    def _on_start(self) -> None:
        """The first tick after construction (or recovery): time starts now."""
        self.fresh_start = False
        self.viewchanges.primary_timeout.start(self.now_ms)
        self.ordering.last_execution_ms = self.now_ms
        self.catchup.fetch_timeout.stop()
        if self.ordering.last_executed > 0 or self.view > 0:
            self.catchup.fetch()

    def _on_retransmit_timeout(self) -> None:
        """Send again what is not yet stable or installed, once an interval."""
        self.retransmit_timeout.start(self.now_ms)
        self.checkpoints.retransmit()
        self.viewchanges.retransmit()
