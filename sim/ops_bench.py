"""What each ledger operation costs, next to a plain transfer measured in the same run.

    python -m sim.ops_bench [--accounts N] [--ops K] [--repeat R]

One ledger of N generated accounts (the simulator's genesis), no replicas: each operation
is executed K times (`Ledger.execute`), a digest taken after every batch of 32 (as the
checkpoints' incremental digest is), and the best of R runs printed as microseconds per
operation, with its ratio to the transfer's. Every operation is confirmed (the setup makes
sure of it), so the figures are the cost of doing, not of refusing. Figures only; nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from pbft.genesis import ACCOUNT_PREFIX
from pbft.ledger import GeneratedAccounts, Ledger, Payment
from pbft.operations import Operation

CLIENTS = 4
BATCH = 32
BODY = b"\x01" * 32


def _payment(client: int, request_id: int, operation: Operation) -> Payment:
    return Payment(
        client,
        request_id,
        operation.payer,
        operation.payee,
        operation.amount,
        operation.op,
        operation.ref_client,
        operation.ref_request,
        operation.expires_in_ms,
    )


def _timed(ledger: Ledger, payments: list[Payment]) -> float:
    """Seconds to execute `payments`, a digest after every BATCH of them."""
    started = time.perf_counter()
    seq = 1
    for index, payment in enumerate(payments):
        result = ledger.execute(payment, BODY, seq)
        if result.decision.reason:
            raise SystemExit(f"{payment.op} was rejected: {result.decision.reason}")
        if index % BATCH == BATCH - 1:
            ledger.digest()
            seq += 1
    ledger.digest()
    return time.perf_counter() - started


def _fresh(accounts: int) -> tuple[Ledger, GeneratedAccounts]:
    genesis = GeneratedAccounts(accounts, 10**9, ACCOUNT_PREFIX, list(range(CLIENTS)))
    ledger = Ledger(genesis, dedup_window=4096)
    ledger.begin_batch(1, 1_000)
    ledger.digest()
    return ledger, genesis


def _pairs(genesis: GeneratedAccounts, count: int) -> list[tuple[int, str, str]]:
    """(owner of the payer, payer, payee) for `count` operations across the accounts."""
    pairs = []
    for index in range(count):
        payer = (index * 7919) % genesis.count
        payee = (payer + 1 + index % (genesis.count - 1)) % genesis.count
        pairs.append((genesis.owner(payer), genesis.name(payer), genesis.name(payee)))
    return pairs


def _owner(genesis: GeneratedAccounts, name: str) -> int:
    index = genesis.index(name)
    if index is None:
        raise SystemExit(f"no account {name!r}")
    return genesis.owner(index)


def measure(accounts: int, ops: int) -> dict[str, float]:
    """Seconds per operation of each op on a fresh ledger."""
    results: dict[str, float] = {}

    def warm(ledger: Ledger, genesis: GeneratedAccounts) -> None:
        """`ops` untimed transfers first, as capture, void and refund have their holds and
        payments first: each op is then timed with as many decisions in its clients'
        leaves (re-encoded whole at each digest, whatever the op)."""
        for i, (client, payer, payee) in enumerate(_pairs(genesis, ops)):
            ledger.execute(_payment(client, i + 1, Operation.transfer(payer, payee, 2)), BODY, 1)
        ledger.digest()

    def transfers(ledger: Ledger, genesis: GeneratedAccounts) -> list[Payment]:
        warm(ledger, genesis)
        return [
            _payment(client, 10**6 + i, Operation.transfer(payer, payee, 1))
            for i, (client, payer, payee) in enumerate(_pairs(genesis, ops))
        ]

    def authorizations(ledger: Ledger, genesis: GeneratedAccounts) -> list[Payment]:
        warm(ledger, genesis)
        return [
            _payment(client, 10**6 + i, Operation.authorize(payer, payee, 1, 60_000))
            for i, (client, payer, payee) in enumerate(_pairs(genesis, ops))
        ]

    def held_first(ledger: Ledger, genesis: GeneratedAccounts) -> list[tuple[int, int, int]]:
        """Authorize `ops` holds untimed (fewer per client than the default cap of open
        holds); (payee's owner, payer's owner, hold request id) of each."""
        holds = []
        for i, (client, payer, payee) in enumerate(_pairs(genesis, ops)):
            ledger.execute(
                _payment(client, i + 1, Operation.authorize(payer, payee, 2, 60_000)), BODY, 1
            )
            holds.append((_owner(genesis, payee), client, i + 1))
        ledger.digest()
        return holds

    def captures(ledger: Ledger, genesis: GeneratedAccounts) -> list[Payment]:
        return [
            _payment(owner, 10**6 + i, Operation.capture((client, request_id), 1))
            for i, (owner, client, request_id) in enumerate(held_first(ledger, genesis))
        ]

    def voids(ledger: Ledger, genesis: GeneratedAccounts) -> list[Payment]:
        return [
            _payment(client, 10**6 + i, Operation.void((client, request_id)))
            for i, (_, client, request_id) in enumerate(held_first(ledger, genesis))
        ]

    def refunds(ledger: Ledger, genesis: GeneratedAccounts) -> list[Payment]:
        paid = []
        for i, (client, payer, payee) in enumerate(_pairs(genesis, ops)):
            ledger.execute(_payment(client, i + 1, Operation.transfer(payer, payee, 2)), BODY, 1)
            paid.append((_owner(genesis, payee), client, i + 1))
        ledger.digest()
        return [
            _payment(owner, 10**6 + i, Operation.refund((client, request_id), 1))
            for i, (owner, client, request_id) in enumerate(paid)
        ]

    def openings(ledger: Ledger, genesis: GeneratedAccounts) -> list[Payment]:
        warm(ledger, genesis)
        # Each its own client (a new client leaf each time, which moves every record leaf
        # after it): the per-client cap on opened accounts stays far away.
        return [_payment(1000 + i, 1, Operation.open_account(f"shop-{i}")) for i in range(ops)]

    setups: dict[str, Callable[[Ledger, GeneratedAccounts], list[Payment]]] = {
        "transfer": transfers,
        "authorize": authorizations,
        "capture": captures,
        "void": voids,
        "refund": refunds,
        "open_account": openings,
    }
    for name, setup in setups.items():
        ledger, genesis = _fresh(accounts)
        payments = setup(ledger, genesis)
        results[name] = _timed(ledger, payments) / len(payments)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.accounts < 2 or args.ops < 1 or args.repeat < 1:
        parser.error("--accounts must be at least 2, --ops and --repeat at least 1")
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, seconds in measure(args.accounts, args.ops).items():
            best[name] = min(best.get(name, seconds), seconds)
    print(
        f"{args.accounts:,} generated accounts, {args.ops:,} ops each, a digest every "
        f"{BATCH}; best of {args.repeat}"
    )
    baseline = best["transfer"]
    for name, seconds in best.items():
        print(f"  {name:<13} {seconds * 1e6:8.1f} us/op  {seconds / baseline:5.2f} x transfer")


if __name__ == "__main__":
    main()
