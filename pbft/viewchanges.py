"""Liveness: heartbeats, suspicion, VIEW-CHANGE and NEW-VIEW.

The primary sends heartbeats when idle (and under load). A backup whose timers expire (no
word from the primary, a request not ordered in time, work not completed) sends SUSPECT;
f + 1 suspicions of the same view start a VIEW-CHANGE, so one cut-off replica cannot
unseat a working primary, and f + 1 replicas in later views make a replica join them.
The new primary's NEW-VIEW is verified by recomputing its plan from the view changes it
cites (pbft/viewchange.py). Each view given up on doubles the view timeouts.
"""

from __future__ import annotations

from pbft.certificates import Proposal
from pbft.codec import pack
from pbft.context import Anchor, Context, ReplicaInvariantError
from pbft.drops import DropReason
from pbft.events import NoteKind
from pbft.messages import Heartbeat, NewView, PrePrepare, Request, Suspect, ViewChange
from pbft.quorum import vouched_by
from pbft.signed import Opened, Rejected, seal
from pbft.status import ViewStatus
from pbft.timeout import Timeout
from pbft.viewchange import NewViewPlan, VerifiedViewChange, plan_new_view, verify_view_change

FORWARD_ON_NEW_VIEW_LIMIT = 256
OWN_VIEW_CHANGES_KEPT = 4
# A request that other requests overtake (beyond what overload explains) may still wait this
# many view-change timeouts before its primary is suspected: see request_timer_fired.
REQUEST_TIMEOUTS_UNDER_LOAD = 4
# Requests that reached the primary but not this backup (a client's retransmission lost on
# the way here) are ordered past the oldest request it holds although they were ahead of
# it: a correct primary may pass it by this many beyond the batches in flight. A run this
# long of lost retransmissions between two requests is vanishingly rare at any loss rate
# short of a fault, and a censor is caught this many requests later.
OVERTAKE_SLACK = 16


class ViewChanges:
    """Failure detection and view change; owns the view timeouts and their backoff."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        config = ctx.config
        view_timeout_ms = config.view_change_timeout_ms
        # Primary: heartbeats, sent when it runs out.
        self.heartbeat_timeout = Timeout("heartbeat", config.heartbeat_interval_ms, started_ms=0)
        # Backup: no word from the primary (a PRE-PREPARE, a heartbeat) for this long.
        self.primary_timeout = Timeout("primary", view_timeout_ms, started_ms=0)
        # Backup: work it saw proposed (or requests it holds) not executed in time.
        self.progress_timeout = Timeout("progress", view_timeout_ms)
        # Between view changes: the new primary did not install its view in time.
        self.view_change_timeout = Timeout("view_change", view_timeout_ms)
        # Rate limits: one SUSPECT per view timeout; the backoff comes down one step at
        # most once per view timeout.
        self.suspect_timeout = Timeout("suspect", view_timeout_ms)
        self.backoff_decay_timeout = Timeout("backoff_decay", view_timeout_ms, started_ms=0)
        self.suspects: dict[int, int] = {}
        self.failed_views = 0
        self.view_changes: dict[int, dict[int, VerifiedViewChange]] = {}
        self.latest_view_claims: dict[int, int] = {}
        self.view_claim_ms: dict[int, int] = {}
        self.own_view_change: bytes | None = None
        # Our view changes for the last few views, to hand to replicas stuck in them.
        self.own_view_changes: dict[int, bytes] = {}
        self.new_view_message: bytes | None = None
        self.view_records: dict[tuple[str | int, ...], None] = {}
        self.view_changes_started = 0
        self.new_views_installed = 0

    def heard_from_primary(self) -> None:
        self.primary_timeout.start(self.ctx.now_ms)

    def progress_made(self) -> None:
        """An entry executed: the work being watched got done."""
        self.progress_timeout.stop()

    def ease_backoff(self) -> None:
        """Progress (a stable checkpoint): the timeouts may come back down one step, but at
        most once per timeout period, or frequent checkpoints would undo the backoff before
        it can help."""
        if self.failed_views and self.backoff_decay_timeout.fired(self.ctx.now_ms):
            self.set_failed_views(self.failed_views - 1)
            self.backoff_decay_timeout.start(self.ctx.now_ms)

    def retransmit(self) -> None:
        """Our VIEW-CHANGE again while the view is not installed."""
        if self.ctx.status is ViewStatus.VIEW_CHANGE and self.own_view_change is not None:
            self.ctx.broadcast(self.own_view_change)

    def check_view(self, view: int, sender: int) -> None:
        if view != self.ctx.view or self.ctx.status is ViewStatus.VIEW_CHANGE:
            if view > self.ctx.view:
                self._claim_view(sender, view)
            raise Rejected(DropReason.WRONG_VIEW, f"view {view}, ours {self.ctx.view}")

    def on_heartbeat(self, heartbeat: Heartbeat, opened: Opened) -> None:
        if heartbeat.replica != self.ctx.config.primary_of(heartbeat.view):
            raise Rejected(DropReason.NOT_PRIMARY, "heartbeat")
        # Even from a later view: how far the cluster got is what tells us to catch up. One
        # heartbeat is a hint (ask its sender, who must then prove it with certificates);
        # only f + 1 replicas' claims move highest_seen_executed.
        self.ctx.catchup.claim_executed(heartbeat.replica, heartbeat.last_executed)
        if heartbeat.view > self.ctx.view or (
            heartbeat.view == self.ctx.view and self.ctx.status is ViewStatus.VIEW_CHANGE
        ):
            # A primary of a later view: we missed its NEW-VIEW (we restarted, or were cut
            # off while the cluster went idle). Ask it; a FETCH names our view.
            self.ctx.catchup.fetch_from(heartbeat.replica)
        elif (
            heartbeat.last_executed > self.ctx.ordering.last_executed
            and self.ctx.catchup.incoming is None
        ):
            # (A state transfer under way fetches for itself.)
            self.ctx.catchup.fetch_from(heartbeat.replica)
        if (
            heartbeat.last_executed < self.ctx.ordering.last_executed
            and heartbeat.view <= self.ctx.view
        ):
            # The primary itself is behind (it restarted, or lost its disk): with no load
            # nothing else would ever tell it.
            self.ctx.catchup.help_behind_primary(heartbeat.replica, heartbeat.last_executed)
        self.check_view(heartbeat.view, heartbeat.replica)
        self.primary_timeout.start(self.ctx.now_ms)

    def on_suspect(self, suspect: Suspect, opened: Opened) -> None:
        if suspect.view != self.ctx.view or self.ctx.status is ViewStatus.VIEW_CHANGE:
            if suspect.view > self.ctx.view:
                self._claim_view(suspect.replica, suspect.view)
            return
        self.suspects[suspect.replica] = self.ctx.now_ms
        self._check_suspects()

    def _timeout_ms(self) -> int:
        doublings = min(self.failed_views, self.ctx.config.max_timeout_doublings)
        return self.ctx.config.view_change_timeout_ms * (2**doublings)

    def set_failed_views(self, failed_views: int) -> None:
        """Each view given up on doubles the view timeouts (up to a limit); progress brings
        them back down. The timeouts measured against the current backoff take it at once;
        the deadlines (progress, view change) take it when they are next started."""
        self.failed_views = failed_views
        doublings = min(failed_views, self.ctx.config.max_timeout_doublings)
        for timeout in (self.primary_timeout, self.suspect_timeout, self.backoff_decay_timeout):
            timeout.backoff(doublings)

    def _start_deadline(self, timeout: Timeout) -> None:
        """Start a deadline at the current backoff, fixed until it is started again."""
        timeout.backoff(min(self.failed_views, self.ctx.config.max_timeout_doublings))
        timeout.start(self.ctx.now_ms)

    def on_heartbeat_timeout(self) -> None:
        # Sent under load too (as Raft's leader does): it tells backups how far the
        # primary got, which is how a backup that lost a message learns it is behind.
        self.heartbeat_timeout.start(self.ctx.now_ms)
        heartbeat = Heartbeat(
            self.ctx.view,
            self.ctx.id,
            self.ctx.ordering.next_seq - 1,
            self.ctx.ordering.last_executed,
        )
        self.ctx.broadcast(seal(heartbeat, self.ctx.key))

    def on_primary_timeout(self) -> None:
        self._suspect("no heartbeat")

    def request_timer_fired(self) -> bool:
        """PBFT's request timer, judging progress rather than age alone (as Aardvark and
        BFT-SMaRt do). Only correct clients' requests count (see over_quota_clients), and
        only the oldest this replica holds: the one at the head of its queue.

        - The primary orders no request for a timeout while one waits (silent, stalled, or
          proposing only null batches), or only part-full batches that leave behind
          requests this replica held for a timeout (a slow primary trickling its queue;
          Requests.count_ordered): suspect it after one timeout.
        - The primary keeps ordering, and the waiting request moves towards the head: the
          requests ordered past it are within what a correct primary may order first
          (overtake_limit; see Requests.count_ordered for what counts). That is a backlog,
          however long it takes to drain at the rate the window allows: no suspicion (a
          correct primary under overload must not be deposed; it would only lose the
          batches in flight and double the timeouts).
        - The primary keeps ordering, but others' requests past this one, beyond that
          limit: censorship. Suspect it once the request has also waited
          REQUEST_TIMEOUTS_UNDER_LOAD timeouts (a request legitimately waits behind the
          batches in flight). So a censored request deposes the primary within
          max(REQUEST_TIMEOUTS_UNDER_LOAD timeouts, the time to order overtake_limit + 1
          other requests), and one delayed behind a trickle within a timeout per request
          ahead of it.
        Measured from each request's arrival, so it is not a `Timeout` of its own."""
        oldest = self.ctx.requests.oldest_timed()
        if oldest is None:
            return False
        pending, overtaken = oldest
        timeout = self._timeout_ms()
        now = self.ctx.now_ms
        age = now - pending.arrived_ms
        if age < timeout:
            return False
        if now - max(pending.arrived_ms, self.ctx.requests.last_ordered_ms) >= timeout:
            return True
        return overtaken > self.overtake_limit() and age >= REQUEST_TIMEOUTS_UNDER_LOAD * timeout

    def overtake_limit(self) -> int:
        """How many requests a correct primary may order past the oldest request a backup
        holds: those in the batches already in flight when it became the oldest (at most
        max_inflight_batches, never beyond the window), those queued ahead of it at the
        primary (at most its table of pending requests, pending_request_limit), which this
        backup may never have held, and OVERTAKE_SLACK it missed. Requests that merely
        raced it on the network do not count (Requests.count_ordered).

        The queue ahead: clients send to the primary first and to everyone only when it
        is slow, so the backlog a first-come-first-served primary orders ahead of a
        request is one the backups never saw, and it may take any number of timeouts to
        drain (review finding F2: the limit without it deposed a correct primary under
        load). The backup cannot tell that backlog from requests a censor orders past the
        victim, and a count the primary announced could not be checked either, so the
        limit is the most a correct primary can have queued. A Byzantine primary gains
        at most that: past the limit it is suspected, and before it every batch it orders
        must be full, one per timeout at least, or the no-progress rule suspects it within
        a timeout (count_ordered). So it delays each request this backup holds at most
        max(REQUEST_TIMEOUTS_UNDER_LOAD, (limit + 1) / batch_size + 1) timeouts from that
        request's own arrival, a bound of the configuration, whatever clients it colludes
        with: every request is counted from when it arrived, not from when it became the
        oldest (review finding O1), so the requests behind it do not add up their waits.
        With the defaults (batch_size 32, 4 batches in flight, pending_request_limit 8,192,
        timeout 300 ms) the limit is 128 + 8,192 + 16 = 8,336 requests and the bound
        261.5 timeouts, 78.5 s per request."""
        config = self.ctx.config
        in_flight = min(config.max_inflight_batches, config.watermark_window) * config.batch_size
        return in_flight + config.pending_request_limit + OVERTAKE_SLACK

    def on_request_timeout(self) -> None:
        self._suspect("request not ordered")

    def watch_progress(self) -> None:
        """Run the progress timeout while there is work (requests held, entries proposed
        and not committed), stop it when there is none."""
        has_work = self.ctx.requests.oldest_timed_request() is not None or any(
            slot.proposal is not None and slot.committed is None
            for seq, slot in self.ctx.ordering.slots.items()
            if seq > self.ctx.ordering.last_executed
        )
        if not has_work:
            self.progress_timeout.stop()
        elif not self.progress_timeout.running:
            self._start_deadline(self.progress_timeout)
        elif self.progress_timeout.fired(self.ctx.now_ms):
            self.on_progress_timeout()

    def on_progress_timeout(self) -> None:
        self._suspect("work not completed")

    def on_view_change_timeout(self) -> None:
        # The new primary did not install the view in time: try the next one.
        self._start_view_change(self.ctx.view + 1)

    def _suspect(self, reason: str) -> None:
        if not self.suspect_timeout.quiet(self.ctx.now_ms):
            return
        self.suspect_timeout.start(self.ctx.now_ms)
        self.suspects[self.ctx.id] = self.ctx.now_ms
        self.ctx.note(NoteKind.SUSPECT, f"view {self.ctx.view}: {reason}")
        self.ctx.broadcast(seal(Suspect(self.ctx.view, self.ctx.id), self.ctx.key))
        self._check_suspects()

    def _check_suspects(self) -> None:
        # Old suspicions fade, so transient hiccups far apart do not add up to a view change.
        horizon = self.ctx.now_ms - 4 * self._timeout_ms()
        self.suspects = {
            replica: when for replica, when in self.suspects.items() if when >= horizon
        }
        # A replica already in a later view has given up on this one: that is suspicion too.
        # Claims fade like suspicions: one absurd view number sent once must not count
        # against every later primary forever.
        suspecting = dict.fromkeys(self.suspects) | {
            replica: None
            for replica, view in self.latest_view_claims.items()
            if view > self.ctx.view and self.view_claim_ms.get(replica, horizon - 1) >= horizon
        }
        if len(suspecting) >= self.ctx.config.weak_quorum:
            self._start_view_change(self.ctx.view + 1)

    def _claim_view(self, sender: int, view: int) -> None:
        """A peer showed it is in a later view; f + 1 such peers mean we fell behind."""
        if view > self.ctx.view:
            self.view_claim_ms[sender] = self.ctx.now_ms
        previous = self.latest_view_claims.get(sender, -1)
        if view <= previous:
            return
        self.latest_view_claims[sender] = view
        ahead = (claimed for claimed in self.latest_view_claims.values() if claimed > self.ctx.view)
        joined = vouched_by(ahead, self.ctx.config.weak_quorum)
        if joined is not None and joined > self.ctx.view:
            # At least one correct replica is in a view >= this one: join it.
            self._start_view_change(joined)
        elif self.ctx.status is ViewStatus.NORMAL:
            self._check_suspects()

    def _start_view_change(self, new_view: int) -> None:
        if new_view <= self.ctx.view:
            return
        self.ctx.view = new_view
        self.ctx.status = ViewStatus.VIEW_CHANGE
        self.view_changes_started += 1
        # Each view given up on doubles the timeouts, so a slow network still gets a view
        # that lasts long enough to make progress (PBFT's exponential backoff).
        self.set_failed_views(self.failed_views + 1)
        self.backoff_decay_timeout.start(self.ctx.now_ms)
        self.view_change_timeout.stop()
        self.suspects = {}
        self.progress_timeout.stop()
        self.ctx.requests.leave_view()
        self.ctx.ordering.leave_view()
        # Cite the highest checkpoint we hold a proof for: our stable one, or the anchor a
        # NEW-VIEW gave us. Entries prepared above the anchor may have committed; citing
        # the lower checkpoint would leave them out of the window and lose them.
        cited = (
            self.ctx.checkpoints.view_anchor
            if self.ctx.checkpoints.view_anchor is not None
            else self.ctx.checkpoints.stable
        )
        window_high = cited.seq + self.ctx.config.watermark_window
        prepared = [
            slot.best_prepared.certificate
            for seq, slot in sorted(self.ctx.ordering.slots.items())
            if cited.seq < seq <= window_high and slot.best_prepared is not None
        ]
        view_change = ViewChange(
            new_view,
            self.ctx.id,
            cited.seq,
            cited.chain_hash,
            cited.ledger_digest,
            cited.proof,
            tuple(prepared),
        )
        raw = seal(view_change, self.ctx.key)
        self.own_view_change = raw
        self.own_view_changes[new_view] = raw
        for old in [
            old for old in self.own_view_changes if old <= new_view - OWN_VIEW_CHANGES_KEPT
        ]:
            del self.own_view_changes[old]
        self._record_view(("view",), pack([self.ctx.view, False]))
        self._record_view(("vote", "view_change", new_view, 0), raw)
        self.ctx.note(NoteKind.VIEW_CHANGE, f"to view {new_view}")
        self.ctx.broadcast(raw)
        try:
            own = verify_view_change(raw, self.ctx.verifier)
        except Rejected as rejection:
            raise ReplicaInvariantError(f"own view change is invalid: {rejection}") from None
        self.store_view_change(own)
        self._arm_view_change_timer()
        self._maybe_send_new_view()

    def _arm_view_change_timer(self) -> None:
        """PBFT's rule: wait for the new view only once 2f + 1 replicas asked for it.

        A replica alone (cut off, or slow) would otherwise climb views by itself and end
        up where no quorum ever follows it; with this rule the correct replicas' views
        stay within one of each other, and the f + 1 join rule pulls laggards up.
        """
        if self.ctx.status is ViewStatus.NORMAL or self.view_change_timeout.running:
            return
        if len(self.view_changes.get(self.ctx.view, {})) >= self.ctx.config.quorum:
            self._start_deadline(self.view_change_timeout)

    def _record_view(self, key: tuple[str | int, ...], value: bytes) -> None:
        self.view_records[key] = None
        self.ctx.persist(key, value)

    def store_view_change(self, change: VerifiedViewChange) -> None:
        sender = change.message.replica
        new_view = change.message.new_view
        # One view change per sender: the latest. Bounded, whatever a peer sends.
        for view, changes in list(self.view_changes.items()):
            if sender in changes and view != new_view:
                del changes[sender]
                if not changes:
                    del self.view_changes[view]
        self.view_changes.setdefault(new_view, {})[sender] = change

    def on_view_change(self, message: ViewChange, opened: Opened) -> None:
        if message.new_view < self.ctx.view or (
            message.new_view == self.ctx.view and self.ctx.status is ViewStatus.NORMAL
        ):
            to = ("replica", message.replica)
            if self.ctx.status is ViewStatus.NORMAL and self.new_view_message is not None:
                # It missed the NEW-VIEW we installed (or is still trying an older view):
                # the NEW-VIEW proves itself, it can install it directly.
                self.ctx.send(to, self.new_view_message)
            elif message.new_view in self.own_view_changes:
                # It is stuck short of 2f + 1 view changes for a view we already left: our
                # own, lost on the way, lets it arm its timer and follow us.
                self.ctx.send(to, self.own_view_changes[message.new_view])
            return
        change = verify_view_change(opened.raw, self.ctx.verifier)
        for proposal in change.prepared.values():
            self.ctx.ordering.check_proposal_conflict(proposal)
        self.store_view_change(change)
        self._claim_view(message.replica, message.new_view)
        self._arm_view_change_timer()
        self._maybe_send_new_view()

    def _maybe_send_new_view(self) -> None:
        if (
            self.ctx.status is ViewStatus.NORMAL
            or not self.ctx.is_primary
            or self.ctx.silent_through_view is not None
        ):
            return
        changes = self.view_changes.get(self.ctx.view, {})
        if self.ctx.id not in changes or len(changes) < self.ctx.config.quorum:
            return
        others = [change for replica, change in sorted(changes.items()) if replica != self.ctx.id]
        chosen = [changes[self.ctx.id], *others[: self.ctx.config.quorum - 1]]
        plan = plan_new_view(self.ctx.view, chosen)
        pre_prepares = []
        for entry in plan.entries:
            pre_prepare = PrePrepare(
                self.ctx.view,
                entry.seq,
                self.ctx.id,
                entry.prev_hash,
                entry.batch_digest,
                entry.requests,
                entry.timestamp_ms,
            )
            pre_prepares.append(
                self.ctx.ordering.vote(
                    self.ctx.ordering.slot(entry.seq), "pre_prepare", pre_prepare
                )
            )
        new_view = NewView(
            self.ctx.view,
            self.ctx.id,
            tuple(change.opened.raw for change in chosen),
            tuple(pre_prepares),
        )
        raw = seal(new_view, self.ctx.key)
        # Durable before it leaves: after a crash we must re-send this NEW-VIEW, never sign
        # a different one for the same view.
        self._record_view(("view",), pack([self.ctx.view, True]))
        self._record_view(("vote", "new_view", self.ctx.view, 0), raw)
        self.ctx.broadcast(raw)
        proposals = [self.ctx.verifier.proposal(pre_prepare) for pre_prepare in pre_prepares]
        self._install_view(plan, proposals, raw)

    def on_new_view(self, message: NewView, opened: Opened) -> None:
        if message.view < self.ctx.view or (
            message.view == self.ctx.view and self.ctx.status is ViewStatus.NORMAL
        ):
            return
        plan, proposals = self.verify_new_view(message)
        self._install_view(plan, proposals, opened.raw)

    def verify_new_view(self, message: NewView) -> tuple[NewViewPlan, list[Proposal]]:
        """Check a NEW-VIEW as PBFT asks: recompute its plan from the view changes it cites
        and require its re-proposals to be exactly that plan."""
        if message.replica != self.ctx.config.primary_of(message.view):
            raise Rejected(DropReason.NOT_PRIMARY, "new-view")
        changes: dict[int, VerifiedViewChange] = {}
        for raw in message.view_changes:
            change = verify_view_change(raw, self.ctx.verifier)
            if change.message.new_view != message.view:
                raise Rejected(DropReason.BAD_NEW_VIEW, "a view change for another view")
            if change.message.replica in changes:
                raise Rejected(DropReason.BAD_NEW_VIEW, "two view changes from one replica")
            changes[change.message.replica] = change
        if len(changes) < self.ctx.config.quorum:
            raise Rejected(DropReason.BAD_NEW_VIEW, f"{len(changes)} view changes, need 2f + 1")
        plan = plan_new_view(message.view, list(changes.values()))
        if len(message.pre_prepares) != len(plan.entries):
            raise Rejected(DropReason.BAD_NEW_VIEW, "re-proposals differ from the recomputed ones")
        proposals = []
        for raw, entry in zip(message.pre_prepares, plan.entries, strict=True):
            proposal = self.ctx.verifier.proposal(raw)
            if (
                proposal.view,
                proposal.seq,
                proposal.prev_hash,
                proposal.batch_digest,
                proposal.timestamp_ms,
            ) != (message.view, entry.seq, entry.prev_hash, entry.batch_digest, entry.timestamp_ms):
                raise Rejected(DropReason.BAD_NEW_VIEW, f"re-proposal for seq {entry.seq} differs")
            proposals.append(proposal)
        return plan, proposals

    def _install_view(self, plan: NewViewPlan, proposals: list[Proposal], raw: bytes) -> None:
        if plan.view != self.ctx.view:
            self.ctx.view = plan.view
        silent = self.ctx.silent_through_view
        if silent is not None and plan.view > silent and not self.ctx.is_primary:
            self.ctx.silent_through_view = None
            self.ctx.note(NoteKind.VOTING, f"resumes in view {plan.view} after lost votes")
        self.ctx.status = ViewStatus.NORMAL
        self.new_views_installed += 1
        self.new_view_message = raw
        self.own_view_change = None
        for key in list(self.view_records):
            if key[0] == "vote" and key[2] != plan.view:
                self.ctx.persist(key, None)
                del self.view_records[key]
        self._record_view(("view",), pack([self.ctx.view, True]))
        self._record_view(("vote", "new_view", self.ctx.view, 0), raw)
        self.view_change_timeout.stop()
        self.suspects = {}
        self.suspect_timeout.stop()
        self.progress_timeout.stop()
        self.primary_timeout.start(self.ctx.now_ms)
        self.heartbeat_timeout.start(self.ctx.now_ms)
        for view in [view for view in self.view_changes if view <= self.ctx.view]:
            del self.view_changes[view]
        checkpoint = plan.checkpoint
        if checkpoint.seq > self.ctx.checkpoints.stable.seq:
            self.ctx.checkpoints.set_anchor(
                Anchor(
                    checkpoint.seq,
                    checkpoint.chain_hash,
                    checkpoint.ledger_digest,
                    plan.checkpoint_proof,
                )
            )
        for slot in self.ctx.ordering.slots.values():
            slot.reset_view()
        proposed: dict[tuple[int, int], None] = {}
        # Re-proposals at or below our own stable checkpoint are decided already.
        proposals = [
            proposal for proposal in proposals if proposal.seq > self.ctx.checkpoints.stable.seq
        ]
        for proposal in proposals:
            slot = self.ctx.ordering.slot(proposal.seq)
            committed = slot.committed
            if committed is not None and committed.proposal.entry_digest != proposal.entry_digest:
                self.ctx.note(
                    NoteKind.EVIDENCE, f"new view re-proposes seq {proposal.seq} differently"
                )
            slot.accept(proposal)
            for request in proposal.requests:
                message = request.message
                if isinstance(message, Request):
                    proposed[(message.client_id, message.request_id)] = None
        self.ctx.ordering.enter_view(plan.last_seq)
        self.ctx.requests.enter_view(proposed)
        self.ctx.note(NoteKind.NEW_VIEW, f"view {self.ctx.view} from checkpoint {checkpoint.seq}")
        if not self.ctx.is_primary:
            # Hand the new primary what we were waiting for, rather than wait for clients
            # to time out and send it again.
            primary = ("replica", self.ctx.config.primary_of(self.ctx.view))
            for identity in self.ctx.requests.timed()[:FORWARD_ON_NEW_VIEW_LIMIT]:
                if identity not in proposed:
                    self.ctx.send(primary, self.ctx.requests.pending[identity].opened.raw)
        for proposal in proposals:
            self.ctx.ordering.advance(proposal.seq)
        if checkpoint.seq > self.ctx.ordering.last_executed:
            self.ctx.catchup.saw_executed(checkpoint.seq)
            self.ctx.catchup.fetch()
        self.ctx.ordering.maybe_propose()
