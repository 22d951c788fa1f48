"""PaymentClient: pay through a real cluster and get a receipt anyone can verify offline.

    async with PaymentClient(cluster, client_id=0) as client:
        decided = await client.pay("acct-00000", "acct-00002", 250)
        decided.outcome, decided.reason, decided.receipt

Every ledger operation (pbft/operations.py) goes the same way, through `submit`, and is
decided the same way, with a receipt: `authorize`, `capture`, `void`, `refund`,
`open_account`. Holds and payments are named by (client id, request id) of the request that
made them: a transfer's own, an authorize's for its hold, and for a captured hold the hold's.
Lookups of history, answered by f + 1 matching replicas, go through `lookup`: `status` (a
request's record, and a receipt for this client's own), `history` (an account's entries, a
page at a time) and `hold` (a hold's fate). `replica_status` asks every replica where it
stands and gives each one's own signed word (no agreement), for dashboards.

The sans-I/O `ClientCore` decides (f + 1 matching signed replies) and says when to
retransmit; this module only carries its messages and its clock. Retrying with the same
request id is always safe: the cluster executes a request id at most once and answers a
retransmission with the original decision.

A client keeps at most the cluster's `client_pending_limit` payments in flight; more
`pay` calls wait for one to be decided. That is the client's side of the replicas' quota:
a client with more undecided requests is taken for a flooder (its requests beyond the
quota are refused, and the ones it has arm no request timer, so a censoring primary
would not be deposed for them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType

import trio

from crypto.keys import Principal, SigningKey
from pbft.client import (
    BalanceRead,
    ClientAction,
    ClientCore,
    Decided,
    LookupResult,
    ReplicaStatus,
)
from pbft.events import MessageReceived, Tick
from pbft.history import MAX_PAGE
from pbft.host import Outgoing, carry_out_client
from pbft.operations import Operation
from runtime.cluster import Cluster, ClusterFileError
from runtime.transport import Transport, TransportConfig

TICK_MS = 10
MAX_TIMEOUT_S = 24 * 3600.0


class PaymentTimeout(TimeoutError):
    """No decision within the deadline. The payment may still be decided later: retry with
    the same request id to learn its outcome, never with a new one."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class PaymentClient:
    def __init__(
        self,
        cluster: Cluster,
        client_id: int,
        key: SigningKey | None = None,
        *,
        timeout_s: float = 10.0,
        transport_config: TransportConfig | None = None,
        view: int | None = None,
    ) -> None:
        """`view`: the view to assume (for example one remembered from an earlier session);
        None (the default) learns it from the replicas' signed replies: a fresh client's
        first request goes to every replica, so it does not wait out a timeout on the
        primary of view 0 after the cluster has moved on."""
        if type(client_id) is not int or client_id not in cluster.client_keys:
            known = ", ".join(str(client) for client in sorted(cluster.client_keys)[:10])
            raise ClusterFileError(
                str(cluster.path), "clients", f"no client {client_id!r} in this cluster ({known})"
            )
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s)) or not (
            0 < timeout_s <= MAX_TIMEOUT_S
        ):
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout_s}")
        self.cluster = cluster
        self.client_id = client_id
        self.key = key if key is not None else cluster.load_private_key("client", client_id)
        self.timeout_s = float(timeout_s)
        self.keyring = cluster.keyring()
        self.core = ClientCore(
            client_id,
            cluster.config,
            self.key,
            self.keyring,
            cluster_id=cluster.cluster_id,
            max_outstanding=cluster.config.client_pending_limit,
            view=view,
        )
        self._in_flight = trio.Semaphore(cluster.config.client_pending_limit)
        # The core refuses more than this many reads (or lookups) at once: wait instead.
        self._read_slots = trio.Semaphore(cluster.config.client_pending_limit)
        self._lookup_slots = trio.Semaphore(cluster.config.client_pending_limit)
        self._transport = Transport(("client", client_id), self.key, self.keyring, transport_config)
        self._waiting: dict[int, trio.Event] = {}
        self._results: dict[int, Decided] = {}
        self._waiting_reads: dict[int, trio.Event] = {}
        self._reads: dict[int, BalanceRead] = {}
        self._waiting_lookups: dict[int, trio.Event] = {}
        self._lookups: dict[int, LookupResult] = {}
        # status query id -> (replica -> its answer, set once every replica answered)
        self._statuses: dict[int, tuple[dict[int, ReplicaStatus], trio.Event]] = {}
        self._nursery_manager: trio.Nursery | None = None
        self._cancel = trio.CancelScope()
        self._last_request_id = 0
        self._started = 0.0
        self._host = _Host(self)

    async def __aenter__(self) -> PaymentClient:
        self._nursery_context = trio.open_nursery()
        nursery = await self._nursery_context.__aenter__()
        self._nursery_manager = nursery
        await nursery.start(self._transport.run)
        for replica in self.cluster.replicas:
            self._transport.connect_to(("replica", replica.replica_id), replica.host, replica.port)
        self._started = trio.current_time()
        nursery.start_soon(self._clock)
        nursery.start_soon(self._receive)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        if self._nursery_manager is not None:
            self._nursery_manager.cancel_scope.cancel()
        try:
            return await self._nursery_context.__aexit__(exc_type, exc, traceback)
        except BaseExceptionGroup as group:
            # The nursery wraps what the body raised; a caller catches PaymentTimeout (or
            # its own exception) as itself. A background task's failure stays a group.
            if exc is not None and _only(group, exc):
                raise exc from None
            raise

    def new_request_id(self) -> int:
        """Increasing ids from the wall clock (microseconds), unique within this process."""
        candidate = time.time_ns() // 1000
        self._last_request_id = max(candidate, self._last_request_id + 1)
        return self._last_request_id

    async def wait_connected(self, count: int | None = None, timeout_s: float = 10.0) -> None:
        """Wait until connections to `count` replicas (default: all) have opened: each
        replica's handshake wakes it (no polling), within `timeout_s` (trio.TooSlowError)."""
        wanted = len(self.cluster.replicas) if count is None else count
        if wanted <= 0:
            return
        connected = 0
        enough = trio.Event()

        async def one(principal: Principal) -> None:
            nonlocal connected
            await self._transport.wait_connected(principal)  # woken by the handshake itself
            connected += 1
            if connected >= wanted:
                enough.set()

        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                for replica in self.cluster.replicas:
                    nursery.start_soon(one, ("replica", replica.replica_id))
                await enough.wait()
                nursery.cancel_scope.cancel()

    def is_connected(self, replica_id: int) -> bool:
        """Whether this client's transport has a live connection to replica `replica_id`."""
        return self._transport.is_connected(("replica", replica_id))

    async def pay(
        self, payer: str, payee: str, amount: int, request_id: int | None = None
    ) -> Decided:
        """Submit a payment and wait for its decision (at most `timeout_s` once it is
        sent; before that, for a free slot if `client_pending_limit` are in flight)."""
        return await self.submit(Operation.transfer(payer, payee, amount), request_id)

    async def authorize(
        self,
        payer: str,
        payee: str,
        amount: int,
        expires_in_ms: int,
        request_id: int | None = None,
    ) -> Decided:
        """Hold `amount` of `payer`'s available balance for `payee` until it is captured,
        voided, or `expires_in_ms` after its batch's time. The hold's id is
        (client_id, request_id) of this request: `decided.client_id, decided.request_id`."""
        return await self.submit(
            Operation.authorize(payer, payee, amount, expires_in_ms), request_id
        )

    async def capture(
        self, hold: tuple[int, int], amount: int, request_id: int | None = None
    ) -> Decided:
        """Take `amount` (at most what is held) of hold `hold` = (client, request id) for
        its payee; the rest goes back to the payer. Asked by the payee's owner."""
        return await self.submit(Operation.capture(hold, amount), request_id)

    async def void(self, hold: tuple[int, int], request_id: int | None = None) -> Decided:
        """Release hold `hold` = (client, request id) to its payer, by the payer's owner or
        the payee's owner."""
        return await self.submit(Operation.void(hold), request_id)

    async def refund(
        self, payment: tuple[int, int], amount: int, request_id: int | None = None
    ) -> Decided:
        """Move `amount` back from the payee to the payer of `payment` = (client, request
        id) of a transfer, or of a captured hold (the hold's id). Asked by the payee's owner."""
        return await self.submit(Operation.refund(payment, amount), request_id)

    async def open_account(self, name: str, request_id: int | None = None) -> Decided:
        """Open account `name` with balance 0, owned by this client."""
        return await self.submit(Operation.open_account(name), request_id)

    async def submit(self, operation: Operation, request_id: int | None = None) -> Decided:
        """Submit any ledger operation (pbft/operations.py) and wait for its decision, like
        `pay`."""
        async with self._in_flight:
            return await self._submit(operation, request_id)

    async def _submit(self, operation: Operation, request_id: int | None) -> Decided:
        request_id = self.new_request_id() if request_id is None else request_id
        event = trio.Event()
        self._waiting[request_id] = event
        try:
            self._carry_out(self.core.submit_operation(request_id, operation))
            with trio.move_on_after(self.timeout_s) as scope:
                await event.wait()
            if scope.cancelled_caught:
                raise PaymentTimeout(
                    f"no decision for request {request_id} within {self.timeout_s} s; "
                    f"retry with request_id={request_id}",
                    request_id,
                )
            return self._results.pop(request_id)
        finally:
            self._waiting.pop(request_id, None)
            # Timed out or cancelled: the core forgets it as the slot (self._in_flight) is
            # given back, so the two never disagree about what is in flight (a cancelled
            # pay used to leave it in the core: later pays hit "already in flight").
            self.core.outstanding.pop(request_id, None)

    async def balance(self, account: str) -> BalanceRead:
        """An account's balance as f + 1 replicas report it (a read, not ordered). Waits for
        a free slot if `client_pending_limit` reads are in flight; PaymentTimeout if the slot
        and the answer together take longer than `timeout_s`."""
        with trio.move_on_after(self.timeout_s):
            async with self._read_slots:
                return await self._balance(account)
        raise PaymentTimeout(f"no f + 1 matching balances for {account!r}")

    async def _balance(self, account: str) -> BalanceRead:
        query_id = self.new_request_id()
        event = trio.Event()
        self._waiting_reads[query_id] = event
        try:
            self._carry_out(self.core.query_balance(query_id, account))
            await event.wait()
            return self._reads.pop(query_id)
        finally:
            # Answered, timed out or cancelled by any outer scope: the core forgets the query
            # (else it is retransmitted forever and fills the core's query table).
            self._waiting_reads.pop(query_id, None)
            self._reads.pop(query_id, None)
            self.core.queries.pop(query_id, None)

    async def lookup(self, ask: Callable[[int], list[ClientAction]]) -> LookupResult:
        """A lookup of history, answered by f + 1 matching replicas (pbft/client.py's lookups
        section): `ask(query_id)` builds it, for example
        `lambda query_id: client.core.lookups.status(query_id, client_id, request_id)`.
        Waits for a free slot if `client_pending_limit` lookups are in flight; PaymentTimeout
        if no f + 1 replicas agree within `timeout_s` (the wait for a slot included)."""
        with trio.move_on_after(self.timeout_s):
            async with self._lookup_slots:
                return await self._lookup(ask)
        raise PaymentTimeout(f"no f + 1 matching answers to a lookup within {self.timeout_s} s")

    async def _lookup(self, ask: Callable[[int], list[ClientAction]]) -> LookupResult:
        query_id = self.new_request_id()
        event = trio.Event()
        self._waiting_lookups[query_id] = event
        try:
            self._carry_out(ask(query_id))
            await event.wait()
            return self._lookups.pop(query_id)
        finally:
            # As in _balance: whatever ended the wait, the core must not keep the lookup.
            self._waiting_lookups.pop(query_id, None)
            self._lookups.pop(query_id, None)
            self.core.lookups.pending.pop(query_id, None)

    async def status(self, client_id: int, request_id: int) -> LookupResult:
        """What became of request (client_id, request_id), even one too old for the replicas'
        dedup window: its attributed record and, for this client's own request, a receipt."""
        return await self.lookup(
            lambda query_id: self.core.lookups.status(query_id, client_id, request_id)
        )

    async def history(
        self,
        account: str,
        *,
        after: tuple[int, int] = (0, 0),
        limit: int = MAX_PAGE,
        through_seq: int = 0,
    ) -> LookupResult:
        """`account`'s entries after the cursor `after` = (seq, position), at most `limit`:
        pass the last entry's (seq, position) for the next page."""
        return await self.lookup(
            lambda query_id: self.core.lookups.history(
                query_id, account, after=after, limit=limit, through_seq=through_seq
            )
        )

    async def hold(self, hold: tuple[int, int]) -> LookupResult:
        """The fate of hold `hold` = (client, request id) of its authorize."""
        return await self.lookup(lambda query_id: self.core.lookups.hold(query_id, *hold))

    async def replica_status(self, timeout_s: float = 1.0) -> dict[int, ReplicaStatus | None]:
        """Every replica's own signed word on where it stands (view, last executed, stable
        checkpoint...), waiting at most `timeout_s` for all of them: None for a replica that
        did not answer in time (down, cut off, or out of lookup budget for this client).
        Not agreed by f + 1: a faulty replica's answer says what it likes."""
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s)) or not (
            0 < timeout_s <= MAX_TIMEOUT_S
        ):
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout_s}")
        query_id = self.new_request_id()
        answers: dict[int, ReplicaStatus] = {}
        everyone = trio.Event()
        self._statuses[query_id] = (answers, everyone)
        try:
            self._carry_out(self.core.statuses.ask(query_id))
            with trio.move_on_after(timeout_s):
                await everyone.wait()
        finally:
            self._statuses.pop(query_id, None)
            self.core.statuses.pending.pop(query_id, None)
        return {
            replica.replica_id: answers.get(replica.replica_id) for replica in self.cluster.replicas
        }

    def statistics(self) -> dict[str, object]:
        return {"client": self.core.statistics(), "transport": self._transport.statistics()}

    def _carry_out(self, actions: list[ClientAction]) -> None:
        carry_out_client(actions, self._host)

    async def _clock(self) -> None:
        while True:
            await trio.sleep(TICK_MS / 1000)
            now_ms = int((trio.current_time() - self._started) * 1000)
            self._carry_out(self.core.handle(Tick(now_ms)))

    async def _receive(self) -> None:
        async for _principal, data in self._transport.inbound:
            self._carry_out(self.core.handle(MessageReceived(data)))


class _Host:
    """A PaymentClient as its core's host (pbft.host.ClientHost): the transport, and the
    `pay` and `balance` calls waiting for answers."""

    def __init__(self, client: PaymentClient) -> None:
        self.client = client

    def send(self, message: Outgoing) -> None:
        for destination in message.to:
            self.client._transport.send(destination, message.data)

    def decided(self, decided: Decided) -> None:
        self.client._results[decided.request_id] = decided
        waiting = self.client._waiting.get(decided.request_id)
        if waiting is not None:
            waiting.set()

    def balance_read(self, read: BalanceRead) -> None:
        waiting = self.client._waiting_reads.get(read.query_id)
        if waiting is not None:  # else its read gave up: nobody to hand it to
            self.client._reads[read.query_id] = read
            waiting.set()

    def looked_up(self, result: LookupResult) -> None:
        waiting = self.client._waiting_lookups.get(result.query_id)
        if waiting is not None:  # else its lookup gave up: nobody to hand it to
            self.client._lookups[result.query_id] = result
            waiting.set()

    def replica_status(self, status: ReplicaStatus) -> None:
        waiting = self.client._statuses.get(status.query_id)
        if waiting is not None:  # else its query gave up
            answers, everyone = waiting
            answers[status.replica] = status
            if len(answers) >= len(self.client.cluster.replicas):
                everyone.set()


def _only(group: BaseExceptionGroup[BaseException], wanted: BaseException) -> bool:
    """Whether every leaf of `group` is `wanted` (the body's exception, perhaps nested)."""
    for inner in group.exceptions:
        if isinstance(inner, BaseExceptionGroup):
            if not _only(inner, wanted):
                return False
        elif inner is not wanted:
            return False
    return True
