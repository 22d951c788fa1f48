"""The requests a scenario submits: accounts, owners and a seeded stream of operations.

Transfers alone by default; a `mix` adds the ledger's other operations (authorize, capture,
void, refund, open_account). Every choice is drawn from the simulation's seeded RNG, so the
same scenario and seed plan the same requests; a transfer-only mix draws exactly what the
planner always drew (no draw for the operation when only one has weight)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pbft.genesis import ACCOUNT_PREFIX
from pbft.ledger import GeneratedAccounts

# Names are padded to five digits at least (acct-00000), as pbft.genesis.account_name does.
_MIN_NAME_WIDTH = 5

# The operation codes of the wire (in the order the issue lists them).
OPERATIONS = ("transfer", "authorize", "capture", "void", "refund", "open_account")
TRANSFER_ONLY: tuple[tuple[str, float], ...] = (("transfer", 1.0),)
# A capture, void or refund names a hold or payment planned at least this long before it,
# so that it is usually ordered after it (they come from different clients, which nothing
# orders); an earlier one is refused (hold_not_found, payment_not_found), which is fine.
REFERENCE_MIN_AGE_US = 200_000
# Request ids a deliberately wrong reference names: no client's workload gets that far.
UNKNOWN_REFERENCE_BASE = 1 << 32
# Accounts opened by the workload: "open-<client>-<n>", within the wire's name limits.
OPENED_PREFIX = "open-"


@dataclass(frozen=True)
class PlannedPayment:
    """One planned request, of any operation (the name predates the others). For capture
    and void `ref` is the hold's id, for refund the payment's; for open_account `payer`
    is the new account's name."""

    at_us: int
    client_id: int
    request_id: int
    payer: str
    payee: str
    amount: int
    op: str = "transfer"
    ref_client: int = 0
    ref_request: int = 0
    expires_in_ms: int = 0


@dataclass
class _Planned:
    """A hold or payment the planner made, for later requests to name."""

    ident: tuple[int, int]
    payer: str
    payee: str
    amount: int
    at_us: int
    # refunds planned against it so far (payments only)
    refunded: int = 0


@dataclass
class _Planner:
    rng: random.Random
    clients: int
    genesis: GeneratedAccounts
    all_accounts: list[str]
    owned: dict[int, list[str]]
    total_supply: int
    initial_balance: int
    overdraw: float
    wrong_ref: float
    expires_in_ms: tuple[int, int]
    next_request_id: dict[int, int]
    # Payments are remembered only for refunds to name (a transfer-only run keeps none).
    track_payments: bool
    opened: list[str] = field(default_factory=list)
    opened_owner: dict[str, int] = field(default_factory=dict)
    # index of every opened account in all_accounts + opened (genesis names use their index)
    opened_index: dict[str, int] = field(default_factory=dict)
    open_holds: list[_Planned] = field(default_factory=list)
    closed_holds: list[_Planned] = field(default_factory=list)
    payments: list[_Planned] = field(default_factory=list)

    def owner(self, name: str) -> int:
        opener = self.opened_owner.get(name)
        if opener is not None:
            return opener
        index = self.genesis.index(name)
        return 0 if index is None else index % self.clients

    def account(self, index: int) -> str:
        genesis = len(self.all_accounts)
        return self.all_accounts[index] if index < genesis else self.opened[index - genesis]

    def index_of(self, name: str) -> int:
        opened = self.opened_index.get(name)
        if opened is not None:
            return opened
        index = self.genesis.index(name)
        return 0 if index is None else index

    def payer_and_payee(self, client: int) -> tuple[str, str]:
        payer = self.rng.choice(self.owned[client] or self.all_accounts)
        # Any account but the payer: one _randbelow(accounts - 1), without building the
        # list of the others (the same draw as rng.choice over it).
        payee_index = self.rng.randrange(len(self.all_accounts) + len(self.opened) - 1)
        if payee_index >= self.index_of(payer):
            payee_index += 1
        return payer, self.account(payee_index)

    def amount(self) -> int:
        if self.rng.random() < self.overdraw:
            # More than all the money in the system: surely refused.
            return self.total_supply + 1 + self.rng.randrange(max(1, self.initial_balance))
        return 1 + self.rng.randrange(max(1, self.initial_balance // 10))

    def take_request_id(self, client: int) -> int:
        request_id = self.next_request_id[client]
        self.next_request_id[client] += 1
        return request_id

    def pick(self, planned: list[_Planned], at_us: int) -> int | None:
        """The index of one entry planned long enough ago, if any (entries are in time order)."""
        old = 0
        while old < len(planned) and planned[old].at_us <= at_us - REFERENCE_MIN_AGE_US:
            old += 1
        return self.rng.randrange(old) if old else None

    def unknown_reference(self) -> tuple[int, int]:
        return self.rng.randrange(self.clients), UNKNOWN_REFERENCE_BASE + self.rng.randrange(1000)

    def plan_transfer(self, op: str, at_us: int) -> PlannedPayment:
        """A transfer or an authorize (a hold): the same draws, the hold its expiry too."""
        client = self.rng.randrange(self.clients)
        payer, payee = self.payer_and_payee(client)
        amount = self.amount()
        request_id = self.take_request_id(client)
        planned = _Planned((client, request_id), payer, payee, amount, at_us)
        # An overdrawing one is surely refused: nothing later names it.
        possible = amount <= self.total_supply
        if op == "transfer":
            if self.track_payments and possible:
                self.payments.append(planned)
            return PlannedPayment(at_us, client, request_id, payer, payee, amount)
        low, high = self.expires_in_ms
        expires = self.rng.randint(low, high)
        if possible:
            self.open_holds.append(planned)
        return PlannedPayment(
            at_us, client, request_id, payer, payee, amount, op, expires_in_ms=expires
        )

    def plan(self, op: str, at_us: int) -> PlannedPayment | None:
        """One request of `op`; None when there is nothing for it to name (the caller plans a
        transfer instead)."""
        if op == "transfer" or op == "authorize":
            return self.plan_transfer(op, at_us)
        if op == "open_account":
            client = self.rng.randrange(self.clients)
            request_id = self.take_request_id(client)
            name = f"{OPENED_PREFIX}{client}-{request_id}"
            self.opened_index[name] = len(self.all_accounts) + len(self.opened)
            self.opened.append(name)
            self.opened_owner[name] = client
            self.owned[client].append(name)
            return PlannedPayment(at_us, client, request_id, name, "", 0, op)
        if op == "capture" or op == "void":
            return self.plan_hold_op(op, at_us)
        return self.plan_refund(at_us)

    def plan_hold_op(self, op: str, at_us: int) -> PlannedPayment | None:
        if self.rng.random() < self.wrong_ref:
            if not self.closed_holds:
                # A hold nobody authorized: hold_not_found.
                client = self.rng.randrange(self.clients)
                ref = self.unknown_reference()
                amount = 0 if op == "void" else self.amount()
                request_id = self.take_request_id(client)
                return PlannedPayment(at_us, client, request_id, "", "", amount, op, *ref)
            # A hold already captured or voided (or expired, or still open if that
            # capture was refused): refused unless the first one was.
            hold = self.closed_holds[self.rng.randrange(len(self.closed_holds))]
            fresh = False
        else:
            index = self.pick(self.open_holds, at_us)
            if index is None:
                return None
            hold = self.open_holds.pop(index)
            self.closed_holds.append(hold)
            fresh = True
        if op == "capture" or self.rng.random() < 0.5:
            client = self.owner(hold.payee)  # the payee's owner captures (or voids)
        else:
            client = self.owner(hold.payer)
        request_id = self.take_request_id(client)
        if op == "void":
            return PlannedPayment(at_us, client, request_id, "", "", 0, op, *hold.ident)
        if self.rng.random() < self.overdraw:
            amount = hold.amount + 1 + self.rng.randrange(max(1, hold.amount))  # exceeds_hold
        else:
            amount = 1 + self.rng.randrange(max(1, hold.amount))
            if fresh and self.track_payments:
                # A capture is a payment the customer knows by the hold's id.
                self.payments.append(_Planned(hold.ident, hold.payer, hold.payee, amount, at_us))
        return PlannedPayment(at_us, client, request_id, "", "", amount, op, *hold.ident)

    def plan_refund(self, at_us: int) -> PlannedPayment | None:
        index = self.pick(self.payments, at_us)
        if index is None:
            return None
        payment = self.payments[index]
        client = self.owner(payment.payee)  # the payee's owner refunds
        request_id = self.take_request_id(client)
        ref = payment.ident
        left = payment.amount - payment.refunded
        if self.rng.random() < self.wrong_ref:
            ref = self.unknown_reference()  # payment_not_found
            amount = 1 + self.rng.randrange(max(1, payment.amount))
        elif left <= 0 or self.rng.random() < self.overdraw:
            amount = left + 1 + self.rng.randrange(max(1, payment.amount))  # exceeds_refundable
        else:
            amount = 1 + self.rng.randrange(left)
            payment.refunded += amount
        return PlannedPayment(at_us, client, request_id, "", "", amount, "refund", *ref)


def genesis_accounts(accounts: int, clients: int, initial_balance: int) -> GeneratedAccounts:
    """Account i belongs to client i mod clients, so every client owns at least one account
    when there are at least as many accounts as clients. A rule, not a table: a million
    accounts cost the ledger nothing until a payment touches one."""
    return GeneratedAccounts(
        accounts, initial_balance, ACCOUNT_PREFIX, range(clients), min_width=_MIN_NAME_WIDTH
    )


def plan_payments(
    rng: random.Random,
    *,
    payments: int,
    rate_per_s: float,
    clients: int,
    accounts: int,
    initial_balance: int,
    overdraw: float,
    start_us: int = 0,
    mix: Sequence[tuple[str, float]] = TRANSFER_ONLY,
    expires_in_ms: tuple[int, int] = (1, 1),
    wrong_ref: float = 0.0,
) -> list[PlannedPayment]:
    """A Poisson stream of requests, each of an operation drawn by the mix's weights.

    A payer is one of the submitting client's own accounts (any account if it owns none,
    which the ledger rejects as unauthorized); an overdrawing request asks for more than
    there is (all the money in the system, more than the hold, more than is refundable), so
    it is surely refused. Captures and voids name an earlier hold, refunds an earlier
    payment (a transfer, or a capture by its hold's id), each at most once; with
    probability `wrong_ref` one names a hold already closed or an id nobody used."""
    genesis = genesis_accounts(accounts, clients, initial_balance)
    all_accounts = genesis.names()
    owned: dict[int, list[str]] = {client: [] for client in range(clients)}
    for index, name in enumerate(all_accounts):
        owned[index % clients].append(name)
    planner = _Planner(
        rng,
        clients,
        genesis,
        all_accounts,
        owned,
        total_supply=accounts * initial_balance,
        initial_balance=initial_balance,
        overdraw=overdraw,
        wrong_ref=wrong_ref,
        expires_in_ms=expires_in_ms,
        next_request_id=dict.fromkeys(range(clients), 1),
        track_payments=any(op == "refund" and weight > 0 for op, weight in mix),
    )
    weighted = [(op, weight) for op, weight in mix if weight > 0]
    ops = [op for op, _ in weighted]
    cumulative: list[float] = []
    for _, weight in weighted:
        cumulative.append((cumulative[-1] if cumulative else 0.0) + weight)
    mean_gap_us = 1_000_000 / rate_per_s
    planned = []
    at_us = float(start_us)
    for _ in range(payments):
        at_us += rng.expovariate(1.0) * mean_gap_us
        # No draw when one operation is all there is: a transfer-only stream stays as it was.
        op = ops[0] if len(ops) == 1 else rng.choices(ops, cum_weights=cumulative)[0]
        request = planner.plan(op, int(at_us))
        planned.append(request or planner.plan_transfer("transfer", int(at_us)))
    return planned
