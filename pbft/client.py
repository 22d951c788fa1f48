"""The client: builds signed payment requests and turns f + 1 matching replies into a receipt.

A reply proves its result with an inclusion proof under a Merkle root its replica signed
once for the whole batch (pbft/replies.py): checking one is a few hashes, plus one
signature per distinct (replica, root), through the bounded verification cache.

Sans-I/O like the replica: `submit` and `handle` return actions. The client sends a
request to the primary it believes in; if no decision comes within the timeout it
sends it to every replica (backups relay it and start their timers, which is how
a client forces a leader change), then keeps retransmitting with backoff.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.codec import MAX_UINT64
from pbft.config import ClusterConfig
from pbft.drops import DropReason
from pbft.events import Event, MessageReceived, Send, Tick
from pbft.genesis import CLUSTER_ID_BYTES
from pbft.ledger import MAX_ACCOUNT_NAME_LENGTH
from pbft.messages import BalanceQuery, BalanceReply, Reply, Request
from pbft.operations import OP_CODES, Op, Operation
from pbft.receipt import RECEIPT_VERSION, UNKNOWN_OUTCOME_REASON, Receipt
from pbft.replies import check_reply
from pbft.signed import Envelope, Rejected, open_envelope, peek, seal, verify_signature

MAX_BACKOFF_DOUBLINGS = 3


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
    balance: int
    replicas: tuple[int, ...]
    seq: int


ClientAction = Send | Decided | BalanceRead


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
        self.queries: dict[int, tuple[str, int, dict[tuple[int, int], dict[int, int]]]] = {}
        self.decided = 0
        self.submitted = 0
        self.retransmissions = 0
        self.drops: Counter[str] = Counter()

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
        actions: list[ClientAction] = []
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
        for answer, voters in answers.items():
            if answer != (reply.exists, reply.balance) and reply.replica in voters:
                raise Rejected(DropReason.CONFLICTING_REPLY)
        voters = answers.setdefault((reply.exists, reply.balance), {})
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
            )
        ]

    def _on_reply(self, data: bytes) -> list[ClientAction]:
        envelope, reply = peek(data, (Reply, BalanceReply))
        if isinstance(reply, BalanceReply):
            return self._on_balance_reply(envelope, reply)
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
