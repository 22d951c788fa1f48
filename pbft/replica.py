"""The replica: one sans-I/O state machine for the whole protocol.

`Replica.handle(event) -> list[Action]`. Events are bytes from the network and
clock ticks; actions are sends, durable writes, executions and notes. The replica
never reads a clock, touches a socket or draws a random number: the simulator and
the trio runtime drive the same code.

The protocol (any n >= 4, f = (n - 1) // 3, quorum q = ceil((n + f + 1) / 2) from
pbft/config.py, which is 2f + 1 when n = 3f + 1; primary = view mod n):
- Normal case (PBFT): the primary batches client requests into a PRE-PREPARE
  chained to the previous entry's digest; backups PREPARE it; q - 1 matching prepares
  make a replica prepared and it COMMITs; q matching commits make the entry
  committed, and committed entries execute strictly in sequence order.
- Chain rule: a backup prepares entry s only once entry s - 1 is prepared (or
  committed, or the checkpoint) with the digest s names as its predecessor. So the
  prepared entries always form one chain, which view change relies on.
- Liveness (Raft): the primary sends heartbeats when idle. A backup whose timer
  expires (no heartbeat, or work that does not complete) sends SUSPECT; f + 1
  suspicions of the same view start a VIEW-CHANGE, so one cut-off replica cannot
  unseat a working primary. f + 1 view changes for higher views make a replica join.
- Checkpoints every K entries; a quorum of matching ones are stable and move the window.
- Catch-up: a replica that sees the others ahead FETCHes commit certificates, or a
  stable checkpoint's state with its proof, verifies them and applies them. The state
  comes in chunks, each proven against the checkpoint's ledger digest (pbft/statetransfer.py);
  what a replica sends to each catching-up peer is paid from a byte budget.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.budget import TokenBuckets
from pbft.certificates import Proposal, Verifier
from pbft.chain import batch_digest
from pbft.codec import MAX_FRAME_BYTES, MAX_LOCAL_RECORD_BYTES, DecodeError, pack, unpack
from pbft.config import ClusterConfig
from pbft.events import (
    Action,
    Broadcast,
    Event,
    Executed,
    ExecutedRequest,
    MessageReceived,
    Note,
    Persist,
    Send,
    Tick,
)
from pbft.genesis import compute_cluster_id
from pbft.ledger import Account, Ledger, LedgerSnapshotError, Payment
from pbft.log import CommittedEntry, PreparedEntry, Slot
from pbft.messages import (
    BalanceQuery,
    BalanceReply,
    Checkpoint,
    CheckpointState,
    Commit,
    CommitCertificate,
    Fetch,
    Heartbeat,
    Message,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Reply,
    Request,
    StateChunk,
    StateRequest,
    Suspect,
    ViewChange,
)
from pbft.replies import SignedReplies
from pbft.signed import Envelope, Opened, Rejected, peek, seal, verify_signature
from pbft.statetransfer import (
    OFFER_BYTES,
    ChunkRejected,
    ChunkServer,
    IncomingTransfer,
    StateTooLarge,
)
from pbft.viewchange import NewViewPlan, VerifiedViewChange, plan_new_view, verify_view_change

EVIDENCE_LIMIT = 64
RETRANSMIT_SLOT_LIMIT = 8
FORWARD_ON_NEW_VIEW_LIMIT = 256
CHECKPOINT_RETRANSMIT_LIMIT = 2
# Unsolicited help to a replica stuck on an executed entry: one certificate, enough to
# show it is behind (it then FETCHes, on its byte budget); see _help_laggard.
HELP_CERTIFICATE_LIMIT = 1
OWN_VIEW_CHANGES_KEPT = 4
# Replies the ledger does not store a decision for: never kept for retransmissions.
UNSTORED_REASON_CODES = ("id_reused", "request_expired")
# A state transfer that got no chunk for this many retransmit intervals asks another replica.
STATE_TRANSFER_TIMEOUT_INTERVALS = 25
# A request may wait this many view-change timeouts while the primary keeps executing
# (one timeout while it does not): see _watch_primary.
REQUEST_TIMEOUTS_UNDER_LOAD = 4
# Of each batch, at most this fraction goes to clients over their quota (see _next_batch).
OVER_QUOTA_BATCH_SHARE = 4
# Of the batches in flight, at most this fraction may hold nothing but requests of clients
# over their quota, so that a correct client's request finds the pipeline open (see
# _maybe_propose).
OVER_QUOTA_PIPELINE_SHARE = 2
# The primary orders at most this many requests a second of clients over their quota, all
# such clients together (see _next_batch). Every request ordered costs every replica a
# signature check, an execution and a signed reply; a client past its quota broke the
# client contract, and ordering its backlog as fast as the pipeline allows made the
# client_flood attack cost correct clients several times their latency.
OVER_QUOTA_ORDER_RATE_PER_S = 50


class ReplicaInvariantError(RuntimeError):
    """A local bug: the replica's own state broke a rule it maintains. Never caused by peers."""


@dataclass(frozen=True)
class StableCheckpoint:
    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    snapshot: bytes
    proof: tuple[bytes, ...]


@dataclass(frozen=True)
class Anchor:
    """A checkpoint proven by 2f + 1 signatures (from a NEW-VIEW) that is ahead of our own
    stable checkpoint: the chain hash there is certain, but we do not hold that state."""

    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    proof: tuple[bytes, ...]

    def encode(self) -> bytes:
        return pack([self.seq, self.chain_hash, self.ledger_digest, list(self.proof)])


@dataclass
class PendingRequest:
    opened: Opened
    body_digest: bytes
    arrived_ms: int
    # The replica this request is charged to, when the primary admitted it on that
    # replica's relay beyond its client's quota or the table's; None: charged to its client.
    relayer: int | None = None


@dataclass(frozen=True)
class ReplicaStatistics:
    replica_id: int
    view: int
    view_active: bool
    last_executed: int
    stable_checkpoint: int
    view_changes_started: int
    new_views_installed: int
    messages_sent: int
    pending_requests: int
    drops: dict[str, int]
    evidence: int
    halted: str | None


class Replica:
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
    ) -> None:
        if replica_id not in config.replica_ids():
            raise ValueError(f"replica id {replica_id} not in 0..{config.replica_count - 1}")
        if keyring.get(("replica", replica_id)) != signing_key.verify_key:
            raise ValueError(f"the key ring holds another key for replica {replica_id}")
        self.id = replica_id
        self.config = config
        self.key = signing_key
        self.ledger = Ledger(genesis_accounts, config.dedup_window)
        # Named in every reply we sign, so clients and receipts cannot mix clusters up.
        self.cluster_id = compute_cluster_id(config, keyring, genesis_accounts)
        genesis_snapshot = self.ledger.snapshot()
        genesis_digest = self.ledger.digest()
        self.verifier = Verifier(config, keyring, genesis_digest, cache)
        self.now_ms = 0
        self.view = 0
        self.view_active = True
        self.last_executed = 0
        self.chain_hash = self.verifier.genesis_chain_hash
        self.stable = StableCheckpoint(0, self.chain_hash, genesis_digest, genesis_snapshot, ())
        # The checkpoint a NEW-VIEW started from, when it is ahead of our own stable one.
        self.view_anchor: Anchor | None = None
        self.slots: dict[int, Slot] = {}
        self.own_snapshots: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.checkpoint_votes: dict[int, dict[int, tuple[bytes, bytes, bytes]]] = {}
        # Requests this replica knows of and has not executed, in arrival order.
        self.pending: dict[tuple[int, int], PendingRequest] = {}
        # How many of `pending` each client holds (its quota: client_pending_limit).
        self.pending_per_client: Counter[int] = Counter()
        # Clients that overflowed their quota here: more outstanding requests than a correct
        # client ever has. Liveness is promised to correct clients only, so their backlog
        # arms no request timer (it must not depose a correct primary). Cleared once the
        # client has nothing pending here any more.
        self.over_quota_clients: dict[int, None] = {}
        # Primary only: requests admitted on a backup's relay although their client was at
        # its quota here (or the table full), charged to that backup instead, per (backup,
        # client) and per backup. A backup times every request it relays, so a correct
        # primary must take what a correct backup relays, or a client that sends some
        # requests to the primary and others to the backups gets the primary deposed. Each
        # backup's share is bounded like a client's: client_pending_limit per client and
        # pending_request_limit in all.
        self.relayed_per_client: Counter[tuple[int, int]] = Counter()
        self.relayed_per_replica: Counter[int] = Counter()
        self.signed_replies = SignedReplies()
        # Primary only: the pace of ordering over-quota clients' backlog (one bucket, key 0).
        self.backlog_budget = TokenBuckets(OVER_QUOTA_ORDER_RATE_PER_S, config.batch_size)
        self.client_budget = TokenBuckets(
            config.client_replay_rate_per_s, config.client_replay_burst
        )
        # Primary only: pending requests not yet proposed in this view, in arrival order.
        self.proposal_queue: dict[tuple[int, int], None] = {}
        self.next_seq = 1
        # Failure detection.
        self.last_primary_contact_ms = 0
        self.last_heartbeat_ms = 0
        self.progress_deadline_ms: int | None = None
        self.last_suspect_ms: int | None = None
        self.suspects: dict[int, int] = {}
        self.failed_views = 0
        self.last_backoff_change_ms = 0
        # View change.
        self.view_change_deadline_ms: int | None = None
        self.view_changes: dict[int, dict[int, VerifiedViewChange]] = {}
        self.latest_view_claims: dict[int, int] = {}
        self.view_claim_ms: dict[int, int] = {}
        self.own_view_change: bytes | None = None
        # Our view changes for the last few views, to hand to replicas stuck in them.
        self.own_view_changes: dict[int, bytes] = {}
        self.new_view_message: bytes | None = None
        # The highest sequence number the current view's NEW-VIEW assigned. In this view a
        # proposal at or below it is accepted only as that assignment (also after a restart:
        # recovery re-installs the plan), never as a fresh PRE-PREPARE from the primary.
        self.new_view_planned_high = 0
        self.view_records: dict[tuple[str | int, ...], None] = {}
        # Catch-up.
        self.highest_seen_executed = 0
        # How far each replica's heartbeats said it executed. One voice proves nothing (a
        # Byzantine replica may claim anything), so only the (f + 1)-th highest counts.
        self.heartbeat_claims: dict[int, int] = {}
        self.last_execution_ms = 0
        self.last_fetch_ms: int | None = None
        self.fetch_rotation = 0
        self.help_served_ms: dict[int, int] = {}
        # Every byte of catch-up service (asked for or not) is paid from the requester's bucket.
        self.catch_up_budget = TokenBuckets(
            config.catch_up_bytes_per_second, config.catch_up_burst_bytes
        )
        self.chunk_server = ChunkServer(config.state_chunk_leaves, config.state_chunk_bytes)
        self.incoming: IncomingTransfer | None = None
        self.last_retransmit_ms = 0
        self.fresh_start = True
        # Observability.
        self.drops: Counter[str] = Counter()
        self.evidence: list[tuple[str, int, bytes, bytes]] = []
        self.messages_sent = 0
        self.view_changes_started = 0
        self.new_views_installed = 0
        self.halted: str | None = None
        self._out: list[Action] = []
        self.silent_through_view: int | None = None
        if records:
            self._recover(records)
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

    # --- the driver's interface ---------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        self._out = []
        if self.halted is not None:
            self.drops["halted"] += 1
        elif isinstance(event, Tick):
            self._on_tick(event.now_ms)
        elif isinstance(event, MessageReceived):
            self._on_bytes(event.data, event.link)
        else:
            raise TypeError(f"not an event: {event!r}")
        out, self._out = self._out, []
        return out

    @property
    def is_primary(self) -> bool:
        return self.config.primary_of(self.view) == self.id

    def statistics(self) -> ReplicaStatistics:
        return ReplicaStatistics(
            replica_id=self.id,
            view=self.view,
            view_active=self.view_active,
            last_executed=self.last_executed,
            stable_checkpoint=self.stable.seq,
            view_changes_started=self.view_changes_started,
            new_views_installed=self.new_views_installed,
            messages_sent=self.messages_sent,
            pending_requests=len(self.pending),
            drops=dict(sorted(self.drops.items())),
            evidence=len(self.evidence),
            halted=self.halted,
        )

    # --- output helpers -----------------------------------------------------------------

    def _broadcast(self, raw: bytes) -> None:
        self.messages_sent += self.config.replica_count - 1
        self._out.append(Broadcast(raw))

    def _send(self, to: tuple[str, int], raw: bytes) -> None:
        self.messages_sent += 1
        self._out.append(Send(to, raw))

    def _persist(self, key: tuple[str | int, ...], value: bytes | None) -> None:
        self._out.append(Persist(key, value))

    def _note(self, kind: str, detail: str) -> None:
        self._out.append(Note(kind, detail))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.drops[reason] += 1
        self._note("drop", f"{reason} {detail}".strip())

    def _evidence(self, kind: str, offender: int, first: bytes, second: bytes) -> None:
        """Two conflicting signed messages from one replica: proof it is Byzantine."""
        if any(held[2:] == (first, second) for held in self.evidence):
            return
        if len(self.evidence) < EVIDENCE_LIMIT:
            self.evidence.append((kind, offender, first, second))
        self._note("evidence", f"{kind} by replica {offender}")

    def _vote(self, slot: Slot, kind: str, message: Prepare | Commit | PrePrepare) -> bytes:
        """Sign a vote, after checking we never signed a different one at (kind, view, seq)."""
        digest = (
            message.entry_digest
            if not isinstance(message, PrePrepare)
            else hashlib.sha256(message.encode()).digest()
        )
        if self.silent_through_view is not None:
            raise ReplicaInvariantError(f"replica {self.id} may have lost its votes; not signing")
        previous = slot.own_votes.get((kind, message.view))
        if previous is not None and previous != digest:
            raise ReplicaInvariantError(
                f"replica {self.id} about to sign a second {kind} at "
                f"view {message.view} seq {slot.seq}"
            )
        slot.own_votes[(kind, message.view)] = digest
        raw = seal(message, self.key)
        key = ("vote", kind, message.view, slot.seq)
        slot.persisted_keys[key] = None
        self._persist(key, raw)
        return raw

    # --- message intake -----------------------------------------------------------------

    def _on_bytes(self, data: bytes, link: Principal | None) -> None:
        try:
            envelope, message = peek(data)
            if message.SIGNER == "replica" and message.sender == self.id:
                raise Rejected("from_self")
            handler = self._handlers.get(type(message))
            if handler is None:
                raise Rejected("unexpected_type", type(message).__name__)
            if self._is_stale(message):
                # Late votes for what is already executed: not worth a signature check.
                self.drops["stale"] += 1
                self._help_laggard(envelope, message)
                return
            if self._is_redundant(message):
                # The slot already has the quorum this vote would add to.
                self.drops["redundant_vote"] += 1
                return
            if isinstance(message, Request) and self._refused_for_quota(message, link):
                # A flood from a client over its quota costs a parse, not a signature check.
                raise Rejected("client_quota_full", f"client {message.client_id}")
            verify_signature(envelope, message, self.verifier.keyring, self.verifier.cache)
            handler(self, Opened(message, data, envelope.body, link))
        except Rejected as rejection:
            self._drop(rejection.reason, rejection.detail)

    def _refused_for_quota(self, request: Request, link: Principal | None) -> bool:
        """Whether `_on_request` would refuse this request for its client's quota, decided
        before its signature is checked. Only for a client already marked over its quota
        (by a request whose signature was checked: a forgery naming a correct client cannot
        get it marked), only a new request (a pending or decided one takes its usual path:
        a relay, a kept reply), and not one a backup relays within its share."""
        client_id = request.client_id
        return (
            client_id in self.over_quota_clients
            and self.pending_per_client[client_id] >= self.config.client_pending_limit
            and (client_id, request.request_id) not in self.pending
            and self.ledger.lookup(client_id, request.request_id) is None
            and self._relay_share(client_id, link) is None
        )

    def _relay_share(self, client_id: int, link: Principal | None) -> int | None:
        """The backup a request of this client that arrived on `link` may be charged to:
        at the primary only, for a request a backup relayed, within that backup's share
        (see relayed_per_client). None: the request is charged to its client."""
        if link is None or link[0] != "replica" or not self.is_primary:
            return None
        relayer = link[1]
        if relayer == self.id or not 0 <= relayer < self.config.replica_count:
            return None
        if self.relayed_per_client[(relayer, client_id)] >= self.config.client_pending_limit:
            return None
        if self.relayed_per_replica[relayer] >= self.config.pending_request_limit:
            return None
        return relayer

    def _on_balance_query(self, opened: Opened) -> None:
        query = opened.message
        if not isinstance(query, BalanceQuery):
            raise Rejected("unexpected_type")
        balance = self.ledger.balance(query.account)
        reply = BalanceReply(
            self.id,
            query.client_id,
            query.query_id,
            query.account,
            int(balance is not None),
            balance or 0,
            self.last_executed,
            self.cluster_id,
        )
        self._send(("client", query.client_id), seal(reply, self.key))

    def _is_stale(self, message: Message) -> bool:
        if isinstance(message, PrePrepare | Prepare | Commit):
            return message.seq <= self.last_executed or message.seq <= self.stable.seq
        if isinstance(message, Checkpoint):
            return message.seq <= self.stable.seq
        return False

    def _is_redundant(self, message: Message) -> bool:
        if not isinstance(message, Prepare | Commit) or message.view != self.view:
            return False
        slot = self.slots.get(message.seq)
        if slot is None:
            return False
        if isinstance(message, Prepare):
            return slot.prepared_in_view
        return slot.committed is not None

    def _on_request(self, opened: Opened) -> None:
        request = opened.message
        if not isinstance(request, Request):
            raise Rejected("unexpected_type")
        identity = (request.client_id, request.request_id)
        digest = opened.body_digest
        decision = self.ledger.lookup(request.client_id, request.request_id)
        if decision is not None and decision.body_digest == digest:
            # A retransmission of something already decided: answer with the reply we
            # signed then (a replay costs no signature), within the client's budget.
            if not self.client_budget.allow(request.client_id, self.now_ms):
                raise Rejected("replay_rate_limited", f"client {request.client_id}")
            signed = self.signed_replies.get(request.client_id, request.request_id, digest)
            if signed is not None:
                self._send(("client", request.client_id), signed)
                return
            self._reply(
                request, digest, decision.seq, decision.outcome.value, decision.reason.value
            )
            return
        if identity in self.pending:
            if self._relays(request.client_id):
                if not self.client_budget.allow(request.client_id, self.now_ms):
                    raise Rejected("relay_rate_limited", f"client {request.client_id}")
                self._send(("replica", self.config.primary_of(self.view)), opened.raw)
            return
        client_id = request.client_id
        relayer = None
        charged_to_clients = len(self.pending) - self.relayed_per_replica.total()
        if (
            charged_to_clients >= self.config.pending_request_limit
            or self.pending_per_client[client_id] >= self.config.client_pending_limit
        ):
            relayer = self._relay_share(client_id, opened.link)
            if relayer is None:
                if charged_to_clients >= self.config.pending_request_limit:
                    raise Rejected("request_queue_full")
                self.over_quota_clients[client_id] = None
                raise Rejected("client_quota_full", f"client {client_id}")
        self.pending[identity] = PendingRequest(opened, digest, self.now_ms, relayer)
        if relayer is None:
            self.pending_per_client[client_id] += 1
        else:
            self.relayed_per_client[(relayer, client_id)] += 1
            self.relayed_per_replica[relayer] += 1
        if self.is_primary:
            if self.view_active:
                self.proposal_queue[identity] = None
                self._maybe_propose()
        elif self._relays(client_id):
            # The client gave up on the primary and told everyone: relay it and watch.
            self._send(("replica", self.config.primary_of(self.view)), opened.raw)

    def _relays(self, client_id: int) -> bool:
        """Whether a backup relays this client's requests to the primary: exactly those it
        times (see _oldest_timed_request). The primary takes a relay on the relaying
        backup's share (see relayed_per_client), so relaying a client over its quota here
        would hand it that share as well as its own."""
        return not self.is_primary and self.view_active and client_id not in self.over_quota_clients

    def _check_view(self, view: int, sender: int) -> None:
        if view != self.view or not self.view_active:
            if view > self.view:
                self._claim_view(sender, view)
            raise Rejected("wrong_view", f"view {view}, ours {self.view}")

    def _window_low(self) -> int:
        anchor = self.view_anchor.seq if self.view_anchor is not None else 0
        return max(self.stable.seq, anchor)

    def _check_window(self, seq: int) -> None:
        low = self._window_low()
        if seq <= low:
            raise Rejected("below_window", str(seq))
        if seq > low + self.config.watermark_window:
            # The others are this far ahead: we are behind and should catch up.
            self.highest_seen_executed = max(
                self.highest_seen_executed, seq - self.config.watermark_window
            )
            raise Rejected("above_window", str(seq))

    def _slot(self, seq: int) -> Slot:
        slot = self.slots.get(seq)
        if slot is None:
            slot = Slot(seq, last_progress_ms=self.now_ms)
            self.slots[seq] = slot
        return slot

    def _on_pre_prepare(self, opened: Opened) -> None:
        message = opened.message
        if not isinstance(message, PrePrepare):
            raise Rejected("unexpected_type")
        self._check_view(message.view, message.replica)
        self._check_window(message.seq)
        proposal = self.verifier.proposal(opened.raw)
        self.last_primary_contact_ms = self.now_ms
        slot = self._slot(proposal.seq)
        if slot.proposal is not None:
            if slot.proposal.entry_digest != proposal.entry_digest:
                self._evidence("pre_prepare", message.replica, slot.proposal.raw, opened.raw)
                raise Rejected("conflicting_pre_prepare", f"seq {proposal.seq}")
            return
        if proposal.seq <= self.new_view_planned_high:
            # The NEW-VIEW filled this sequence number; only its assignment may stand here.
            raise Rejected("not_the_new_view_pre_prepare", f"seq {proposal.seq}")
        if slot.committed is not None and slot.committed.proposal.entry_digest != (
            proposal.entry_digest
        ):
            raise Rejected("conflicts_with_committed", f"seq {proposal.seq}")
        own = slot.own_votes.get(("prepare", proposal.view))
        if own is not None and own != proposal.entry_digest:
            raise Rejected("conflicts_with_own_vote", f"seq {proposal.seq}")
        predecessor = self._known_entry(proposal.seq - 1)
        if predecessor is not None and predecessor != proposal.prev_hash:
            raise Rejected("bad_chain", f"seq {proposal.seq}")
        slot.accept(proposal)
        self._advance(proposal.seq)

    def _on_vote(self, opened: Opened) -> None:
        vote = opened.message
        if not isinstance(vote, Prepare | Commit):
            raise Rejected("unexpected_type")
        self._check_view(vote.view, vote.replica)
        self._check_window(vote.seq)
        is_prepare = isinstance(vote, Prepare)
        if is_prepare and vote.replica == self.config.primary_of(vote.view):
            raise Rejected("primary_prepare")
        slot = self._slot(vote.seq)
        votes = slot.prepares if is_prepare else slot.commits
        existing = votes.get(vote.replica)
        if existing is not None:
            if existing[0] != vote.entry_digest:
                kind = "prepare" if is_prepare else "commit"
                self._evidence(kind, vote.replica, existing[1], opened.raw)
                raise Rejected("conflicting_vote", f"seq {vote.seq}")
            return
        votes[vote.replica] = (vote.entry_digest, opened.raw)
        if (
            not is_prepare
            and slot.committed is None
            and (len(slot.matching(slot.commits, vote.entry_digest)) >= self.config.weak_quorum)
        ):
            # f + 1 commits: a correct replica prepared this entry, so the cluster is at
            # least this far along. If we cannot commit it ourselves (we lost the proposal,
            # or the primary hides it from us), catch-up will fetch its certificate.
            self.highest_seen_executed = max(self.highest_seen_executed, vote.seq)
        self._advance(vote.seq)

    def _on_heartbeat(self, opened: Opened) -> None:
        heartbeat = opened.message
        if not isinstance(heartbeat, Heartbeat):
            raise Rejected("unexpected_type")
        if heartbeat.replica != self.config.primary_of(heartbeat.view):
            raise Rejected("not_primary", "heartbeat")
        # Even from a later view: how far the cluster got is what tells us to catch up. One
        # heartbeat is a hint (ask its sender, who must then prove it with certificates);
        # only f + 1 replicas' claims move highest_seen_executed.
        self._claim_executed(heartbeat.replica, heartbeat.last_executed)
        if heartbeat.view > self.view or (heartbeat.view == self.view and not self.view_active):
            # A primary of a later view: we missed its NEW-VIEW (we restarted, or were cut
            # off while the cluster went idle). Ask it; a FETCH names our view.
            self._fetch_from(heartbeat.replica)
        elif heartbeat.last_executed > self.last_executed and self.incoming is None:
            # (A state transfer under way fetches for itself.)
            self._fetch_from(heartbeat.replica)
        if heartbeat.last_executed < self.last_executed and heartbeat.view <= self.view:
            # The primary itself is behind (it restarted, or lost its disk): with no load
            # nothing else would ever tell it. Send it what it lacks, on the help budget.
            helped = self.help_served_ms.get(heartbeat.replica)
            if helped is None or self.now_ms - helped >= self.config.retransmit_interval_ms:
                self.help_served_ms[heartbeat.replica] = self.now_ms
                self._serve_catch_up(
                    heartbeat.replica, heartbeat.last_executed + 1, heartbeat.last_executed
                )
        self._check_view(heartbeat.view, heartbeat.replica)
        self.last_primary_contact_ms = self.now_ms

    def _claim_executed(self, replica: int, last_executed: int) -> None:
        if last_executed <= self.heartbeat_claims.get(replica, -1):
            return
        self.heartbeat_claims[replica] = last_executed
        claims = sorted(self.heartbeat_claims.values(), reverse=True)
        weak = self.config.weak_quorum
        if len(claims) >= weak:
            self.highest_seen_executed = max(self.highest_seen_executed, claims[weak - 1])

    def _on_suspect(self, opened: Opened) -> None:
        suspect = opened.message
        if not isinstance(suspect, Suspect):
            raise Rejected("unexpected_type")
        if suspect.view != self.view or not self.view_active:
            if suspect.view > self.view:
                self._claim_view(suspect.replica, suspect.view)
            return
        self.suspects[suspect.replica] = self.now_ms
        self._check_suspects()

    # --- normal case --------------------------------------------------------------------

    def _known_entry(self, seq: int) -> bytes | None:
        """The entry digest at `seq`, where this replica knows it for certain."""
        if seq == self.last_executed:
            return self.chain_hash
        if seq == self.stable.seq:
            return self.stable.chain_hash
        if self.view_anchor is not None and seq == self.view_anchor.seq:
            return self.view_anchor.chain_hash
        slot = self.slots.get(seq)
        if slot is None:
            return None
        if slot.committed is not None:
            return slot.committed.proposal.entry_digest
        if slot.proposal is not None:
            return slot.proposal.entry_digest
        return None

    def _predecessor_settled(self, slot: Slot) -> bool:
        """The chain rule: prepare s only once s - 1 is settled with the digest s names."""
        proposal = slot.proposal
        if proposal is None:
            return False
        if slot.committed is not None:
            return slot.committed.proposal.entry_digest == proposal.entry_digest
        seq = slot.seq - 1
        if seq == self.last_executed:
            return self.chain_hash == proposal.prev_hash
        if seq == self.stable.seq:
            return self.stable.chain_hash == proposal.prev_hash
        if self.view_anchor is not None and seq == self.view_anchor.seq:
            return self.view_anchor.chain_hash == proposal.prev_hash
        previous = self.slots.get(seq)
        if previous is None:
            return False
        if previous.committed is not None:
            return previous.committed.proposal.entry_digest == proposal.prev_hash
        if previous.prepared_in_view and previous.proposal is not None:
            return previous.proposal.entry_digest == proposal.prev_hash
        return False

    def _advance(self, seq: int) -> None:
        """Move slot `seq` (and any successors it unblocks) through prepare and commit."""
        while True:
            slot = self.slots.get(seq)
            if slot is None or not self._step_slot(slot):
                break
            seq += 1
        self._execute_ready()

    def _step_slot(self, slot: Slot) -> bool:
        """One pass of the phase rules over a slot; True if it became prepared or committed."""
        proposal = slot.proposal
        if proposal is None or not self.view_active or self.silent_through_view is not None:
            return False
        changed = False
        primary = self.config.primary_of(self.view)
        if self.id != primary and slot.own_prepare is None and self._predecessor_settled(slot):
            raw = self._vote(
                slot, "prepare", Prepare(self.view, slot.seq, self.id, proposal.entry_digest)
            )
            slot.own_prepare = raw
            slot.prepares[self.id] = (proposal.entry_digest, raw)
            slot.last_progress_ms = self.now_ms
            self._broadcast(raw)
        ready_to_prepare = self.id == primary or slot.own_prepare is not None
        if ready_to_prepare and not slot.prepared_in_view:
            prepares = slot.matching(slot.prepares, proposal.entry_digest)
            if len(prepares) >= self.config.prepare_quorum:
                certificate = PreparedCertificate(proposal.raw, tuple(prepares))
                slot.prepared_in_view = True
                slot.best_prepared = PreparedEntry(self.view, proposal, certificate)
                prepared_key = ("prepared", slot.seq)
                slot.persisted_keys[prepared_key] = None
                self._persist(prepared_key, pack([self.view, certificate.to_wire()]))
                raw = self._vote(
                    slot, "commit", Commit(self.view, slot.seq, self.id, proposal.entry_digest)
                )
                slot.own_commit = raw
                slot.commits[self.id] = (proposal.entry_digest, raw)
                slot.last_progress_ms = self.now_ms
                self._broadcast(raw)
                changed = True
        if slot.prepared_in_view and slot.committed is None:
            commits = slot.matching(slot.commits, proposal.entry_digest)
            if len(commits) >= self.config.quorum:
                self._commit(slot, CommittedEntry(proposal, tuple(commits)))
                changed = True
        return changed

    def _commit(self, slot: Slot, entry: CommittedEntry) -> None:
        slot.committed = entry
        slot.last_progress_ms = self.now_ms
        key = ("committed", slot.seq)
        slot.persisted_keys[key] = None
        self._persist(key, entry.encode())

    def _maybe_propose(self) -> None:
        if not (self.is_primary and self.view_active) or self.silent_through_view is not None:
            return
        window_high = self._window_low() + self.config.watermark_window
        inflight_high = self.last_executed + self.config.max_inflight_batches
        while self.proposal_queue and self.next_seq <= min(window_high, inflight_high):
            if len(self.proposal_queue) < self.config.batch_size:
                oldest = self.pending[next(iter(self.proposal_queue))]
                if self.now_ms - oldest.arrived_ms < self.config.batch_timeout_ms:
                    return
            identities = self._next_batch()
            if self._backlog_only(identities):
                # Only over-quota clients' requests: they may fill part of the pipeline,
                # never all of it, or a correct client's request arriving now would wait
                # for batches of theirs to drain (the flood's latency, not its own).
                reserve = max(1, self.config.max_inflight_batches // OVER_QUOTA_PIPELINE_SHARE)
                if self.next_seq > self.last_executed + reserve:
                    return
            backlog = sum(map(self._is_backlog, identities)) if self.over_quota_clients else 0
            if backlog:
                self.backlog_budget.spend(0, backlog, self.now_ms)
            batch: list[bytes] = []
            for identity in identities:
                del self.proposal_queue[identity]
                pending = self.pending.get(identity)
                if pending is not None:
                    batch.append(pending.opened.raw)
            if not batch:
                return
            self._propose(tuple(batch))

    def _is_backlog(self, identity: tuple[int, int]) -> bool:
        """A request of a client over its quota here, charged to that client: its backlog.
        One a backup relayed within its share is not: that backup times it."""
        if identity[0] not in self.over_quota_clients:
            return False
        pending = self.pending.get(identity)
        return pending is None or pending.relayer is None

    def _backlog_only(self, identities: list[tuple[int, int]]) -> bool:
        return bool(self.over_quota_clients) and all(map(self._is_backlog, identities))

    def _next_batch(self) -> list[tuple[int, int]]:
        """The next batch_size requests to propose, in arrival order, but correct clients'
        first: a client over its quota must not make everyone else's requests wait behind
        its backlog (long enough, it would look like censorship to the backups). Its
        backlog also gets at most 1/OVER_QUOTA_BATCH_SHARE of a batch: every request
        ordered costs each replica a signature check, an execution and a signed reply, so
        full batches of it would slow the batches in flight that correct clients' requests
        wait behind; and at most OVER_QUOTA_ORDER_RATE_PER_S of it a second in all."""
        size = self.config.batch_size
        if not self.over_quota_clients:
            return list(islice(self.proposal_queue, size))
        first: list[tuple[int, int]] = []
        later: list[tuple[int, int]] = []
        later_limit = min(
            max(1, size // OVER_QUOTA_BATCH_SHARE), int(self.backlog_budget.tokens(0, self.now_ms))
        )
        for identity in self.proposal_queue:
            if not self._is_backlog(identity):
                first.append(identity)
                if len(first) == size:
                    break
            elif len(later) < later_limit:
                later.append(identity)
        return (first + later)[:size]

    def _propose(self, requests: tuple[bytes, ...]) -> None:
        # A primary that restarted or caught up by state transfer may hold a stale
        # next_seq: everything up to the window's low end is already decided.
        self.next_seq = max(self.next_seq, self._window_low() + 1)
        seq = self.next_seq
        prev_hash = self._known_entry(seq - 1)
        if prev_hash is None:
            raise ReplicaInvariantError(f"primary {self.id} lost the chain before seq {seq}")
        pre_prepare = PrePrepare(
            self.view, seq, self.id, prev_hash, batch_digest(requests), requests
        )
        slot = self._slot(seq)
        raw = self._vote(slot, "pre_prepare", pre_prepare)
        slot.proposal = self.verifier.proposal(raw)
        self.next_seq = seq + 1
        self._broadcast(raw)
        self._advance(seq)

    def _execute_ready(self) -> None:
        executed_before = self.last_executed
        while True:
            slot = self.slots.get(self.last_executed + 1)
            if slot is None or slot.committed is None:
                break
            proposal = slot.committed.proposal
            if proposal.prev_hash != self.chain_hash:
                # Only possible with more than f faulty replicas: refuse to run on a fork.
                self._halt(f"chain fork at seq {slot.seq}")
                return
            self._execute(proposal)
        if self.last_executed > executed_before:
            # Room in the pipeline again: propose what gathered meanwhile.
            self._maybe_propose()

    def _execute(self, proposal: Proposal) -> None:
        executed = []
        for opened in proposal.requests:
            request = opened.message
            if not isinstance(request, Request):
                raise ReplicaInvariantError("a verified proposal holds a non-request")
            digest = opened.body_digest
            payment = Payment(
                request.client_id, request.request_id, request.payer, request.payee, request.amount
            )
            result = self.ledger.execute(payment, digest, proposal.seq)
            decision = result.decision
            identity = (request.client_id, request.request_id)
            pending = self.pending.get(identity)
            if pending is not None and (pending.body_digest == digest or result.fresh):
                self._unpend(identity)
            executed.append(
                ExecutedRequest(
                    request.client_id,
                    request.request_id,
                    digest,
                    request.payer,
                    request.payee,
                    request.amount,
                    decision.outcome.value,
                    decision.reason.value,
                    result.fresh,
                )
            )
            outcome, reason = decision.outcome.value, decision.reason.value
            self._reply(request, digest, decision.seq, outcome, reason)
        self.last_executed = proposal.seq
        self.chain_hash = proposal.entry_digest
        self.last_execution_ms = self.now_ms
        self.progress_deadline_ms = None
        self._out.append(
            Executed(
                proposal.view,
                proposal.seq,
                proposal.entry_digest,
                tuple(executed),
            )
        )
        if proposal.seq % self.config.checkpoint_interval == 0:
            self._take_checkpoint()

    def _unpend(self, identity: tuple[int, int]) -> None:
        pending = self.pending.pop(identity)
        self.proposal_queue.pop(identity, None)
        client_id = identity[0]
        if pending.relayer is not None:
            self.relayed_per_client[(pending.relayer, client_id)] -= 1
            if self.relayed_per_client[(pending.relayer, client_id)] <= 0:
                del self.relayed_per_client[(pending.relayer, client_id)]
            self.relayed_per_replica[pending.relayer] -= 1
            if self.relayed_per_replica[pending.relayer] <= 0:
                del self.relayed_per_replica[pending.relayer]
            return
        self.pending_per_client[client_id] -= 1
        if self.pending_per_client[client_id] <= 0:
            del self.pending_per_client[client_id]
            self.over_quota_clients.pop(client_id, None)

    def _reply(self, request: Request, digest: bytes, seq: int, outcome: str, reason: str) -> None:
        reply = Reply(
            self.view,
            seq,
            self.id,
            request.client_id,
            request.request_id,
            digest,
            outcome,
            reason,
            self.cluster_id,
        )
        raw = seal(reply, self.key)
        if reason not in UNSTORED_REASON_CODES:
            # Decided for good: the same signed reply answers every retransmission.
            self.signed_replies.put(request.client_id, request.request_id, digest, raw)
        self._send(("client", request.client_id), raw)

    # --- checkpoints --------------------------------------------------------------------

    def _take_checkpoint(self) -> None:
        snapshot = self.ledger.snapshot()
        ledger_digest = self.ledger.digest()
        seq = self.last_executed
        self.own_snapshots[seq] = (self.chain_hash, ledger_digest, snapshot)
        # Bounded: snapshots too old to become stable any more are of no use.
        for old in [
            old for old in self.own_snapshots if old < seq - 2 * self.config.watermark_window
        ]:
            del self.own_snapshots[old]
        raw = seal(Checkpoint(seq, self.id, self.chain_hash, ledger_digest), self.key)
        self.checkpoint_votes.setdefault(seq, {})[self.id] = (self.chain_hash, ledger_digest, raw)
        self._broadcast(raw)
        self._check_stable(seq)

    def _on_checkpoint(self, opened: Opened) -> None:
        checkpoint = opened.message
        if not isinstance(checkpoint, Checkpoint):
            raise Rejected("unexpected_type")
        if checkpoint.seq % self.config.checkpoint_interval != 0 or checkpoint.seq == 0:
            raise Rejected("bad_checkpoint", f"seq {checkpoint.seq}")
        if checkpoint.seq <= self.stable.seq:
            return
        self.highest_seen_executed = max(self.highest_seen_executed, checkpoint.seq)
        horizon = max(self.stable.seq, self.last_executed) + 2 * self.config.watermark_window
        if checkpoint.seq > horizon:
            # Far ahead: remember nothing (bounded memory) beyond the hint to catch up.
            self._maybe_fetch()
            return
        votes = self.checkpoint_votes.setdefault(checkpoint.seq, {})
        existing = votes.get(checkpoint.replica)
        claim = (checkpoint.chain_hash, checkpoint.ledger_digest, opened.raw)
        if existing is not None:
            if existing[:2] != claim[:2]:
                self._evidence("checkpoint", checkpoint.replica, existing[2], opened.raw)
            return
        votes[checkpoint.replica] = claim
        self._check_stable(checkpoint.seq)

    def _set_anchor(self, anchor: Anchor) -> None:
        if self.view_anchor is not None and self.view_anchor.seq >= anchor.seq:
            return
        self.view_anchor = anchor
        # Durable: after a restart the chain rule needs the anchor's hash, and a view change
        # must still cite it.
        self._persist(("anchor",), anchor.encode())
        self._check_stable(anchor.seq)

    def _check_stable(self, seq: int) -> None:
        anchor = self.view_anchor
        if anchor is not None and anchor.seq == seq and seq <= self.last_executed:
            # The anchor's proof is as good as 2f + 1 CHECKPOINT messages of our own.
            own = self.own_snapshots.get(seq)
            if own is not None and own[:2] == (anchor.chain_hash, anchor.ledger_digest):
                self._make_stable(
                    StableCheckpoint(
                        seq, anchor.chain_hash, anchor.ledger_digest, own[2], anchor.proof
                    )
                )
                return
        votes = self.checkpoint_votes.get(seq, {})
        groups: dict[tuple[bytes, bytes], list[bytes]] = {}
        for _, (chain_hash, ledger_digest, raw) in sorted(votes.items()):
            groups.setdefault((chain_hash, ledger_digest), []).append(raw)
        for (chain_hash, ledger_digest), raws in groups.items():
            if len(raws) < self.config.quorum:
                continue
            if seq > self.last_executed:
                self._maybe_fetch()
                return
            own = self.own_snapshots.get(seq)
            if own is None:
                return
            if own[:2] != (chain_hash, ledger_digest):
                self._halt(f"state diverged from 2f + 1 replicas at checkpoint {seq}")
                return
            self._make_stable(StableCheckpoint(seq, chain_hash, ledger_digest, own[2], tuple(raws)))
            return

    def _make_stable(self, checkpoint: StableCheckpoint) -> None:
        self.stable = checkpoint
        # pbft/checkpoint_size.py bounds this record from the configuration: keep them in step.
        self._persist(
            ("checkpoint",),
            pack(
                [
                    checkpoint.seq,
                    checkpoint.chain_hash,
                    checkpoint.ledger_digest,
                    checkpoint.snapshot,
                    list(checkpoint.proof),
                ]
            ),
        )
        for seq in [seq for seq in self.slots if seq <= checkpoint.seq]:
            for key in self.slots.pop(seq).persisted_keys:
                self._persist(key, None)
        for table in (self.checkpoint_votes, self.own_snapshots):
            for seq in [seq for seq in table if seq <= checkpoint.seq]:
                del table[seq]
        if self.view_anchor is not None and self.view_anchor.seq <= checkpoint.seq:
            self.view_anchor = None
            self._persist(("anchor",), None)
        # Progress: the timeouts may come back down one step, but at most once per timeout
        # period, or frequent checkpoints would undo the backoff before it can help.
        if self.failed_views and self.now_ms - self.last_backoff_change_ms >= self._timeout_ms():
            self.failed_views -= 1
            self.last_backoff_change_ms = self.now_ms
        self._note("checkpoint_stable", f"seq {checkpoint.seq}")
        self._maybe_propose()

    # --- timers, suspicion and view change ----------------------------------------------

    def _timeout_ms(self) -> int:
        doublings = min(self.failed_views, self.config.max_timeout_doublings)
        return self.config.view_change_timeout_ms * (2**doublings)

    def _on_tick(self, now_ms: int) -> None:
        if now_ms < self.now_ms:
            raise ReplicaInvariantError(f"clock went back from {self.now_ms} to {now_ms}")
        self.now_ms = now_ms
        if self.fresh_start:
            self.fresh_start = False
            self.last_primary_contact_ms = now_ms
            self.last_execution_ms = now_ms
            self.last_fetch_ms = None
            if self.last_executed > 0 or self.view > 0:
                self._fetch()
        if self.view_active:
            if self.is_primary:
                self._maybe_propose()
                # Sent under load too (as Raft's leader does): it tells backups how far the
                # primary got, which is how a backup that lost a message learns it is behind.
                if now_ms - self.last_heartbeat_ms >= self.config.heartbeat_interval_ms:
                    self.last_heartbeat_ms = now_ms
                    heartbeat = Heartbeat(self.view, self.id, self.next_seq - 1, self.last_executed)
                    self._broadcast(seal(heartbeat, self.key))
            else:
                self._watch_primary()
        elif self.view_change_deadline_ms is not None and now_ms >= self.view_change_deadline_ms:
            # The new primary did not install the view in time: try the next one.
            self._start_view_change(self.view + 1)
        self._retransmit()
        self._maybe_fetch()

    def _watch_primary(self) -> None:
        timeout = self._timeout_ms()
        if self.now_ms - self.last_primary_contact_ms >= timeout:
            self._suspect("no heartbeat")
            return
        # PBFT's request timer: the oldest request we hold must be ordered in time, however
        # busy the primary keeps itself with other clients' payments (no censorship). Only
        # correct clients' requests count (see over_quota_clients). One timeout while
        # nothing executes; while the primary keeps executing, a few: under load a request
        # legitimately waits behind batches in flight and a backlog (a client sending its
        # quota at once, a flood being ordered), and a correct primary must not be deposed
        # for that. Censorship is still caught, REQUEST_TIMEOUTS_UNDER_LOAD times later.
        oldest = self._oldest_timed_request()
        if oldest is not None:
            age = self.now_ms - oldest.arrived_ms
            executing = self.now_ms - self.last_execution_ms < timeout
            if age >= (REQUEST_TIMEOUTS_UNDER_LOAD * timeout if executing else timeout):
                self._suspect("request not ordered")
                return
        has_work = oldest is not None or any(
            slot.proposal is not None and slot.committed is None
            for seq, slot in self.slots.items()
            if seq > self.last_executed
        )
        if not has_work:
            self.progress_deadline_ms = None
            return
        if self.progress_deadline_ms is None:
            self.progress_deadline_ms = self.now_ms + timeout
        elif self.now_ms >= self.progress_deadline_ms:
            self._suspect("work not completed")

    def _oldest_timed_request(self) -> PendingRequest | None:
        if not self.over_quota_clients and not self.relayed_per_replica:
            return next(iter(self.pending.values()), None)
        # Requests charged to a relaying backup are left out too: this replica took them
        # as primary, beyond what it may relay to the next one (the backup that relayed
        # them times them). Bounded: at most client_pending_limit entries per over-quota
        # client, and pending_request_limit per relaying backup, are skipped.
        for (client_id, _), pending in self.pending.items():
            if client_id not in self.over_quota_clients and pending.relayer is None:
                return pending
        return None

    def _suspect(self, reason: str) -> None:
        timeout = self._timeout_ms()
        if self.last_suspect_ms is not None and self.now_ms - self.last_suspect_ms < timeout:
            return
        self.last_suspect_ms = self.now_ms
        self.suspects[self.id] = self.now_ms
        self._note("suspect", f"view {self.view}: {reason}")
        self._broadcast(seal(Suspect(self.view, self.id), self.key))
        self._check_suspects()

    def _check_suspects(self) -> None:
        # Old suspicions fade, so transient hiccups far apart do not add up to a view change.
        horizon = self.now_ms - 4 * self._timeout_ms()
        self.suspects = {
            replica: when for replica, when in self.suspects.items() if when >= horizon
        }
        # A replica already in a later view has given up on this one: that is suspicion too.
        # Claims fade like suspicions: one absurd view number sent once must not count
        # against every later primary forever.
        suspecting = dict.fromkeys(self.suspects) | {
            replica: None
            for replica, view in self.latest_view_claims.items()
            if view > self.view and self.view_claim_ms.get(replica, horizon - 1) >= horizon
        }
        if len(suspecting) >= self.config.weak_quorum:
            self._start_view_change(self.view + 1)

    def _claim_view(self, sender: int, view: int) -> None:
        """A peer showed it is in a later view; f + 1 such peers mean we fell behind."""
        if view > self.view:
            self.view_claim_ms[sender] = self.now_ms
        previous = self.latest_view_claims.get(sender, -1)
        if view <= previous:
            return
        self.latest_view_claims[sender] = view
        ahead = sorted(
            (claimed for claimed in self.latest_view_claims.values() if claimed > self.view),
            reverse=True,
        )
        weak = self.config.weak_quorum
        if len(ahead) >= weak and ahead[weak - 1] > self.view:
            # At least one correct replica is in a view >= this one: join it.
            self._start_view_change(ahead[weak - 1])
        elif self.view_active:
            self._check_suspects()

    def _start_view_change(self, new_view: int) -> None:
        if new_view <= self.view:
            return
        self.view = new_view
        self.view_active = False
        self.view_changes_started += 1
        # Each view given up on doubles the timeouts, so a slow network still gets a view
        # that lasts long enough to make progress (PBFT's exponential backoff).
        self.failed_views += 1
        self.last_backoff_change_ms = self.now_ms
        self.view_change_deadline_ms = None
        self.suspects = {}
        self.progress_deadline_ms = None
        self.proposal_queue = {}
        self.new_view_planned_high = 0
        for slot in self.slots.values():
            slot.reset_view()
        # Cite the highest checkpoint we hold a proof for: our stable one, or the anchor a
        # NEW-VIEW gave us. Entries prepared above the anchor may have committed; citing
        # the lower checkpoint would leave them out of the window and lose them.
        cited = self.view_anchor if self.view_anchor is not None else self.stable
        window_high = cited.seq + self.config.watermark_window
        prepared = [
            slot.best_prepared.certificate
            for seq, slot in sorted(self.slots.items())
            if cited.seq < seq <= window_high and slot.best_prepared is not None
        ]
        view_change = ViewChange(
            new_view,
            self.id,
            cited.seq,
            cited.chain_hash,
            cited.ledger_digest,
            cited.proof,
            tuple(prepared),
        )
        raw = seal(view_change, self.key)
        self.own_view_change = raw
        self.own_view_changes[new_view] = raw
        for old in [
            old for old in self.own_view_changes if old <= new_view - OWN_VIEW_CHANGES_KEPT
        ]:
            del self.own_view_changes[old]
        self._record_view(("view",), pack([self.view, False]))
        self._record_view(("vote", "view_change", new_view, 0), raw)
        self._note("view_change", f"to view {new_view}")
        self._broadcast(raw)
        try:
            own = verify_view_change(raw, self.verifier)
        except Rejected as rejection:
            raise ReplicaInvariantError(f"own view change is invalid: {rejection}") from None
        self._store_view_change(own)
        self._arm_view_change_timer()
        self._maybe_send_new_view()

    def _arm_view_change_timer(self) -> None:
        """PBFT's rule: wait for the new view only once 2f + 1 replicas asked for it.

        A replica alone (cut off, or slow) would otherwise climb views by itself and end
        up where no quorum ever follows it; with this rule the correct replicas' views
        stay within one of each other, and the f + 1 join rule pulls laggards up.
        """
        if self.view_active or self.view_change_deadline_ms is not None:
            return
        if len(self.view_changes.get(self.view, {})) >= self.config.quorum:
            self.view_change_deadline_ms = self.now_ms + self._timeout_ms()

    def _record_view(self, key: tuple[str | int, ...], value: bytes) -> None:
        self.view_records[key] = None
        self._persist(key, value)

    def _store_view_change(self, change: VerifiedViewChange) -> None:
        sender = change.message.replica
        new_view = change.message.new_view
        # One view change per sender: the latest. Bounded, whatever a peer sends.
        for view, changes in list(self.view_changes.items()):
            if sender in changes and view != new_view:
                del changes[sender]
                if not changes:
                    del self.view_changes[view]
        self.view_changes.setdefault(new_view, {})[sender] = change

    def _on_view_change(self, opened: Opened) -> None:
        message = opened.message
        if not isinstance(message, ViewChange):
            raise Rejected("unexpected_type")
        if message.new_view < self.view or (message.new_view == self.view and self.view_active):
            to = ("replica", message.replica)
            if self.view_active and self.new_view_message is not None:
                # It missed the NEW-VIEW we installed (or is still trying an older view):
                # the NEW-VIEW proves itself, it can install it directly.
                self._send(to, self.new_view_message)
            elif message.new_view in self.own_view_changes:
                # It is stuck short of 2f + 1 view changes for a view we already left: our
                # own, lost on the way, lets it arm its timer and follow us.
                self._send(to, self.own_view_changes[message.new_view])
            return
        change = verify_view_change(opened.raw, self.verifier)
        for proposal in change.prepared.values():
            self._check_proposal_conflict(proposal)
        self._store_view_change(change)
        self._claim_view(message.replica, message.new_view)
        self._arm_view_change_timer()
        self._maybe_send_new_view()

    def _maybe_send_new_view(self) -> None:
        if self.view_active or not self.is_primary or self.silent_through_view is not None:
            return
        changes = self.view_changes.get(self.view, {})
        if self.id not in changes or len(changes) < self.config.quorum:
            return
        others = [change for replica, change in sorted(changes.items()) if replica != self.id]
        chosen = [changes[self.id], *others[: self.config.quorum - 1]]
        plan = plan_new_view(self.view, chosen)
        pre_prepares = []
        for entry in plan.entries:
            pre_prepare = PrePrepare(
                self.view, entry.seq, self.id, entry.prev_hash, entry.batch_digest, entry.requests
            )
            pre_prepares.append(self._vote(self._slot(entry.seq), "pre_prepare", pre_prepare))
        new_view = NewView(
            self.view,
            self.id,
            tuple(change.opened.raw for change in chosen),
            tuple(pre_prepares),
        )
        raw = seal(new_view, self.key)
        # Durable before it leaves: after a crash we must re-send this NEW-VIEW, never sign
        # a different one for the same view.
        self._record_view(("view",), pack([self.view, True]))
        self._record_view(("vote", "new_view", self.view, 0), raw)
        self._broadcast(raw)
        proposals = [self.verifier.proposal(pre_prepare) for pre_prepare in pre_prepares]
        self._install_view(plan, proposals, raw)

    def _on_new_view(self, opened: Opened) -> None:
        message = opened.message
        if not isinstance(message, NewView):
            raise Rejected("unexpected_type")
        if message.view < self.view or (message.view == self.view and self.view_active):
            return
        plan, proposals = self._verify_new_view(message)
        self._install_view(plan, proposals, opened.raw)

    def _verify_new_view(self, message: NewView) -> tuple[NewViewPlan, list[Proposal]]:
        """Check a NEW-VIEW as PBFT asks: recompute its plan from the view changes it cites
        and require its re-proposals to be exactly that plan."""
        if message.replica != self.config.primary_of(message.view):
            raise Rejected("not_primary", "new-view")
        changes: dict[int, VerifiedViewChange] = {}
        for raw in message.view_changes:
            change = verify_view_change(raw, self.verifier)
            if change.message.new_view != message.view:
                raise Rejected("bad_new_view", "a view change for another view")
            if change.message.replica in changes:
                raise Rejected("bad_new_view", "two view changes from one replica")
            changes[change.message.replica] = change
        if len(changes) < self.config.quorum:
            raise Rejected("bad_new_view", f"{len(changes)} view changes, need 2f + 1")
        plan = plan_new_view(message.view, list(changes.values()))
        if len(message.pre_prepares) != len(plan.entries):
            raise Rejected("bad_new_view", "re-proposals differ from the recomputed ones")
        proposals = []
        for raw, entry in zip(message.pre_prepares, plan.entries, strict=True):
            proposal = self.verifier.proposal(raw)
            if (proposal.view, proposal.seq, proposal.prev_hash, proposal.batch_digest) != (
                message.view,
                entry.seq,
                entry.prev_hash,
                entry.batch_digest,
            ):
                raise Rejected("bad_new_view", f"re-proposal for seq {entry.seq} differs")
            proposals.append(proposal)
        return plan, proposals

    def _install_view(self, plan: NewViewPlan, proposals: list[Proposal], raw: bytes) -> None:
        if plan.view != self.view:
            self.view = plan.view
        silent = self.silent_through_view
        if silent is not None and plan.view > silent and not self.is_primary:
            self.silent_through_view = None
            self._note("voting", f"resumes in view {plan.view} after lost votes")
        self.view_active = True
        self.new_views_installed += 1
        self.new_view_message = raw
        self.own_view_change = None
        for key in list(self.view_records):
            if key[0] == "vote" and key[2] != plan.view:
                self._persist(key, None)
                del self.view_records[key]
        self._record_view(("view",), pack([self.view, True]))
        self._record_view(("vote", "new_view", self.view, 0), raw)
        self.view_change_deadline_ms = None
        self.suspects = {}
        self.last_suspect_ms = None
        self.progress_deadline_ms = None
        self.last_primary_contact_ms = self.now_ms
        self.last_heartbeat_ms = self.now_ms
        for view in [view for view in self.view_changes if view <= self.view]:
            del self.view_changes[view]
        checkpoint = plan.checkpoint
        if checkpoint.seq > self.stable.seq:
            self._set_anchor(
                Anchor(
                    checkpoint.seq,
                    checkpoint.chain_hash,
                    checkpoint.ledger_digest,
                    plan.checkpoint_proof,
                )
            )
        for slot in self.slots.values():
            slot.reset_view()
        proposed: dict[tuple[int, int], None] = {}
        # Re-proposals at or below our own stable checkpoint are decided already.
        proposals = [proposal for proposal in proposals if proposal.seq > self.stable.seq]
        for proposal in proposals:
            slot = self._slot(proposal.seq)
            committed = slot.committed
            if committed is not None and committed.proposal.entry_digest != proposal.entry_digest:
                self._note("evidence", f"new view re-proposes seq {proposal.seq} differently")
            slot.accept(proposal)
            for request in proposal.requests:
                message = request.message
                if isinstance(message, Request):
                    proposed[(message.client_id, message.request_id)] = None
        last_planned = plan.last_seq
        self.next_seq = last_planned + 1
        self.new_view_planned_high = last_planned
        self.proposal_queue = {
            identity: None for identity in self.pending if identity not in proposed
        }
        # A new primary gets a full timeout for every request it inherits.
        for pending in self.pending.values():
            pending.arrived_ms = self.now_ms
        self._note("new_view", f"view {self.view} from checkpoint {checkpoint.seq}")
        if not self.is_primary:
            # Hand the new primary what we were waiting for, rather than wait for clients
            # to time out and send it again.
            primary = ("replica", self.config.primary_of(self.view))
            timed = [
                identity
                for identity, pending in self.pending.items()
                if identity[0] not in self.over_quota_clients and pending.relayer is None
            ]
            for identity in timed[:FORWARD_ON_NEW_VIEW_LIMIT]:
                if identity not in proposed:
                    self._send(primary, self.pending[identity].opened.raw)
        for proposal in proposals:
            self._advance(proposal.seq)
        if checkpoint.seq > self.last_executed:
            self.highest_seen_executed = max(self.highest_seen_executed, checkpoint.seq)
            self._fetch()
        self._maybe_propose()

    # --- retransmission and catch-up ----------------------------------------------------

    def _retransmit(self) -> None:
        """Send again what we signed for slots that have not moved for an interval, each slot
        on its own clock, so one lost message costs one interval, not two."""
        interval = self.config.retransmit_interval_ms
        if self.now_ms - self.last_retransmit_ms >= interval:
            self.last_retransmit_ms = self.now_ms
            # Checkpoints not yet stable: a lost CHECKPOINT would otherwise stall the window
            # for good once the log fills up to the high watermark.
            for seq in sorted(self.own_snapshots)[-CHECKPOINT_RETRANSMIT_LIMIT:]:
                own = self.checkpoint_votes.get(seq, {}).get(self.id)
                if seq > self.stable.seq and own is not None:
                    self._broadcast(own[2])
            if not self.view_active and self.own_view_change is not None:
                self._broadcast(self.own_view_change)
        if not self.view_active:
            return
        resent = 0
        for seq in sorted(self.slots):
            if resent >= RETRANSMIT_SLOT_LIMIT:
                break
            slot = self.slots[seq]
            if seq <= self.last_executed or slot.proposal is None:
                continue
            if self.now_ms - slot.last_progress_ms < interval:
                continue
            resent += 1
            slot.last_progress_ms = self.now_ms
            if self.is_primary:
                self._broadcast(slot.proposal.raw)
            for raw in (slot.own_prepare, slot.own_commit):
                if raw is not None:
                    self._broadcast(raw)

    def _maybe_fetch(self) -> None:
        if self._resume_transfer():
            return
        interval = self.config.retransmit_interval_ms
        behind_execution = (
            self.highest_seen_executed > self.last_executed
            and self.now_ms - self.last_execution_ms >= interval
        )
        # Executed far enough but never saw 2f + 1 checkpoints: the window cannot move.
        behind_stability = (
            self.highest_seen_executed >= self.stable.seq + self.config.watermark_window
        )
        if not (behind_execution or behind_stability):
            return
        if self.last_fetch_ms is not None and self.now_ms - self.last_fetch_ms < interval:
            return
        self._fetch()

    def _fetch(self) -> None:
        peers = [replica for replica in self.config.replica_ids() if replica != self.id]
        target = peers[self.fetch_rotation % len(peers)]
        self.fetch_rotation += 1
        self._send_fetch(target)

    def _fetch_from(self, target: int) -> None:
        """A FETCH to one peer that hinted we are behind, on the usual fetch interval."""
        interval = self.config.retransmit_interval_ms
        if self.last_fetch_ms is not None and self.now_ms - self.last_fetch_ms < interval:
            return
        self._send_fetch(target)

    def _send_fetch(self, target: int) -> None:
        self.last_fetch_ms = self.now_ms
        fetch = Fetch(self.id, self.last_executed + 1, self.stable.seq, self.view)
        self._send(("replica", target), seal(fetch, self.key))

    def _help_laggard(self, envelope: Envelope, message: Message) -> None:
        """A peer voting, in the view we are in, on an entry we executed a while ago is
        stuck there: send it, as if it had asked, what gets it moving, and no more.

        Unsolicited help is small, since whoever replays a replica's old vote makes us
        answer that replica: one commit certificate (the voted seq's), or, when the seq is
        at or below our stable checkpoint (it lacks that state), one signed CHECKPOINT as
        the hint to ask for it. Either makes it FETCH, and what a FETCH is answered with is
        paid from its byte budget. A vote of another view is no sign of being stuck in
        ours (a replica in an older view catches up through the NEW-VIEW), and a vote that
        is merely late (the entry committed moments ago) needs nothing."""
        if not isinstance(message, PrePrepare | Prepare | Commit):
            return
        if message.view != self.view or not self.view_active:
            return  # (counted as stale by the caller)
        interval = self.config.retransmit_interval_ms
        slot = self.slots.get(message.seq)
        if slot is not None and self.now_ms - slot.last_progress_ms < interval:
            return
        # Unsolicited help has its own budget, so it never eats into answers to FETCH.
        helped = self.help_served_ms.get(message.replica)
        if helped is not None and self.now_ms - helped < interval:
            return
        # Only now is the vote worth a signature check: a forged one must cost us nothing.
        verify_signature(envelope, message, self.verifier.keyring, self.verifier.cache)
        self.help_served_ms[message.replica] = self.now_ms
        requester = message.replica
        if message.seq <= self.stable.seq:
            hint = self._stable_checkpoint_vote()
            if hint is not None and self._catch_up_allowed(requester):
                self._send_catch_up(requester, hint)
            return
        self._send_certificates(requester, message.seq, HELP_CERTIFICATE_LIMIT)

    def _stable_checkpoint_vote(self) -> bytes | None:
        """A signed CHECKPOINT for our stable checkpoint (ours if we hold it): already
        signed, so the hint costs no signature."""
        votes = self.checkpoint_votes.get(self.stable.seq, {})
        own = votes.get(self.id)
        if own is not None:
            return own[2]
        return self.stable.proof[0] if self.stable.proof else None

    def _on_fetch(self, opened: Opened) -> None:
        fetch = opened.message
        if not isinstance(fetch, Fetch):
            raise Rejected("unexpected_type")
        self._serve_catch_up(fetch.replica, fetch.from_seq, fetch.stable_seq)
        if fetch.view < self.view and self.view_active and self.new_view_message is not None:
            # It missed the view we are in: the NEW-VIEW proves itself, it can install it.
            # Paid from the same byte budget as the rest of what catching up costs us.
            if self._catch_up_allowed(fetch.replica):
                self._send_catch_up(fetch.replica, self.new_view_message)

    def _catch_up_allowed(self, requester: int) -> bool:
        """Whether `requester` has byte budget left; checked before we build (and sign)
        anything for it, so a peer past its budget costs us nothing but this."""
        if self.catch_up_budget.may_spend(requester, self.now_ms):
            return True
        self._drop("catch_up_budget_exceeded", f"replica {requester}")
        return False

    def _send_catch_up(self, requester: int, raw: bytes) -> None:
        self.catch_up_budget.spend(requester, len(raw), self.now_ms)
        self._send(("replica", requester), raw)

    def _serve_catch_up(self, requester: int, from_seq: int, stable_seq: int) -> None:
        """Send `requester` what it needs from `from_seq` on: the first chunk of our stable
        checkpoint if it lacks that state, else commit certificates; within its byte budget,
        as a peer that keeps asking must not make us stream without end."""
        if requester == self.id or requester not in self.config.replica_ids():
            return
        if self.stable.seq > 0 and (from_seq <= self.stable.seq or stable_seq < self.stable.seq):
            # Certificates above the checkpoint are of no use to it until the state is in.
            if not self._send_state_chunk(requester, 0, OFFER_BYTES):
                return
        self._send_certificates(requester, from_seq, self.config.fetch_batch_limit)

    def _send_certificates(self, requester: int, from_seq: int, limit: int) -> None:
        """At most `limit` commit certificates from `from_seq` on, within the byte budget."""
        budget = limit
        for seq in range(max(from_seq, self.stable.seq + 1), self.last_executed + 1):
            if budget == 0:
                break
            slot = self.slots.get(seq)
            if slot is None or slot.committed is None:
                continue
            if not self._catch_up_allowed(requester):
                return
            certificate = CommitCertificate(
                self.id, slot.committed.proposal.raw, slot.committed.commits
            )
            self._send_catch_up(requester, seal(certificate, self.key))
            budget -= 1

    def _send_state_chunk(self, requester: int, start: int, byte_limit: int = 0) -> bool:
        """Send the chunk of our stable checkpoint from leaf `start`; True if that was the
        rest of the state (so what follows the checkpoint is of use to the requester)."""
        if not self._catch_up_allowed(requester):
            return False
        stable = self.stable
        try:
            data = self.chunk_server.chunk(
                stable.seq, stable.snapshot, start, MAX_FRAME_BYTES, byte_limit
            )
            if data is None:
                raise Rejected("bad_state_request", f"no leaf {start}")
            raw = seal(
                StateChunk(
                    self.id,
                    stable.seq,
                    stable.chain_hash,
                    stable.ledger_digest,
                    stable.proof,
                    data.leaf_count,
                    data.start,
                    data.level,
                    data.leaves,
                    data.path,
                ),
                self.key,
            )
            if len(raw) > MAX_FRAME_BYTES:
                raise StateTooLarge(f"chunk at leaf {start} is {len(raw)} bytes")
        except (StateTooLarge, DecodeError) as error:
            # One ledger leaf (a client's dedup table) larger than a frame.
            self.drops["state_too_large_to_send"] += 1
            self._note("state_too_large", f"checkpoint {stable.seq}: {error}")
            return False
        self._send_catch_up(requester, raw)
        return data.start + len(data.leaves) == data.leaf_count

    def _on_state_request(self, opened: Opened) -> None:
        request = opened.message
        if not isinstance(request, StateRequest):
            raise Rejected("unexpected_type")
        if request.replica == self.id or self.stable.seq == 0 or request.seq > self.stable.seq:
            raise Rejected("state_request_ahead", f"checkpoint {request.seq}")
        # Asked for an older checkpoint than ours: we no longer hold it, start it on ours.
        start = request.start if request.seq == self.stable.seq else 0
        self._send_state_chunk(request.replica, start)

    def _on_state_chunk(self, opened: Opened) -> None:
        chunk = opened.message
        if not isinstance(chunk, StateChunk):
            raise Rejected("unexpected_type")
        if chunk.seq <= self.stable.seq:
            return
        incoming = self.incoming
        known = incoming is not None and incoming.same_checkpoint(chunk)
        if not known:
            if incoming is not None and chunk.seq <= incoming.seq:
                raise Rejected("state_chunk_unexpected", f"checkpoint {chunk.seq}")
            # The proof first (a few signatures), the leaves only if the proof holds.
            self.verifier.checkpoint_proof(
                chunk.seq, chunk.chain_hash, chunk.ledger_digest, chunk.proof
            )
        if chunk.seq <= self.last_executed:
            self.incoming = None
            self._adopt_checkpoint_proof(
                chunk.seq, chunk.chain_hash, chunk.ledger_digest, chunk.proof
            )
            return
        if incoming is None or not known:
            if chunk.start != 0:
                raise Rejected("state_chunk_unexpected", f"leaf {chunk.start} first")
            incoming = self.incoming = IncomingTransfer(
                chunk.seq,
                chunk.chain_hash,
                chunk.ledger_digest,
                chunk.proof,
                source=chunk.replica,
                last_progress_ms=self.now_ms,
            )
        try:
            ledger = incoming.add(chunk, self.now_ms)
        except ChunkRejected as rejection:
            if rejection.reason != "state_chunk_unexpected":
                # Someone lied: go on (or start over) with a replica not shown to lie.
                self._request_state(incoming, incoming.next_source(self._peers()))
            raise Rejected(rejection.reason, rejection.detail) from None
        if ledger is None:
            self._request_state(incoming, chunk.replica)
            return
        self.incoming = None
        self._install_state(
            chunk.seq,
            chunk.chain_hash,
            chunk.ledger_digest,
            ledger,
            ledger.snapshot(),
            chunk.proof,
            chunk.replica,
        )

    def _peers(self) -> list[int]:
        return [replica for replica in self.config.replica_ids() if replica != self.id]

    def _request_state(self, incoming: IncomingTransfer, target: int) -> None:
        incoming.source = target
        request = StateRequest(self.id, incoming.seq, incoming.next_leaf)
        self._send(("replica", target), seal(request, self.key))

    def _resume_transfer(self) -> bool:
        """True while a state transfer is under way: FETCH then waits (a replica asked for a
        chunk of a checkpoint it has moved past answers with its newer one). One that
        stalled (a lost chunk, a slow or silent replica) asks the next replica for the same
        leaf, waiting twice as long each time in a row, so a loaded cluster is not made
        to answer the same request over and over."""
        incoming = self.incoming
        if incoming is None:
            return False
        doublings = min(incoming.stalls, self.config.max_timeout_doublings)
        timeout = STATE_TRANSFER_TIMEOUT_INTERVALS * self.config.retransmit_interval_ms
        if self.now_ms - incoming.last_progress_ms < timeout * 2**doublings:
            return True
        incoming.stalls += 1
        incoming.last_progress_ms = self.now_ms
        self._request_state(incoming, incoming.next_source(self._peers()))
        return True

    def _on_checkpoint_state(self, opened: Opened) -> None:
        state = opened.message
        if not isinstance(state, CheckpointState):
            raise Rejected("unexpected_type")
        if state.seq <= self.stable.seq:
            return
        # The proof first (a few signatures), the snapshot only if the proof holds.
        ledger_digest = state.ledger_digest
        self.verifier.checkpoint_proof(state.seq, state.chain_hash, ledger_digest, state.proof)
        if state.seq <= self.last_executed:
            self._adopt_checkpoint_proof(state.seq, state.chain_hash, ledger_digest, state.proof)
            return
        try:
            ledger = Ledger.restore(state.ledger_snapshot)
        except LedgerSnapshotError as error:
            raise Rejected("bad_snapshot", str(error)) from None
        if ledger.digest() != ledger_digest:
            raise Rejected("bad_snapshot", "the snapshot is not the state the proof names")
        self._install_state(
            state.seq,
            state.chain_hash,
            ledger_digest,
            ledger,
            state.ledger_snapshot,
            state.proof,
            state.replica,
        )

    def _adopt_checkpoint_proof(
        self, seq: int, chain_hash: bytes, ledger_digest: bytes, proof: tuple[bytes, ...]
    ) -> None:
        """We ran past a proven checkpoint already: the proof lets our own snapshot there
        become stable."""
        own = self.own_snapshots.get(seq)
        if own is None:
            return
        if own[:2] != (chain_hash, ledger_digest):
            self._halt(f"state diverged from 2f + 1 replicas at checkpoint {seq}")
            return
        self._make_stable(StableCheckpoint(seq, chain_hash, ledger_digest, own[2], proof))

    def _install_state(
        self,
        seq: int,
        chain_hash: bytes,
        ledger_digest: bytes,
        ledger: Ledger,
        snapshot: bytes,
        proof: tuple[bytes, ...],
        source: int,
    ) -> None:
        """Replace our state with a proven checkpoint's (verified against its digest)."""
        self.ledger = ledger
        self.last_executed = seq
        self.chain_hash = chain_hash
        self.last_execution_ms = self.now_ms
        if self.incoming is not None and self.incoming.seq <= seq:
            self.incoming = None
        self._forget_decided_requests()
        self._note("state_transfer", f"to checkpoint {seq} from replica {source}")
        if seq > self.stable.seq:
            self._make_stable(StableCheckpoint(seq, chain_hash, ledger_digest, snapshot, proof))
        self._execute_ready()

    def _forget_decided_requests(self) -> None:
        for identity in list(self.pending):
            decision = self.ledger.lookup(*identity)
            if decision is not None and decision.body_digest == self.pending[identity].body_digest:
                self._unpend(identity)

    def _on_commit_certificate(self, opened: Opened) -> None:
        message = opened.message
        if not isinstance(message, CommitCertificate):
            raise Rejected("unexpected_type")
        proposal = self.verifier.commit_certificate(message.pre_prepare, message.commits)
        if proposal.seq <= self.last_executed:
            return
        # A commit certificate proves itself: it may fill the gap below an anchor too.
        # Bounded all the same: at most a window ahead of what we executed or hold.
        if proposal.seq > self.last_executed + self.config.watermark_window:
            self.highest_seen_executed = max(self.highest_seen_executed, proposal.seq)
            raise Rejected("above_window", str(proposal.seq))
        slot = self._slot(proposal.seq)
        self._check_proposal_conflict(proposal)
        if slot.committed is not None:
            return
        self._commit(slot, CommittedEntry(proposal, message.commits))
        self._execute_ready()
        self._advance(proposal.seq + 1)

    def _check_proposal_conflict(self, proposal: Proposal) -> None:
        """A certified proposal that differs from the one its primary showed us."""
        slot = self.slots.get(proposal.seq)
        seen = slot.conflicting(proposal) if slot is not None else None
        if seen is not None:
            primary = self.config.primary_of(proposal.view)
            self._evidence("pre_prepare", primary, seen.raw, proposal.raw)

    def _halt(self, reason: str) -> None:
        """Stop for good: running on damaged or forked state would be worse than stopping."""
        self.halted = reason
        self._note("halt", reason)

    # --- recovery from storage ----------------------------------------------------------

    def _recover(self, records: Mapping[tuple[str | int, ...], bytes]) -> None:
        """Rebuild from what was persisted; outputs are discarded (nothing is re-sent)."""
        try:
            self._recover_records(records)
        except (DecodeError, Rejected, LedgerSnapshotError, ValueError, TypeError) as error:
            raise ReplicaInvariantError(f"replica {self.id}: unreadable storage: {error}") from None
        self._out = []

    def _recover_records(self, records: Mapping[tuple[str | int, ...], bytes]) -> None:
        checkpoint = records.get(("checkpoint",))
        if checkpoint is not None:
            seq, chain_hash, ledger_digest, snapshot, proof = unpack(
                checkpoint, MAX_LOCAL_RECORD_BYTES
            )
            self.ledger = Ledger.restore(snapshot)
            self.stable = StableCheckpoint(seq, chain_hash, ledger_digest, snapshot, tuple(proof))
            self.last_executed = seq
            self.chain_hash = chain_hash
        anchor_record = records.get(("anchor",))
        if anchor_record is not None:
            seq, chain_hash, ledger_digest, proof = unpack(anchor_record)
            self.verifier.checkpoint_proof(seq, chain_hash, ledger_digest, proof)
            if seq > self.stable.seq:
                self.view_anchor = Anchor(seq, chain_hash, ledger_digest, tuple(proof))
        view_record = records.get(("view",))
        if view_record is not None:
            self.view, self.view_active = unpack(view_record)
            self.view_records[("view",)] = None
        for key in sorted(records, key=_record_order):
            value = records[key]
            kind = key[0]
            if kind == "committed":
                pre_prepare, commits = unpack(value)
                proposal = self.verifier.commit_certificate(pre_prepare, commits)
                slot = self._slot(proposal.seq)
                slot.committed = CommittedEntry(proposal, tuple(commits))
                slot.persisted_keys[key] = None
            elif kind == "prepared":
                view, certificate_wire = unpack(value)
                certificate = PreparedCertificate.from_wire(certificate_wire)
                proposal = self.verifier.prepared_certificate(certificate)
                slot = self._slot(proposal.seq)
                slot.best_prepared = PreparedEntry(view, proposal, certificate)
                slot.persisted_keys[key] = None
            elif kind == "vote":
                _, vote_kind, view, seq = key
                if vote_kind in ("view_change", "new_view"):
                    self.view_records[key] = None
                    if vote_kind == "view_change" and view == self.view and not self.view_active:
                        self.own_view_change = value
                    if vote_kind == "new_view" and view == self.view:
                        self.new_view_message = value
                    continue
                self._recover_vote(str(vote_kind), int(view), int(seq), key, value)
        if self.view_active and self.new_view_message is not None:
            self._recover_new_view(self.new_view_message)
        self._execute_ready()
        if not self.view_active and self.own_view_change is not None:
            self._store_view_change(verify_view_change(self.own_view_change, self.verifier))

    def _recover_new_view(self, raw: bytes) -> None:
        """Re-install the active view's NEW-VIEW plan into the slots, verified again as if it
        came from the network. Without it a restarted backup would take a fresh PRE-PREPARE
        from the primary at a sequence number the NEW-VIEW assigned (a fork)."""
        message = self.verifier.open(raw, NewView).message
        if not isinstance(message, NewView) or message.view != self.view:
            raise Rejected("bad_new_view", "the recorded NEW-VIEW is not for the current view")
        plan, proposals = self._verify_new_view(message)
        for proposal in proposals:
            if proposal.seq <= self.stable.seq:
                continue
            slot = self._slot(proposal.seq)
            if slot.proposal is None:
                slot.accept(proposal)
            elif slot.proposal.entry_digest != proposal.entry_digest:
                raise ReplicaInvariantError(
                    f"replica {self.id}: own pre-prepare at seq {proposal.seq} differs from "
                    f"the NEW-VIEW of view {self.view}"
                )
        last_planned = plan.last_seq
        self.new_view_planned_high = last_planned
        self.next_seq = max(self.next_seq, last_planned + 1)

    def _recover_vote(
        self, kind: str, view: int, seq: int, key: tuple[str | int, ...], raw: bytes
    ) -> None:
        slot = self._slot(seq)
        slot.persisted_keys[key] = None
        opened = self.verifier.open(raw)
        message = opened.message
        if isinstance(message, PrePrepare):
            slot.own_votes[(kind, view)] = hashlib.sha256(message.encode()).digest()
            if view == self.view and self.view_active:
                slot.proposal = self.verifier.proposal(raw)
                self.next_seq = max(self.next_seq, seq + 1)
        elif isinstance(message, Prepare | Commit):
            slot.own_votes[(kind, view)] = message.entry_digest

    _handlers: dict[type[Message], object] = {}


def _record_order(key: tuple[str | int, ...]) -> tuple[int, int]:
    """Replay committed entries in sequence order, the rest after them."""
    kind = key[0]
    if kind == "committed":
        return (0, int(key[1]))
    if kind == "prepared":
        return (1, int(key[1]))
    if kind == "vote":
        return (2, int(key[3]))
    return (3, 0)


Replica._handlers = {
    Request: Replica._on_request,
    PrePrepare: Replica._on_pre_prepare,
    Prepare: Replica._on_vote,
    Commit: Replica._on_vote,
    Heartbeat: Replica._on_heartbeat,
    Suspect: Replica._on_suspect,
    Checkpoint: Replica._on_checkpoint,
    ViewChange: Replica._on_view_change,
    NewView: Replica._on_new_view,
    Fetch: Replica._on_fetch,
    CheckpointState: Replica._on_checkpoint_state,
    StateChunk: Replica._on_state_chunk,
    StateRequest: Replica._on_state_request,
    CommitCertificate: Replica._on_commit_certificate,
    BalanceQuery: Replica._on_balance_query,
}
