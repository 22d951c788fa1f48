"""Lookups: a replica answers clients' signed queries about history from its HistoryReader.

A lookup is a read, not ordered: each replica answers from the history it holds
(pbft/history.py), signed, naming the cluster, itself, the query (its body digest), the
answer and `as_of_seq`, the last seq its history holds. The client takes an answer once
f + 1 replicas agree on it (pbft/client.py, the lookups section). What each kind answers:
- status (client, request id): the request's record (outcome, reason, seq, op and fields)
  and the request's REPLY, signed now as a batch of one at the decision's seq, exactly as
  `Ordering.reply` answers a retransmission whose signed reply was forgotten. That is
  sound: the reply's leaf binds the cluster, seq, client, request id, body digest, outcome
  and reason, which every correct replica recorded alike, so f + 1 such replies prove the
  outcome as a receipt's replies do, and receipts stay one format (the request's own
  client re-signs the request body rebuilt from the record: the body digest, which the
  reply binds, covers the body only). Works after the request fell out of the ledger's
  dedup window, for as long as history retains it.
- history (account, cursor): a page of the account's entries, oldest first, optionally
  only through a given seq, so later pages can be read as of the first page's seq.
- hold (hold id): its fate (open, captured, voided, expired), amounts and expiry.
A StatusQuery is answered here too, from the replica's own state rather than history: its
view and the view's status, last executed, stable checkpoint, watermark window and drop
counters, signed (ReplicaStatusAnswer). Each replica speaks for itself; no client waits
for f + 1 of these to agree (a dashboard, `pbft status`).
Where the history a replica holds cannot tell (retention pruned it; a state transfer
skipped it), the answer is "not held", never a false "not found".

Bounded: the query's page limit is bounded at decode (MAX_PAGE), an answer is well within
a frame, and each client's lookups are paid from a token bucket (the replay budget's rate
and burst, a bucket of its own, shared by status queries) before anything is read or
signed. Like balance reads,
lookups are not access-controlled: any client of the cluster may read any history.
"""

from __future__ import annotations

import hashlib

from pbft.budget import TokenBuckets
from pbft.context import Context
from pbft.drops import DropReason
from pbft.history import AccountEntry, HistoryReader, HoldView, RequestRecord
from pbft.messages import (
    BEHIND,
    FOUND,
    MAX_DROP_REASON_LENGTH,
    MAX_STATUS_DROPS,
    NOT_FOUND,
    NOT_HELD,
    DropCount,
    LookupAnswer,
    LookupQuery,
    ReplicaStatusAnswer,
    StatusQuery,
)
from pbft.replies import ReplyResult, sign_replies
from pbft.signed import Opened, Rejected, seal


def check_query(query: LookupQuery) -> None:
    """A query's fields that its kind does not use must be empty."""
    targeted = query.kind in ("status", "hold")
    unused = (
        (query.account, query.after_seq, query.after_position, query.limit, query.through_seq)
        if targeted
        else (query.target_client, query.target_request)
    )
    if any(unused):
        raise Rejected(DropReason.BAD_LOOKUP, f"{query.kind} with fields it does not use")
    if not targeted and (not query.account or not query.limit):
        raise Rejected(DropReason.BAD_LOOKUP, "history needs an account and a limit")


class Lookups:
    """Answers LookupQuery from the replica's history (None: it keeps none, all not_held)."""

    def __init__(self, ctx: Context, history: HistoryReader | None) -> None:
        self.ctx = ctx
        self.history = history
        self.budget = TokenBuckets(
            ctx.config.client_replay_rate_per_s, ctx.config.client_replay_burst
        )

    def on_query(self, query: LookupQuery, opened: Opened) -> None:
        check_query(query)
        if not self.budget.allow(query.client_id, self.ctx.now_ms):
            raise Rejected(DropReason.LOOKUP_RATE_LIMITED, f"client {query.client_id}")
        answer = self.answer(query, opened.body_digest)
        self.ctx.send(("client", query.client_id), seal(answer, self.ctx.key))

    def on_status_query(self, query: StatusQuery, opened: Opened) -> None:
        # The same bucket as lookups: a status answer costs a signature like one.
        if not self.budget.allow(query.client_id, self.ctx.now_ms):
            raise Rejected(DropReason.LOOKUP_RATE_LIMITED, f"client {query.client_id}")
        self.ctx.send(("client", query.client_id), seal(self.status(query), self.ctx.key))

    def status(self, query: StatusQuery) -> ReplicaStatusAnswer:
        """Where this replica stands, as it sees itself."""
        ctx = self.ctx
        low = ctx.checkpoints.window_low()
        # The most frequent reasons if there are too many to send; sorted by name.
        counted = sorted(ctx.drops.items(), key=lambda item: (-item[1], item[0]))
        drops = tuple(
            DropCount(reason[:MAX_DROP_REASON_LENGTH], count)
            for reason, count in sorted(counted[:MAX_STATUS_DROPS])
        )
        return ReplicaStatusAnswer(
            ctx.id,
            query.client_id,
            query.query_id,
            ctx.cluster_id,
            ctx.view,
            str(ctx.status),
            ctx.ordering.last_executed,
            ctx.checkpoints.stable.seq,
            low,
            low + ctx.config.watermark_window,
            drops,
        )

    def answer(self, query: LookupQuery, query_digest: bytes) -> LookupAnswer:
        history = self.history
        held_from = history.held_from() if history is not None else 0
        held_through = history.held_through() if history is not None else 0
        record: tuple[RequestRecord, ...] = ()
        entries: tuple[AccountEntry, ...] = ()
        hold: tuple[HoldView, ...] = ()
        reply = b""
        # Held from the start: what is not in history was never executed (so far).
        from_start = held_from <= 1
        if history is None:
            state = NOT_HELD
        elif query.kind == "status":
            found = history.request(query.target_client, query.target_request)
            if found is not None:
                state, record, reply = FOUND, (found,), self._reply(found)
            else:
                state = NOT_FOUND if from_start else NOT_HELD
        elif query.kind == "hold":
            view = history.hold(query.target_client, query.target_request)
            if view is not None:
                state, hold = FOUND, (view,)
            else:
                state = NOT_FOUND if from_start else NOT_HELD
        elif query.through_seq > held_through:
            state = BEHIND
        elif held_from > max(query.after_seq, 1):
            # Entries right after the cursor may have been pruned (or never executed here).
            state = NOT_HELD
        else:
            state = FOUND
            entries = tuple(
                history.account(
                    query.account,
                    (query.after_seq, query.after_position),
                    query.through_seq or held_through,
                    query.limit,
                )
            )
        return LookupAnswer(
            self.ctx.id,
            query.client_id,
            query.query_id,
            query_digest,
            self.ctx.cluster_id,
            state,
            held_through,
            held_from,
            record,
            reply,
            entries,
            hold,
        )

    def _reply(self, record: RequestRecord) -> bytes:
        """The request's REPLY: the one kept for retransmissions if it still is, else one
        signed now as a batch of one at the decision's seq (see the module docstring)."""
        kept = self.ctx.ordering.signed_replies.get(
            record.client_id, record.request_id, record.request_digest
        )
        if kept is not None:
            return kept
        return sign_replies(
            self.ctx.key,
            self.ctx.id,
            self.ctx.view,
            record.seq,
            self.ctx.cluster_id,
            [ReplyResult.of_record(record)],
        )[0]


def query_digest(query: LookupQuery) -> bytes:
    """The digest an answer names its query by: of the query's body, as signed."""
    return hashlib.sha256(query.encode()).digest()
