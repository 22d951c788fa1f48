"""Soak benchmark: a local cluster of replica processes, killed and restarted under load.

    python -m runtime.soak --rounds 100 [--clients 3] [--replicas 4] [--seed S] [--dir DIR]

Starts `replicas` replica processes on 127.0.0.1 (free ports, a temporary directory unless
--dir). Every client runs two tasks that pay without pause from accounts it owns; a
payment that times out is retried with the same request id, never a new one, so it is
executed at most once. Meanwhile each round SIGKILLs 1 to f random replicas (a third of
the rounds pick the current primary, view mod n, on purpose and others hit it by chance;
the view is read from the replicas' logs), waits, restarts them from their durable logs,
waits for them to listen and lets them catch up a little. After the last round the load stops, every
replica is stopped with SIGTERM, and each one's durable log is read back
(`runtime.storage`) into a replica core. Checks:

- every payment submitted was decided, and its receipt verifies offline;
- every receipt matches every replica's durable ledger (same outcome, reason and
  sequence number); a receipt that a replica does not hold although that replica has
  executed past the receipt's sequence number is a lost receipt;
- money is conserved at every replica, and replicas that executed as far agree on the
  ledger digest; no replica exited on its own.

Prints rounds, payments submitted and decided, receipts checked, lost receipts, the
longest stall (the longest time with no decision while payments were outstanding), view
changes, and the wall time. Exit status 0 if every check holds, 1 if one fails, 2 for
bad arguments. Progress goes to stderr only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import trio

from pbft.client import Decided
from pbft.receipt import ReceiptError, verify_receipt
from runtime.client import PaymentClient, PaymentTimeout
from runtime.cluster import Cluster
from runtime.localcluster import LocalCluster

PROTOCOL = {"view_change_timeout_ms": 500}
STARTUP_TIMEOUT_S = 60.0  # generous: a shared machine can stall for many seconds


@dataclass
class SoakSettings:
    rounds: int = 100
    replicas: int = 4
    clients: int = 3
    tasks_per_client: int = 2
    seed: int = 0
    down_s: tuple[float, float] = (0.2, 1.0)  # how long a killed replica stays down
    settle_s: tuple[float, float] = (0.3, 1.2)  # after it listens again, before the next round
    payment_timeout_s: float = 5.0
    final_settle_s: float = 3.0


@dataclass
class SoakResult:
    rounds: int = 0
    kills: int = 0
    primary_kills: int = 0
    submitted: int = 0
    decided: int = 0
    confirmed: int = 0
    rejected: int = 0
    retries: int = 0
    undecided: int = 0
    receipts_checked: int = 0
    lost_receipts: int = 0
    mismatches: int = 0
    bad_receipts: int = 0
    longest_stall_s: float = 0.0
    longest_stall_round: int = 0
    views_installed: int = 0
    final_view: int = 0
    conserved: bool = True
    digests_agree: bool = True
    replica_positions: dict[int, int] = field(default_factory=dict)
    unexpected_exits: list[str] = field(default_factory=list)
    aborted: str = ""
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    load_s: float = 0.0  # from the first payment to the end of the faults
    receipts: list[Decided] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures


class LoadTracker:
    """Outstanding payments and the longest time with no decision while any were out."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.last_progress = 0.0
        self.longest_stall = 0.0
        self.longest_stall_round = 0
        self.round = 0
        # Retries stop after this (trio time): set once the faults are over.
        self.give_up_at = float("inf")

    def submitted(self) -> None:
        now = trio.current_time()
        if self.outstanding == 0:
            self.last_progress = now
        self.outstanding += 1

    def decided(self) -> None:
        self._measure()
        self.outstanding -= 1
        self.last_progress = trio.current_time()

    def gave_up(self) -> None:
        self.outstanding -= 1

    def _measure(self) -> None:
        if self.outstanding > 0:
            stall = trio.current_time() - self.last_progress
            if stall > self.longest_stall:
                self.longest_stall = stall
                self.longest_stall_round = self.round

    def finish(self) -> None:
        self._measure()


async def _pay_until_decided(
    client: PaymentClient,
    payer: str,
    payee: str,
    amount: int,
    tracker: LoadTracker,
    result: SoakResult,
) -> Decided | None:
    request_id = client.new_request_id()
    result.submitted += 1
    tracker.submitted()
    while True:
        try:
            decided = await client.pay(payer, payee, amount, request_id)
        except PaymentTimeout:
            if trio.current_time() >= tracker.give_up_at:
                tracker.gave_up()
                result.undecided += 1
                return None
            result.retries += 1  # the same request id: executed at most once
            continue
        tracker.decided()
        result.decided += 1
        return decided


async def _soak(
    settings: SoakSettings,
    cluster: Cluster,
    local: LocalCluster,
    result: SoakResult,
    receipts: list[Decided],
    progress: TextIO | None,
) -> None:
    rng = random.Random(settings.seed)
    tracker = LoadTracker()
    fault_bound = cluster.config.fault_tolerance
    load_running = True
    owned: dict[int, list[str]] = {}
    for name, account in sorted(cluster.accounts.items()):
        owned.setdefault(account.owner, []).append(name)
    names = sorted(cluster.accounts)

    async def worker(client: PaymentClient, task: int) -> None:
        worker_rng = random.Random(f"{settings.seed}/{client.client_id}/{task}")
        accounts = owned[client.client_id]
        while load_running:
            payer = accounts[task % len(accounts)]
            payee = worker_rng.choice([name for name in names if name != payer])
            # Now and then more than the payer holds: rejected (insufficient_funds), with a receipt.
            amount = worker_rng.randrange(1, 100) if worker_rng.random() < 0.95 else 10**12
            decided = await _pay_until_decided(client, payer, payee, amount, tracker, result)
            if decided is not None:
                receipts.append(decided)

    async def wait_listening(replica: int, count: int) -> bool:
        with trio.move_on_after(STARTUP_TIMEOUT_S):
            while local.listening_count(replica) < count:
                await trio.sleep(0.05)
            return True
        return False

    async with trio.open_nursery() as nursery:
        clients = []
        for client_id in range(settings.clients):
            client = PaymentClient(cluster, client_id, timeout_s=settings.payment_timeout_s)
            await nursery.start(_serve, client)
            clients.append(client)
        load_started = trio.current_time()
        for client in clients:
            for task in range(settings.tasks_per_client):
                nursery.start_soon(worker, client, task)
        for round_number in range(1, settings.rounds + 1):
            tracker.round = round_number
            _note_exits(local, result)
            primary = local.current_view() % settings.replicas
            count = rng.randint(1, fault_bound)
            if rng.random() < 1 / 3:
                victims = [primary] + rng.sample(
                    [r for r in range(settings.replicas) if r != primary], count - 1
                )
            else:
                victims = rng.sample(range(settings.replicas), count)
            for victim in victims:
                if victim in local.processes:
                    local.kill(victim)
                    result.kills += 1
                    result.primary_kills += victim == primary
            await trio.sleep(rng.uniform(*settings.down_s))
            for victim in victims:
                local.start(victim)
            late = [v for v in victims if not await wait_listening(v, local.starts[v])]
            if late:
                result.aborted = (
                    f"round {round_number}: replica {late[0]} did not listen within "
                    f"{STARTUP_TIMEOUT_S:.0f} s of its restart"
                )
                break
            await trio.sleep(rng.uniform(*settings.settle_s))
            result.rounds = round_number
            if progress is not None:
                print(
                    f"\rround {round_number}/{settings.rounds}  decided {result.decided}"
                    f"  view {local.current_view()}",
                    end="",
                    file=progress,
                    flush=True,
                )
        # No more faults: the payments still out must now be decided, and the replicas
        # restarted last get time to catch up before they are stopped.
        load_running = False
        result.load_s = trio.current_time() - load_started
        tracker.give_up_at = trio.current_time() + 4 * settings.payment_timeout_s
        await trio.sleep(settings.final_settle_s)
        while tracker.outstanding > 0 and trio.current_time() < tracker.give_up_at + 1:
            await trio.sleep(0.05)
        tracker.finish()
        nursery.cancel_scope.cancel()
    if progress is not None:
        print(file=progress)
    result.longest_stall_s = tracker.longest_stall
    result.longest_stall_round = tracker.longest_stall_round


async def _serve(
    client: PaymentClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with client:
        await client.wait_connected(timeout_s=STARTUP_TIMEOUT_S)
        task_status.started()
        await trio.sleep_forever()


def check_ledgers(local: LocalCluster, receipts: list[Decided], result: SoakResult) -> None:
    cluster = local.cluster
    keyring = cluster.keyring()
    cores = [local.rebuilt_replica(replica) for replica in local.replica_ids]
    total = sum(account.balance for account in cluster.accounts.values())
    for core in cores:
        result.replica_positions[core.id] = core.last_executed
        if not core.ledger.total_balance() == core.ledger.recount_total() == total:
            result.conserved = False
    by_position: dict[int, set[str]] = {}
    for core in cores:
        by_position.setdefault(core.last_executed, set()).add(core.ledger.digest().hex())
    result.digests_agree = all(len(digests) == 1 for digests in by_position.values())
    for decided in receipts:
        if decided.receipt is None:
            result.bad_receipts += 1
            continue
        try:
            verified = verify_receipt(decided.receipt, keyring, cluster.cluster_id)
        except ReceiptError:
            result.bad_receipts += 1
            continue
        result.receipts_checked += 1
        if verified.outcome == "confirmed":
            result.confirmed += 1
        else:
            result.rejected += 1
        lost = False
        for core in cores:
            decision = core.ledger.lookup(verified.client_id, verified.request_id)
            if decision is None:
                # Only a replica that has not yet executed that far may lack it.
                lost = lost or core.last_executed >= verified.seq
                continue
            if (decision.outcome.value, decision.reason.value, decision.seq) != (
                verified.outcome,
                verified.reason,
                verified.seq,
            ):
                result.mismatches += 1
        holders = sum(
            core.ledger.lookup(verified.client_id, verified.request_id) is not None
            for core in cores
        )
        if lost or holders < cluster.config.quorum:
            result.lost_receipts += 1


def _note_exits(local: LocalCluster, result: SoakResult) -> None:
    """Replicas that exited by themselves (never expected in a soak): each a failure."""
    for replica, code in local.reap().items():
        result.unexpected_exits.append(f"replica {replica} exited with {code}")


def run_soak(settings: SoakSettings, root: Path, progress: TextIO | None = None) -> SoakResult:
    started = time.monotonic()
    result = SoakResult()
    local = LocalCluster.create(
        root, replicas=settings.replicas, clients=settings.clients, protocol=PROTOCOL
    )
    cluster = local.cluster
    receipts = result.receipts
    try:
        local.start_all()
        trio.run(_soak, settings, cluster, local, result, receipts, progress)
        _note_exits(local, result)
    finally:
        result.unexpected_exits += local.stop_all()
    views = local.views()
    result.final_view = max(views, default=0)
    result.views_installed = len(set(views))
    check_ledgers(local, receipts, result)
    result.wall_s = time.monotonic() - started
    if result.aborted:
        result.failures.append(result.aborted)
    if result.undecided:
        result.failures.append(f"{result.undecided} payments never decided")
    if result.lost_receipts:
        result.failures.append(f"{result.lost_receipts} lost receipts")
    if result.mismatches:
        result.failures.append(f"{result.mismatches} receipts disagree with a durable ledger")
    if result.bad_receipts:
        result.failures.append(f"{result.bad_receipts} receipts do not verify")
    if not result.conserved:
        result.failures.append("money is not conserved at some replica")
    if not result.digests_agree:
        result.failures.append("replicas at one sequence number hold different ledgers")
    result.failures += result.unexpected_exits
    return result


def print_result(settings: SoakSettings, result: SoakResult, root: Path) -> None:
    print(
        f"cluster          {settings.replicas} replica processes, {settings.clients} clients "
        f"x {settings.tasks_per_client} tasks, seed {settings.seed} ({root})"
    )
    print(
        f"rounds           {result.rounds} ({result.kills} kill -9, "
        f"{result.primary_kills} of them the primary)"
    )
    print(
        f"payments         submitted {result.submitted}, decided {result.decided}, "
        f"undecided {result.undecided}, retried {result.retries} times (same request id)"
    )
    print(f"outcomes         confirmed {result.confirmed}, rejected {result.rejected}")
    rate = result.decided / result.load_s if result.load_s else 0.0
    print(f"throughput       {rate:.1f} decided/s over {result.load_s:.1f} s of faults and load")
    print(f"receipts checked {result.receipts_checked} against {settings.replicas} durable ledgers")
    print(f"lost receipts    {result.lost_receipts}")
    print(
        f"mismatches       {result.mismatches}; receipts failing verification {result.bad_receipts}"
    )
    print(f"longest stall    {result.longest_stall_s:.2f} s (round {result.longest_stall_round})")
    print(
        f"view changes     {result.views_installed} views installed, final view {result.final_view}"
    )
    positions = ", ".join(f"r{r} {s}" for r, s in sorted(result.replica_positions.items()))
    print(f"executed up to   {positions}")
    print(
        f"money conserved  {'yes' if result.conserved else 'NO'}; ledgers agree "
        f"{'yes' if result.digests_agree else 'NO'}"
    )
    print(f"wall time        {result.wall_s:.1f} s")
    print(f"verdict          {'ok' if result.ok else 'FAILED: ' + '; '.join(result.failures)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="where the cluster goes (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    arguments = parser.parse_args(argv)
    if arguments.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 4 <= arguments.replicas <= 64:
        parser.error("--replicas must be in 4..64")
    if not 1 <= arguments.clients <= 64:
        parser.error("--clients must be in 1..64")
    settings = SoakSettings(
        rounds=arguments.rounds,
        replicas=arguments.replicas,
        clients=arguments.clients,
        seed=arguments.seed,
    )
    if arguments.dir:
        root = Path(arguments.dir)
        if (root / "cluster.toml").exists():
            parser.error(f"{root} already holds a cluster: give a new directory")
    else:
        root = Path(tempfile.mkdtemp(prefix="pbft-soak-"))
    result = run_soak(settings, root, sys.stderr if sys.stderr.isatty() else None)
    print_result(settings, result, root)
    if not arguments.dir and not arguments.keep and result.ok:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
