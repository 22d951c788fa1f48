"""Request intake: client requests known and not executed, their quotas, and batching order.

A request is admitted once (it is then pending until executed), within the table's
limit and its client's quota; a client over its quota is marked, its backlog arms no
request timer and gets only a share of each batch. At the primary, a request a backup
relays may be charged to that backup's share instead (see relayed_per_client). A
retransmission of a decided request is answered with the reply signed then.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import Counter
from collections.abc import Mapping
from itertools import islice
from typing import TypeVar

from crypto.keys import Principal
from pbft.budget import TokenBuckets
from pbft.context import Context, PendingRequest
from pbft.drops import DropReason
from pbft.messages import BalanceQuery, BalanceReply, Request
from pbft.replies import ReplyResult
from pbft.signed import Opened, Rejected, seal
from pbft.status import ViewStatus

# Of each batch, at most this fraction goes to clients over their quota (see next_batch).
OVER_QUOTA_BATCH_SHARE = 4
# The primary orders at most this many requests a second of clients over their quota, all
# such clients together (see next_batch). Every request ordered costs every replica a
# signature check, an execution and a signed reply; a client past its quota broke the
# client contract, and ordering its backlog as fast as the pipeline allows made the
# client_flood attack cost correct clients several times their latency.
OVER_QUOTA_ORDER_RATE_PER_S = 50


K = TypeVar("K")


class Requests:
    """Which client requests a replica holds, whose quota they count against, and the
    order they are batched in."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        config = ctx.config
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
        # Primary only: the pace of ordering over-quota clients' backlog (one bucket, key 0).
        self.backlog_budget = TokenBuckets(OVER_QUOTA_ORDER_RATE_PER_S, config.batch_size)
        self.client_budget = TokenBuckets(
            config.client_replay_rate_per_s, config.client_replay_burst
        )
        # Primary only: pending requests not yet proposed in this view, in arrival order.
        self.proposal_queue: dict[tuple[int, int], None] = {}
        # How a backup judges the primary's progress (see count_ordered): when a request was
        # last executed here; how many requests it never held were executed in all (each
        # pending request keeps the figure at its arrival: the difference is what overtook
        # it); and the arrival times, ascending, of executed requests that may have arrived
        # here more than a timeout after the oldest pending one (late_arrivals_kept at most).
        self.last_ordered_ms = 0
        self.never_held_ordered = 0
        self.late_arrivals: list[int] = []
        # The arrival times of the pending requests the batch being executed took.
        self._executed_arrivals: list[int] = []

    def leave_view(self) -> None:
        """The view is given up: nothing waits to be proposed in it."""
        self.proposal_queue = {}

    def enter_view(self, proposed: Mapping[tuple[int, int], None]) -> None:
        """A NEW-VIEW re-proposed `proposed`: the rest of what is pending waits to be
        proposed in the new view, and a new primary gets a full timeout for every
        request it inherits."""
        self.proposal_queue = {
            identity: None for identity in self.pending if identity not in proposed
        }
        for pending in self.pending.values():
            pending.arrived_ms = self.ctx.now_ms
            pending.never_held_mark = self.never_held_ordered
        self.late_arrivals = []

    def refused_for_quota(self, request: Request, link: Principal | None) -> bool:
        """Whether `on_request` would refuse this request for its client's quota, decided
        before its signature is checked. Only for a client already marked over its quota
        (by a request whose signature was checked: a forgery naming a correct client cannot
        get it marked), only a new request (a pending or decided one takes its usual path:
        a relay, a kept reply), and not one a backup relays within its share."""
        client_id = request.client_id
        return (
            client_id in self.over_quota_clients
            and self.pending_per_client[client_id] >= self.ctx.config.client_pending_limit
            and (client_id, request.request_id) not in self.pending
            and self.ctx.ordering.ledger.lookup(client_id, request.request_id) is None
            and self._relay_share(client_id, link) is None
        )

    def _relay_share(self, client_id: int, link: Principal | None) -> int | None:
        """The backup a request of this client that arrived on `link` may be charged to:
        at the primary only, for a request a backup relayed, within that backup's share
        (see relayed_per_client). None: the request is charged to its client."""
        if link is None or link[0] != "replica" or not self.ctx.is_primary:
            return None
        relayer = link[1]
        if relayer == self.ctx.id or not 0 <= relayer < self.ctx.config.replica_count:
            return None
        if self.relayed_per_client[(relayer, client_id)] >= self.ctx.config.client_pending_limit:
            return None
        if self.relayed_per_replica[relayer] >= self.ctx.config.pending_request_limit:
            return None
        return relayer

    def on_balance_query(self, query: BalanceQuery, opened: Opened) -> None:
        ledger = self.ctx.ordering.ledger
        balance = ledger.balance(query.account)
        reply = BalanceReply(
            self.ctx.id,
            query.client_id,
            query.query_id,
            query.account,
            int(balance is not None),
            balance or 0,
            self.ctx.ordering.last_executed,
            self.ctx.cluster_id,
            ledger.held(query.account) or 0,
        )
        self.ctx.send(("client", query.client_id), seal(reply, self.ctx.key))

    def on_request(self, request: Request, opened: Opened) -> None:
        identity = (request.client_id, request.request_id)
        digest = opened.body_digest
        decision = self.ctx.ordering.ledger.lookup(request.client_id, request.request_id)
        if decision is not None and decision.body_digest == digest:
            # A retransmission of something already decided: answer with the reply we
            # signed then (a replay costs no signature), within the client's budget.
            if not self.client_budget.allow(request.client_id, self.ctx.now_ms):
                raise Rejected(DropReason.REPLAY_RATE_LIMITED, f"client {request.client_id}")
            signed = self.ctx.ordering.signed_replies.get(
                request.client_id, request.request_id, digest
            )
            if signed is not None:
                self.ctx.send(("client", request.client_id), signed)
                return
            result = ReplyResult.of(request.client_id, request.request_id, digest, decision)
            self.ctx.ordering.reply(decision.seq, [result])
            return
        if identity in self.pending:
            if self._relays(request.client_id):
                if not self.client_budget.allow(request.client_id, self.ctx.now_ms):
                    raise Rejected(DropReason.RELAY_RATE_LIMITED, f"client {request.client_id}")
                self.ctx.send(("replica", self.ctx.config.primary_of(self.ctx.view)), opened.raw)
            return
        client_id = request.client_id
        relayer = None
        charged_to_clients = len(self.pending) - self.relayed_per_replica.total()
        if (
            charged_to_clients >= self.ctx.config.pending_request_limit
            or self.pending_per_client[client_id] >= self.ctx.config.client_pending_limit
        ):
            relayer = self._relay_share(client_id, opened.link)
            if relayer is None:
                if charged_to_clients >= self.ctx.config.pending_request_limit:
                    raise Rejected(DropReason.REQUEST_QUEUE_FULL)
                self.over_quota_clients[client_id] = None
                raise Rejected(DropReason.CLIENT_QUOTA_FULL, f"client {client_id}")
        self.pending[identity] = PendingRequest(
            opened, digest, self.ctx.now_ms, relayer, self.never_held_ordered
        )
        if relayer is None:
            self.pending_per_client[client_id] += 1
        else:
            self.relayed_per_client[(relayer, client_id)] += 1
            self.relayed_per_replica[relayer] += 1
        if self.ctx.is_primary:
            if self.ctx.status is ViewStatus.NORMAL:
                self.proposal_queue[identity] = None
                self.ctx.ordering.maybe_propose()
        elif self._relays(client_id):
            # The client gave up on the primary and told everyone: relay it and watch.
            self.ctx.send(("replica", self.ctx.config.primary_of(self.ctx.view)), opened.raw)

    def _relays(self, client_id: int) -> bool:
        """Whether a backup relays this client's requests to the primary: exactly those it
        times (see oldest_timed_request). The primary takes a relay on the relaying
        backup's share (see relayed_per_client), so relaying a client over its quota here
        would hand it that share as well as its own."""
        return (
            not self.ctx.is_primary
            and self.ctx.status is ViewStatus.NORMAL
            and client_id not in self.over_quota_clients
        )

    def timed(self) -> list[tuple[int, int]]:
        """The pending requests this replica times and relays: not those of clients over
        their quota here, nor those charged to a backup's relay share."""
        return [
            identity
            for identity, pending in self.pending.items()
            if self._is_timed(identity[0], pending)
        ]

    def _is_timed(self, client_id: int, pending: PendingRequest) -> bool:
        return client_id not in self.over_quota_clients and pending.relayer is None

    def charge_backlog(self, identities: list[tuple[int, int]]) -> None:
        """A batch about to be proposed: its over-quota requests are paid from the backlog's
        pace (see next_batch)."""
        backlog = sum(map(self._is_backlog, identities)) if self.over_quota_clients else 0
        if backlog:
            self.backlog_budget.spend(0, backlog, self.ctx.now_ms)

    def _is_backlog(self, identity: tuple[int, int]) -> bool:
        """A request of a client over its quota here, charged to that client: its backlog.
        One a backup relayed within its share is not: that backup times it."""
        if identity[0] not in self.over_quota_clients:
            return False
        pending = self.pending.get(identity)
        return pending is None or pending.relayer is None

    def backlog_only(self, identities: list[tuple[int, int]]) -> bool:
        return bool(self.over_quota_clients) and all(map(self._is_backlog, identities))

    def next_batch(self) -> list[tuple[int, int]]:
        """The next batch_size requests to propose, in arrival order, but correct clients'
        first: a client over its quota must not make everyone else's requests wait behind
        its backlog (long enough, it would look like censorship to the backups). Its
        backlog also gets at most 1/OVER_QUOTA_BATCH_SHARE of a batch: every request
        ordered costs each replica a signature check, an execution and a signed reply, so
        full batches of it would slow the batches in flight that correct clients' requests
        wait behind; and at most OVER_QUOTA_ORDER_RATE_PER_S of it a second in all."""
        size = self.ctx.config.batch_size
        if not self.over_quota_clients:
            return list(islice(self.proposal_queue, size))
        first: list[tuple[int, int]] = []
        later: list[tuple[int, int]] = []
        later_limit = min(
            max(1, size // OVER_QUOTA_BATCH_SHARE),
            int(self.backlog_budget.tokens(0, self.ctx.now_ms)),
        )
        for identity in self.proposal_queue:
            if not self._is_backlog(identity):
                first.append(identity)
                if len(first) == size:
                    break
            elif len(later) < later_limit:
                later.append(identity)
        return (first + later)[:size]

    def unpend(self, identity: tuple[int, int]) -> None:
        pending = self.pending.pop(identity)
        self.proposal_queue.pop(identity, None)
        self._executed_arrivals.append(pending.arrived_ms)
        client_id = identity[0]
        if pending.relayer is not None:
            _release(self.relayed_per_client, (pending.relayer, client_id))
            _release(self.relayed_per_replica, pending.relayer)
            return
        if _release(self.pending_per_client, client_id):
            self.over_quota_clients.pop(client_id, None)

    def _oldest_timed_entry(self) -> tuple[tuple[int, int], PendingRequest] | None:
        """The oldest request this replica times, with its identity."""
        if not self.over_quota_clients and not self.relayed_per_replica:
            return next(iter(self.pending.items()), None)
        # Requests charged to a relaying backup are left out too: this replica took them
        # as primary, beyond what it may relay to the next one (the backup that relayed
        # them times them). Bounded: at most client_pending_limit entries per over-quota
        # client, and pending_request_limit per relaying backup, are skipped.
        for identity, pending in self.pending.items():
            if self._is_timed(identity[0], pending):
                return identity, pending
        return None

    def oldest_timed_request(self) -> PendingRequest | None:
        entry = self._oldest_timed_entry()
        return None if entry is None else entry[1]

    def oldest_timed(self) -> tuple[PendingRequest, int] | None:
        """The oldest request this replica times, and how many requests the primary had
        executed past it: see count_ordered."""
        entry = self._oldest_timed_entry()
        if entry is None:
            return None
        pending = entry[1]
        return pending, self._overtaken(pending)

    def _overtaken(self, pending: PendingRequest) -> int:
        never_held = self.never_held_ordered - pending.never_held_mark
        raced_until_ms = pending.arrived_ms + self.ctx.config.view_change_timeout_ms
        late = len(self.late_arrivals) - bisect_right(self.late_arrivals, raced_until_ms)
        return never_held + late

    def late_arrivals_kept(self) -> int:
        """Enough late arrivals to tell whether a request's count passes the overtake
        limit (the latest are kept: any later oldest request counts a subset of them)."""
        return self.ctx.viewchanges.overtake_limit() + 1

    def count_ordered(self, count: int) -> None:
        """A batch of `count` requests was executed here (a null batch orders none): progress,
        and maybe overtaking. Of the batch, the requests that overtook a request this
        replica times are those it never held (they reached the primary alone, or not yet
        here), and those that arrived here more than a view-change timeout after it: a
        correct primary orders in its own arrival order, which differs from ours by the
        network's skew, not by more. Both are counted for every pending request from its
        own arrival, whichever request was the oldest then (review finding O1: a count kept
        for the oldest only and restarted for its successor let a primary delay the k-th
        held request k times the bound): a running count of never-held requests, which
        each request marks on arrival, and the arrival times of the late ones, bounded by
        late_arrivals_kept. It costs a look at one request, and a binary search, a batch."""
        arrivals, self._executed_arrivals = self._executed_arrivals, []
        if not count:
            return
        oldest = self._oldest_timed_entry()
        # Progress at the rate the batches allow, not any batch at all: a full batch, or one
        # that left behind nothing this replica held for a timeout. A correct primary had
        # every such request when it proposed (the network's skew is far less than a
        # timeout) and takes all it has, up to a full batch; a primary trickling part-full
        # batches past requests it was given is slowing them down, and the timer runs on.
        timeout_ms = self.ctx.config.view_change_timeout_ms
        if (
            count >= self.ctx.config.batch_size
            or oldest is None
            or oldest[1].arrived_ms > self.ctx.now_ms - timeout_ms
        ):
            self.last_ordered_ms = self.ctx.now_ms
        self.never_held_ordered += max(0, count - len(arrivals))
        if oldest is None:
            # Whatever arrives from now on arrives after every request executed so far.
            self.late_arrivals = []
            return
        # Only arrivals past the oldest's race window can count for it or any later request
        # (a later one arrived later still).
        raced_until_ms = oldest[1].arrived_ms + timeout_ms
        late = self.late_arrivals
        del late[: bisect_right(late, raced_until_ms)]
        for arrived in arrivals:
            if arrived > raced_until_ms:
                insort(late, arrived)
        kept = self.late_arrivals_kept()
        if len(late) > kept:
            del late[: len(late) - kept]

    def forget_decided_requests(self) -> None:
        for identity in list(self.pending):
            decision = self.ctx.ordering.ledger.lookup(*identity)
            if decision is not None and decision.body_digest == self.pending[identity].body_digest:
                self.unpend(identity)
        # A state transfer: what the cluster ordered meanwhile is progress too.
        self._executed_arrivals = []
        self.last_ordered_ms = self.ctx.now_ms


def _release(counts: Counter[K], key: K) -> bool:
    """One fewer under `key`; the entry goes once it reaches zero (True then), so a count
    table holds only what is pending."""
    counts[key] -= 1
    if counts[key] > 0:
        return False
    del counts[key]
    return True
