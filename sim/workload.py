"""The payments a scenario submits: accounts, owners and a seeded stream of payments."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pbft.genesis import ACCOUNT_PREFIX
from pbft.ledger import GeneratedAccounts

# Names are padded to five digits at least (acct-00000), as pbft.genesis.account_name does.
_MIN_NAME_WIDTH = 5


@dataclass(frozen=True)
class PlannedPayment:
    at_us: int
    client_id: int
    request_id: int
    payer: str
    payee: str
    amount: int


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
) -> list[PlannedPayment]:
    """A Poisson stream of payments. A payer is one of the submitting client's own accounts
    (any account if it owns none, which the ledger rejects as unauthorized); an overdrawing
    payment asks for more than all the money in the system, so it is surely rejected."""
    all_accounts = genesis_accounts(accounts, clients, initial_balance).names()
    owned: dict[int, list[str]] = {client: [] for client in range(clients)}
    for index, name in enumerate(all_accounts):
        owned[index % clients].append(name)
    total_supply = accounts * initial_balance
    mean_gap_us = 1_000_000 / rate_per_s
    next_request_id = dict.fromkeys(range(clients), 1)
    planned = []
    at_us = float(start_us)
    for _ in range(payments):
        at_us += rng.expovariate(1.0) * mean_gap_us
        client = rng.randrange(clients)
        payer = rng.choice(owned[client] or all_accounts)
        # Any account but the payer: the same draw as rng.choice over the list without the
        # payer (both are one _randbelow(accounts - 1)), without building that list.
        payee_index = rng.randrange(accounts - 1)
        if all_accounts[payee_index] >= payer:
            payee_index += 1
        payee = all_accounts[payee_index]
        if rng.random() < overdraw:
            amount = total_supply + 1 + rng.randrange(max(1, initial_balance))
        else:
            amount = 1 + rng.randrange(max(1, initial_balance // 10))
        planned.append(
            PlannedPayment(int(at_us), client, next_request_id[client], payer, payee, amount)
        )
        next_request_id[client] += 1
    return planned
