"""The client: builds signed payment requests and turns f + 1 matching replies into a receipt.

A reply proves its result with an inclusion proof under a Merkle root its replica signed
once for the whole batch (pbft/replies.py): checking one is a few hashes, plus one
signature per distinct (replica, root), through the bounded verification cache.

Sans-I/O like the replica: `submit` and `handle` return actions. The client sends a
request to the primary it believes in; if no decision comes within the timeout it
sends it to every replica (backups relay it and start their timers, which is how
a client forces a leader change), then keeps retransmitting with backoff.

Reads are not ordered: `query_balance` and the lookups of history (`core.lookups`: a
request's status with receipt material, an account's history a page at a time, a hold's
fate; see the section near the end of this file) ask every replica and return an answer
once f + 1 of them agree. A replica status query (`core.statuses`, the last section) asks
every replica where it stands and hands back each one's signed answer as it comes: no
agreement, each replica's own word.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.codec import MAX_UINT64, DecodeError
from pbft.config import ClusterConfig
from pbft.drops import DropReason
from pbft.events import Event, MessageReceived, Send, Tick
from pbft.genesis import CLUSTER_ID_BYTES
from pbft.history import MAX_PAGE, AccountEntry, HoldView, RequestRecord
from pbft.ledger import MAX_ACCOUNT_NAME_LENGTH
from pbft.messages import (
    BEHIND,
    FOUND,
    MAX_SEQ,
    BalanceQuery,
    BalanceReply,
    LookupAnswer,
    LookupQuery,
    ReplicaStatusAnswer,
    Reply,
    Request,
    StatusQuery,
)
from pbft.operations import OP_CODES, Op, Operation
from pbft.receipt import RECEIPT_VERSION, UNKNOWN_OUTCOME_REASON, Receipt
from pbft.replies import ReplyResult, check_reply, result_of
from pbft.signed import Envelope, Rejected, open_envelope, peek, seal, verify_signature

MAX_BACKOFF_DOUBLINGS = 3
# A cursor's position within a batch (LookupQuery.after_position's bound).
MAX_POSITION = 2**20


class ClientError(ValueError):
    """A local misuse of the client (for example a request id already in flight, or a
    request id, account name or amount that cannot be put on the wire)."""


def check_account_name(name: object, what: str = "account") -> str:
    """The wire's limit on account names; the message says what is wrong, not the name."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_ACCOUNT_NAME_LENGTH:
        length = len(name) if isinstance(name, str) else type(name).__name__
        raise ClientError(
            f"{what} name must be 1..{MAX_ACCOUNT_NAME_LENGTH} characters, got {length}"
        )
    return name


def check_uint64(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_UINT64:
        raise ClientError(f"{what} must be an integer in 0..2**64-1, got {value!r}")
    return value


def _request_of(client_id: int, request_id: int, operation: Operation) -> Request:
    """The request for `operation`, every field checked against the wire's limits first (a
    ClientError naming the field, not a DecodeError). Fields the op does not use are put on
    the wire as given: the ledger, not the client, decides they are invalid_request."""
    if operation.op not in OP_CODES:
        raise ClientError(f"unknown operation {operation.op!r} (one of {', '.join(OP_CODES)})")
    if operation.op in _NAMED_PAYER:
        check_account_name(operation.payer, "payer account")
    elif operation.payer:
        check_account_name(operation.payer, "payer account")
    if operation.op in _NAMED_PAYEE:
        check_account_name(operation.payee, "payee account")
    elif operation.payee:
        check_account_name(operation.payee, "payee account")
    check_uint64(operation.amount, "amount")
    if type(operation.ref_client) is not int or not 0 <= operation.ref_client <= MAX_CLIENT_ID:
        raise ClientError(
            f"referenced client id must be an integer in 0..{MAX_CLIENT_ID}, "
            f"got {operation.ref_client!r}"
        )
    check_uint64(operation.ref_request, "referenced request id")
    check_uint64(operation.expires_in_ms, "expiry")
    return Request(
        client_id,
        request_id,
        # The plain str: the wire's check wants a str, not the StrEnum member.
        str(operation.op),
        operation.payer,
        operation.payee,
        operation.amount,
        operation.ref_client,
        operation.ref_request,
        operation.expires_in_ms,
    )


# Ops whose payer (the new account's name, for open_account) / payee must be named.
_NAMED_PAYER = (Op.TRANSFER, Op.AUTHORIZE, Op.OPEN_ACCOUNT)
_NAMED_PAYEE = (Op.TRANSFER, Op.AUTHORIZE)
MAX_CLIENT_ID = 2**32 - 1


@dataclass(frozen=True)
class Decided:
    """A payment's outcome is proven by f + 1 matching signed replies (the receipt).

    One exception: outcome "unknown" (reason request_expired, no receipt) when f + 1
    replicas say they no longer remember the request id, so its outcome cannot be proven
    from the replies; the payment may well have been executed. The client prevents this
    for its own requests by never running dedup_window requests ahead of an unanswered one.
    """

    client_id: int
    request_id: int
    outcome: str
    reason: str
    seq: int
    receipt: Receipt | None


@dataclass(frozen=True)
class BalanceRead:
    """f + 1 replicas agree on an account's balance, and at least one correct replica held
    it after executing `seq` or more entries: `seq` is the (f + 1)-th highest sequence
    number the agreeing replicas claim, so f liars cannot inflate it (a read reflects
    every payment decided at or below `seq`)."""

    query_id: int
    account: str
    exists: bool
    balance: int  # available
    replicas: tuple[int, ...]
    seq: int
    held: int = 0  # kept by open holds (issue 11); the f + 1 agree on both


@dataclass(frozen=True)
class LookupResult:
    """f + 1 replicas agree. `state`: found, not_found (as of `as_of_seq`) or not_held
    (f + 1 replicas no longer hold that part of history, or never executed it: retention,
    state transfer). For a found status: `record`, the f + 1 matching signed `replies`,
    and a `receipt` when the request is this client's own. A page: `entries` (fewer than
    the limit: nothing more as of `as_of_seq`). A hold: `hold`."""

    query_id: int
    kind: str
    state: str
    as_of_seq: int
    replicas: tuple[int, ...]
    record: RequestRecord | None = None
    replies: tuple[bytes, ...] = ()
    receipt: Receipt | None = None
    entries: tuple[AccountEntry, ...] = ()
    hold: HoldView | None = None


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's signed answer to our status query (ReplicaStatusAnswer), checked for
    its signature, cluster and query, and nothing more: it is that replica's word alone.
    `drops`: (reason, count), its most frequent drop reasons. `answer`: the signed frame."""

    query_id: int
    replica: int
    view: int
    view_status: str
    last_executed: int
    stable_checkpoint: int
    low_watermark: int
    high_watermark: int
    drops: tuple[tuple[str, int], ...]
    answer: bytes


ClientAction = Send | Decided | BalanceRead | LookupResult | ReplicaStatus


@dataclass
class _Outstanding:
    request: Request
    raw: bytes
    digest: bytes
    submitted_ms: int
    next_retry_ms: int
    submission_index: int = 0
    attempts: int = 0
    # (seq, outcome, reason) -> replica -> (view, raw reply)
    replies: dict[tuple[int, str, str], dict[int, tuple[int, bytes]]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientStatistics:
    client_id: int
    outstanding: int
    decided: int
    retransmissions: int
    drops: dict[str, int]


class ClientCore:
    def __init__(
        self,
        client_id: int,
        config: ClusterConfig,
        signing_key: SigningKey,
        keyring: KeyRing,
        *,
        cache: VerificationCache | None = None,
        cluster_id: bytes,
        max_outstanding: int = 4096,
        view: int | None = 0,
    ) -> None:
        """`view`: the view to assume at first; None means learn it from the replicas. Then
        requests go to every replica (a backup relays to its primary) until f + 1 signed
        replies claim a view, so a fresh client does not wait out a timeout on the primary
        of view 0 after the cluster has moved on."""
        if keyring.get(("client", client_id)) != signing_key.verify_key:
            raise ValueError(f"the key ring holds another key for client {client_id}")
        if len(cluster_id) != CLUSTER_ID_BYTES:
            raise ValueError(f"a cluster id is {CLUSTER_ID_BYTES} bytes, got {len(cluster_id)}")
        self.client_id = client_id
        # pbft.genesis.compute_cluster_id: replies naming another cluster are dropped.
        self.cluster_id = cluster_id
        self.config = config
        self.key = signing_key
        self.keyring = keyring
        self.cache = cache if cache is not None else VerificationCache()
        self.max_outstanding = max_outstanding
        self.now_ms = 0
        self.view = 0 if view is None else view
        self.learn_view = view is None
        self.view_known = view is not None
        # replica -> the highest view it has claimed in a signed reply (learn_view only)
        self.view_claims: dict[int, int] = {}
        self.outstanding: dict[int, _Outstanding] = {}
        # query id -> (account, next retry ms, (exists, balance) -> replica -> seq)
        self.queries: dict[int, tuple[str, int, dict[tuple[int, int, int], dict[int, int]]]] = {}
        self.decided = 0
        self.submitted = 0
        self.retransmissions = 0
        self.drops: Counter[str] = Counter()
        self.lookups = Lookups(self)
        self.statuses = StatusQueries(self)

    def submit(self, request_id: int, payer: str, payee: str, amount: int) -> list[ClientAction]:
        """Submit a transfer of `amount` from `payer` to `payee`."""
        return self.submit_operation(request_id, Operation.transfer(payer, payee, amount))

    def submit_operation(self, request_id: int, operation: Operation) -> list[ClientAction]:
        """Submit any operation (pbft/operations.py); a Decided follows once f + 1 agree."""
        check_uint64(request_id, "request id")
        request = _request_of(self.client_id, request_id, operation)
        if request_id in self.outstanding:
            raise ClientError(f"request {request_id} is already in flight")
        if len(self.outstanding) >= self.max_outstanding:
            raise ClientError(f"{self.max_outstanding} requests already in flight")
        if self.outstanding:
            # The replicas remember a client's last dedup_window decisions. Running that far
            # ahead of an unanswered request could make them forget it before we learn its
            # outcome; wait for it instead.
            oldest = next(iter(self.outstanding.values()))
            if self.submitted - oldest.submission_index >= self.config.dedup_window:
                raise ClientError(
                    f"request {oldest.request.request_id} is unanswered and "
                    f"{self.config.dedup_window - 1} newer ones were sent since"
                )
        raw = seal(request, self.key)
        opened = open_envelope(raw, self.keyring, self.cache, Request)
        self.outstanding[request_id] = _Outstanding(
            request,
            raw,
            opened.body_digest,
            self.now_ms,
            self.now_ms + self.config.client_timeout_ms,
            submission_index=self.submitted,
        )
        self.submitted += 1
        if not self.view_known:
            return [Send(("replica", replica), raw) for replica in self.config.replica_ids()]
        return [Send(("replica", self.config.primary_of(self.view)), raw)]

    def query_balance(self, query_id: int, account: str) -> list[ClientAction]:
        """Ask every replica; a BalanceRead follows once f + 1 of them agree."""
        check_uint64(query_id, "query id")
        check_account_name(account)
        if query_id in self.queries:
            raise ClientError(f"query {query_id} is already in flight")
        if len(self.queries) >= self.max_outstanding:
            raise ClientError(f"{self.max_outstanding} queries already in flight")
        self.queries[query_id] = (account, self.now_ms + self.config.client_timeout_ms, {})
        return self._ask_balance(query_id, account)

    def _ask_balance(self, query_id: int, account: str) -> list[ClientAction]:
        raw = seal(BalanceQuery(self.client_id, query_id, account), self.key)
        return [Send(("replica", replica), raw) for replica in self.config.replica_ids()]

    def handle(self, event: Event) -> list[ClientAction]:
        if isinstance(event, Tick):
            return self._on_tick(event.now_ms)
        if isinstance(event, MessageReceived):
            try:
                return self._on_reply(event.data)
            except Rejected as rejection:
                self.drops[str(rejection.reason)] += 1
                return []
        raise TypeError(f"not an event: {event!r}")

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            self.client_id,
            len(self.outstanding),
            self.decided,
            self.retransmissions,
            dict(sorted(self.drops.items())),
        )

    def _on_tick(self, now_ms: int) -> list[ClientAction]:
        self.now_ms = now_ms
        actions: list[ClientAction] = self.lookups.on_tick(now_ms)
        for query_id, (account, next_retry_ms, _answers) in list(self.queries.items()):
            if now_ms >= next_retry_ms:
                # Replicas answer from where they are; ask again until f + 1 agree.
                self.queries[query_id] = (account, now_ms + self.config.client_timeout_ms, {})
                actions += self._ask_balance(query_id, account)
        for outstanding in self.outstanding.values():
            if now_ms < outstanding.next_retry_ms:
                continue
            # No decision in time: tell every replica, so backups relay it and watch the primary.
            outstanding.attempts += 1
            self.retransmissions += 1
            doublings = min(outstanding.attempts, MAX_BACKOFF_DOUBLINGS)
            outstanding.next_retry_ms = now_ms + self.config.client_timeout_ms * 2**doublings
            for replica in self.config.replica_ids():
                actions.append(Send(("replica", replica), outstanding.raw))
        return actions

    def _on_balance_reply(self, envelope: Envelope, reply: BalanceReply) -> list[ClientAction]:
        query = self.queries.get(reply.query_id)
        if query is None or reply.client_id != self.client_id:
            raise Rejected(DropReason.LATE_REPLY)
        account, _, answers = query
        if reply.account != account:
            raise Rejected(DropReason.REPLY_FOR_OTHER_BODY)
        if reply.cluster_id != self.cluster_id:
            raise Rejected(DropReason.OTHER_CLUSTER)
        verify_signature(envelope, reply, self.keyring, self.cache)
        answer = (reply.exists, reply.balance, reply.held)
        for other, voters in answers.items():
            if other != answer and reply.replica in voters:
                raise Rejected(DropReason.CONFLICTING_REPLY)
        voters = answers.setdefault(answer, {})
        voters[reply.replica] = reply.seq
        if len(voters) < self.config.weak_quorum:
            return []
        del self.queries[reply.query_id]
        # At most f of the voters lie, so at least one of the f + 1 highest claims is a
        # correct replica's: the (f + 1)-th highest is a sequence number it reached.
        seq = sorted(voters.values(), reverse=True)[self.config.weak_quorum - 1]
        return [
            BalanceRead(
                reply.query_id,
                account,
                bool(reply.exists),
                reply.balance,
                tuple(sorted(voters)),
                seq,
                reply.held,
            )
        ]

    def _on_reply(self, data: bytes) -> list[ClientAction]:
        envelope, reply = peek(data, (Reply, BalanceReply, LookupAnswer, ReplicaStatusAnswer))
        if isinstance(reply, BalanceReply):
            return self._on_balance_reply(envelope, reply)
        if isinstance(reply, LookupAnswer):
            return self.lookups.on_answer(envelope, reply)
        if isinstance(reply, ReplicaStatusAnswer):
            return self.statuses.on_answer(envelope, reply, data)
        if not isinstance(reply, Reply):
            raise Rejected(DropReason.UNEXPECTED_TYPE)
        if reply.client_id != self.client_id:
            raise Rejected(DropReason.NOT_FOR_US)
        outstanding = self.outstanding.get(reply.request_id)
        if outstanding is None:
            # Already decided (or never ours): not worth a signature check.
            raise Rejected(DropReason.LATE_REPLY)
        if reply.request_digest != outstanding.digest:
            raise Rejected(DropReason.REPLY_FOR_OTHER_BODY)
        if reply.cluster_id != self.cluster_id:
            raise Rejected(DropReason.OTHER_CLUSTER)
        # The inclusion proof (a few hashes), then the batch root's signature: once per
        # (replica, root) while the cache holds it, however many of our replies share it.
        check_reply(envelope, reply, self.keyring, self.cache)
        if self.learn_view:
            self._claim_view(reply.replica, reply.view)
        decision = (reply.seq, reply.outcome, reply.reason)
        for other, voters in outstanding.replies.items():
            if other != decision and reply.replica in voters:
                # A replica answering one request two ways is lying; keep the first word.
                raise Rejected(DropReason.CONFLICTING_REPLY)
        voters = outstanding.replies.setdefault(decision, {})
        voters[reply.replica] = (reply.view, data)
        if len(voters) < self.config.weak_quorum:
            return []
        del self.outstanding[reply.request_id]
        self.decided += 1
        chosen = sorted(voters.items())[: self.config.weak_quorum]
        # At least one of f + 1 is correct, so the smallest view they report is real.
        self.view = max(self.view, min(view for _, (view, _) in chosen))
        self.view_known = True
        seq, outcome, reason = decision
        if reason == UNKNOWN_OUTCOME_REASON:
            return [Decided(self.client_id, reply.request_id, "unknown", reason, seq, None)]
        receipt = Receipt(
            RECEIPT_VERSION,
            self.cluster_id,
            outstanding.raw,
            tuple(raw for _, (_, raw) in chosen),
        )
        return [Decided(self.client_id, reply.request_id, outcome, reason, seq, receipt)]

    def _claim_view(self, replica: int, view: int) -> None:
        """Some correct replica is in view v or later once f + 1 replicas claim views >= v."""
        if view <= self.view_claims.get(replica, -1):
            return
        self.view_claims[replica] = view
        if len(self.view_claims) < self.config.weak_quorum:
            return
        learned = sorted(self.view_claims.values(), reverse=True)[self.config.weak_quorum - 1]
        self.view = max(self.view, learned)
        self.view_known = True


# --- lookups: request status, account history, holds ----------------------------------
#
# The client core's API for reading history, on which the runtime's PaymentClient.lookup
# (and its status, history and hold) build: `core.lookups.status(query_id, client_id,
# request_id)`, `core.lookups.history(query_id, account, after=(seq, position),
# limit=MAX_PAGE, through_seq=0)` and `core.lookups.hold(query_id, client_id, request_id)`
# return the sends (to every replica); `core.handle` later returns a `LookupResult` once
# f + 1 replicas agree. Unanswered lookups are sent again every client_timeout_ms (answers
# already in are kept: a replica's newer answer replaces its older one); a caller that
# gives up pops its query id from `core.lookups.pending`. pbft/lookups.py says what
# replicas answer.
#
# Matching when replicas are at different heights: answers match on content only, never
# on `as_of_seq`; a "found" status or hold, or a page, is the same at every height that
# holds it, and the result's `as_of_seq` is the (f + 1)-th highest the agreeing replicas
# claim (at most f of them lie, so a correct replica had executed that far). A hold's
# fate or a page near the tip may differ between heights until the laggards catch up,
# which the retries wait out. To read several pages as of one seq, pass the first
# page's `as_of_seq` as `through_seq`: replicas not yet there answer "behind", which is
# no vote. A status answer carries the request's signed REPLY; a client checks it (proof
# and signature) before counting the answer, and for its own request it rebuilds and
# re-signs the request body to make a receipt that `verify_receipt` accepts.


@dataclass
class _Lookup:
    query: LookupQuery
    raw: bytes
    digest: bytes
    next_retry_ms: int
    # replica -> (what it answered, as of which seq, its answer frame)
    answers: dict[int, tuple[tuple[object, ...], int, LookupAnswer]] = field(default_factory=dict)


class Lookups:
    """The client core's lookups (ClientCore.lookups): queries in flight and their answers."""

    def __init__(self, core: ClientCore) -> None:
        self.core = core
        self.pending: dict[int, _Lookup] = {}

    def status(self, query_id: int, client_id: int, request_id: int) -> list[ClientAction]:
        """Ask for the status of request (client_id, request_id)."""
        return self._ask(query_id, "status", target=(client_id, request_id))

    def hold(self, query_id: int, client_id: int, request_id: int) -> list[ClientAction]:
        """Ask for the hold authorized by request (client_id, request_id)."""
        return self._ask(query_id, "hold", target=(client_id, request_id))

    def history(
        self,
        query_id: int,
        account: str,
        *,
        after: tuple[int, int] = (0, 0),
        limit: int = MAX_PAGE,
        through_seq: int = 0,
    ) -> list[ClientAction]:
        """Ask for `account`'s entries after the cursor `after` = (seq, position) (the
        last entry of the page before; (0, 0) for the first page), at most `limit`."""
        check_account_name(account)
        if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
            raise ClientError(f"page size must be 1..{MAX_PAGE}, got {limit!r}")
        seq, position = after
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            raise ClientError(f"cursor seq must be in 0..{MAX_SEQ}, got {seq!r}")
        if type(position) is not int or not 0 <= position <= MAX_POSITION:
            raise ClientError(f"cursor position must be in 0..{MAX_POSITION}, got {position!r}")
        if type(through_seq) is not int or not 0 <= through_seq <= MAX_SEQ:
            raise ClientError(f"through seq must be in 0..{MAX_SEQ}, got {through_seq!r}")
        return self._ask(
            query_id,
            "history",
            account=account,
            after=after,
            limit=limit,
            through_seq=through_seq,
        )

    def _ask(
        self,
        query_id: int,
        kind: str,
        *,
        target: tuple[int, int] = (0, 0),
        account: str = "",
        after: tuple[int, int] = (0, 0),
        limit: int = 0,
        through_seq: int = 0,
    ) -> list[ClientAction]:
        check_uint64(query_id, "query id")
        if type(target[0]) is not int or not 0 <= target[0] < 2**32:
            raise ClientError(f"client id must be in 0..2**32-1, got {target[0]!r}")
        check_uint64(target[1], "request id")
        query = LookupQuery(
            self.core.client_id,
            query_id,
            kind,
            target[0],
            target[1],
            account,
            after[0],
            after[1],
            limit,
            through_seq,
        )
        return self.ask(query)

    def ask(self, query: LookupQuery) -> list[ClientAction]:
        core = self.core
        if query.query_id in self.pending:
            raise ClientError(f"query {query.query_id} is already in flight")
        if len(self.pending) >= core.max_outstanding:
            raise ClientError(f"{core.max_outstanding} lookups already in flight")
        raw = seal(query, core.key)
        digest = hashlib.sha256(query.encode()).digest()
        self.pending[query.query_id] = _Lookup(
            query, raw, digest, core.now_ms + core.config.client_timeout_ms
        )
        return [Send(("replica", replica), raw) for replica in core.config.replica_ids()]

    def on_tick(self, now_ms: int) -> list[ClientAction]:
        actions: list[ClientAction] = []
        for lookup in self.pending.values():
            if now_ms >= lookup.next_retry_ms:
                lookup.next_retry_ms = now_ms + self.core.config.client_timeout_ms
                actions += [
                    Send(("replica", replica), lookup.raw)
                    for replica in self.core.config.replica_ids()
                ]
        return actions

    def on_answer(self, envelope: Envelope, answer: LookupAnswer) -> list[ClientAction]:
        core = self.core
        lookup = self.pending.get(answer.query_id)
        if lookup is None or answer.client_id != core.client_id:
            raise Rejected(DropReason.LATE_REPLY)
        if answer.query_digest != lookup.digest:
            raise Rejected(DropReason.REPLY_FOR_OTHER_BODY)
        if answer.cluster_id != core.cluster_id:
            raise Rejected(DropReason.OTHER_CLUSTER)
        previous = lookup.answers.get(answer.replica)
        if previous is not None and previous[1] > answer.as_of_seq:
            raise Rejected(DropReason.LATE_REPLY)
        verify_signature(envelope, answer, core.keyring, core.cache)
        key = self._content(lookup.query, answer)
        if key is None:
            lookup.answers.pop(answer.replica, None)
            return []
        lookup.answers[answer.replica] = (key, answer.as_of_seq, answer)
        voters = [
            (replica, as_of, agreeing)
            for replica, (other, as_of, agreeing) in sorted(lookup.answers.items())
            if other == key
        ]
        quorum = core.config.weak_quorum
        if len(voters) < quorum:
            return []
        del self.pending[answer.query_id]
        # At most f lie: the (f + 1)-th highest claim is one a correct replica reached.
        as_of = sorted((as_of for _, as_of, _ in voters), reverse=True)[quorum - 1]
        chosen = voters[:quorum]
        replicas = tuple(replica for replica, _, _ in chosen)
        kind = lookup.query.kind
        if answer.state != FOUND:
            return [LookupResult(answer.query_id, kind, answer.state, as_of, replicas)]
        if kind == "history":
            return [
                LookupResult(answer.query_id, kind, FOUND, as_of, replicas, entries=answer.entries)
            ]
        if kind == "hold":
            return [
                LookupResult(answer.query_id, kind, FOUND, as_of, replicas, hold=answer.hold[0])
            ]
        record = answer.record[0]
        replies = tuple(agreeing.reply for _, _, agreeing in chosen)
        return [
            LookupResult(
                answer.query_id,
                kind,
                FOUND,
                as_of,
                replicas,
                record=record,
                replies=replies,
                receipt=self._receipt(record, replies),
            )
        ]

    def _content(self, query: LookupQuery, answer: LookupAnswer) -> tuple[object, ...] | None:
        """What an answer says, to match on; None for no vote ("behind"). An answer that
        does not fit its query is a lie: dropped."""
        state = answer.state
        if state == BEHIND:
            return None
        found = state == FOUND
        has = (bool(answer.record), bool(answer.reply), bool(answer.entries), bool(answer.hold))
        if not found:
            fits = not any(has)
        elif query.kind == "status":
            fits = has == (True, True, False, False)
        elif query.kind == "hold":
            fits = has == (False, False, False, True)
        else:
            fits = not (has[0] or has[1] or has[3])
        if not fits:
            raise Rejected(DropReason.CONFLICTING_REPLY, f"a {query.kind} answer of another shape")
        if not found:
            return (state,)
        if query.kind == "history":
            return self._page(query, answer.entries)
        if query.kind == "hold":
            hold = answer.hold[0]
            if (hold.hold_client, hold.hold_request) != (query.target_client, query.target_request):
                raise Rejected(DropReason.REPLY_FOR_OTHER_BODY, "another hold")
            return (FOUND, hold)
        record = answer.record[0]
        if (record.client_id, record.request_id) != (query.target_client, query.target_request):
            raise Rejected(DropReason.REPLY_FOR_OTHER_BODY, "another request")
        self._check_reply(answer, record)
        return (FOUND, record.agreed())

    def _page(self, query: LookupQuery, entries: tuple[AccountEntry, ...]) -> tuple[object, ...]:
        cursor = (query.after_seq, query.after_position)
        through = query.through_seq
        for entry in entries:
            position = (entry.seq, entry.position)
            if position <= cursor or (through and entry.seq > through):
                raise Rejected(DropReason.CONFLICTING_REPLY, "a page out of order or range")
            cursor = position
        if len(entries) > query.limit:
            raise Rejected(DropReason.CONFLICTING_REPLY, "a page over its limit")
        return (FOUND, entries)

    def _check_reply(self, answer: LookupAnswer, record: RequestRecord) -> None:
        """The status answer's REPLY must be its replica's, proven, and say what the record
        says: it is what a receipt is made of."""
        core = self.core
        envelope, reply = peek(answer.reply, Reply)
        if not isinstance(reply, Reply) or reply.replica != answer.replica:
            raise Rejected(DropReason.CONFLICTING_REPLY, "a status reply from another replica")
        if result_of(reply) != ReplyResult.of_record(record) or reply.cluster_id != core.cluster_id:
            raise Rejected(DropReason.CONFLICTING_REPLY, "a status reply for another result")
        check_reply(envelope, reply, core.keyring, core.cache)

    def _receipt(self, record: RequestRecord, replies: tuple[bytes, ...]) -> Receipt | None:
        """For this client's own request: the request rebuilt from the record and signed
        again (the replies bind its body's digest, not the signature), with the replies."""
        core = self.core
        if record.client_id != core.client_id or record.reason == UNKNOWN_OUTCOME_REASON:
            return None
        try:
            request = Request(
                client_id=record.client_id,
                request_id=record.request_id,
                op=record.op,
                payer=record.payer,
                payee=record.payee,
                amount=record.amount,
                ref_client=record.ref_client,
                ref_request=record.ref_request,
                expires_in_ms=record.expires_in_ms,
            )
        except DecodeError:
            return None
        if hashlib.sha256(request.encode()).digest() != record.request_digest:
            return None
        return Receipt(RECEIPT_VERSION, core.cluster_id, seal(request, core.key), replies)


# --- replica status: each replica's own word on where it stands ------------------------
#
# `core.statuses.ask(query_id)` returns the sends (one signed StatusQuery to every
# replica); `core.handle` then returns a `ReplicaStatus` for each replica's first valid
# answer, as it comes. Nothing is retransmitted: a caller asks again with a new query id
# (a dashboard polls), and one that gives up pops its query id from
# `core.statuses.pending`. A replica pays for answering from its lookup budget
# (pbft/lookups.py), so a client polling too fast sees some replicas not answer.


class StatusQueries:
    """The client core's replica status queries (ClientCore.statuses)."""

    def __init__(self, core: ClientCore) -> None:
        self.core = core
        # query id -> the replicas that answered it (a dict: no sets in the core)
        self.pending: dict[int, dict[int, None]] = {}

    def ask(self, query_id: int) -> list[ClientAction]:
        core = self.core
        check_uint64(query_id, "query id")
        if query_id in self.pending:
            raise ClientError(f"status query {query_id} is already in flight")
        if len(self.pending) >= core.max_outstanding:
            raise ClientError(f"{core.max_outstanding} status queries already in flight")
        raw = seal(StatusQuery(core.client_id, query_id), core.key)
        self.pending[query_id] = {}
        return [Send(("replica", replica), raw) for replica in core.config.replica_ids()]

    def on_answer(
        self, envelope: Envelope, answer: ReplicaStatusAnswer, data: bytes
    ) -> list[ClientAction]:
        core = self.core
        answered = self.pending.get(answer.query_id)
        if answered is None or answer.client_id != core.client_id:
            raise Rejected(DropReason.LATE_REPLY)
        if answer.replica in answered:
            raise Rejected(DropReason.LATE_REPLY, f"replica {answer.replica} answered already")
        if answer.cluster_id != core.cluster_id:
            raise Rejected(DropReason.OTHER_CLUSTER)
        verify_signature(envelope, answer, core.keyring, core.cache)
        # Only what no correct replica could say is refused; the rest is its word.
        if not answer.stable_checkpoint <= answer.low_watermark <= answer.high_watermark:
            raise Rejected(DropReason.CONFLICTING_REPLY, "a status that contradicts itself")
        answered[answer.replica] = None
        if len(answered) >= core.config.replica_count:
            del self.pending[answer.query_id]
        return [
            ReplicaStatus(
                answer.query_id,
                answer.replica,
                answer.view,
                answer.view_status,
                answer.last_executed,
                answer.stable_checkpoint,
                answer.low_watermark,
                answer.high_watermark,
                tuple((drop.reason, drop.count) for drop in answer.drops),
                data,
            )
        ]
