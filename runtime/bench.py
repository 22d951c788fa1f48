"""`pbft bench`: a local cluster of replica processes measured against its crypto ceiling.

For each replica count n in turn: the Ed25519 ceiling measured on this machine now, then a
fresh cluster of n `pbft replica` processes on 127.0.0.1 (runtime.localcluster), then
- a lone payment: one client, one payment outstanding (latency with no queueing);
- closed-loop load: `clients` x `concurrency` tasks that each pay, wait for the decision
  and pay again (throughput, latency);
- with a rate, open-loop load: payments sent at fixed times, `rate` a second whatever the
  cluster does, latency measured from each one's scheduled send time, so queueing shows.

The ceiling. The work nobody can avoid per payment is cryptographic: the client signs the
request once and each of the n replicas verifies it once. With `sign_s` and `verify_s`
timed here (cryptography's Ed25519, one core) and `cores` the CPUs this process may run
on (os.sched_getaffinity), spread perfectly over them:

    ceiling_per_s = cores / (sign_s + n * verify_s)

Everything else (MACs, hashing, replies and votes, Python) is overhead against it. The
clients run in this process and every replica is a process, so they all share the same
cores; the ceiling is for the whole machine, not per replica.

Counters come from the replicas themselves: on SIGUSR1 each logs a `statistics` line
(fsyncs, frames in and out; runtime/node.py), read before and after each phase; CPU
seconds come from /proc. Figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pbft.genesis import account_name
from pbft.ledger import MAX_GENERATED_ACCOUNTS, MAX_TOTAL, GeneratedAccounts
from pbft.stats import nearest_rank
from runtime.client import PaymentClient, PaymentTimeout
from runtime.localcluster import LocalCluster, cpu_seconds

DEFAULT_REPLICAS = (4, 7, 10)
MAX_BENCH_REPLICAS = 64  # every replica is a process on this machine
MAX_BENCH_CLIENTS = 256
BENCH_BALANCE = 100_000  # each genesis account's balance
MAX_CONCURRENCY = 1024
MAX_RATE_PER_S = 100_000.0
MAX_SECONDS = 3600.0
# An open-loop run that falls this far behind stops sending (and says how many it skipped)
# rather than pile up tasks without end.
MAX_OPEN_OUTSTANDING = 20_000
CLIENT_TIMEOUT_S = 30.0
STATISTICS_TIMEOUT_S = 10.0

Progress = Callable[[str], None]


class BenchError(RuntimeError):
    """The cluster did not come up or did not answer; the message says which replica."""


@dataclass(frozen=True)
class BenchSettings:
    replicas: tuple[int, ...] = DEFAULT_REPLICAS
    clients: int = 4
    concurrency: int = 8
    rate: float | None = None
    seconds: float = 5.0
    # The genesis as a count (a [genesis] rule in the cluster file, pbft.ledger.
    # GeneratedAccounts); None: two listed accounts per client.
    accounts: int | None = None


def settings_problem(settings: BenchSettings) -> str | None:
    """What is wrong with `settings`, one line naming the option, or None."""
    for n in settings.replicas:
        if not 4 <= n <= MAX_BENCH_REPLICAS:
            return (
                f"--replicas: {n} is not in 4..{MAX_BENCH_REPLICAS} (n = 3f + 1 replicas "
                "tolerate f faulty ones, the least is 4; each is a process on this machine)"
            )
    if not 1 <= settings.clients <= MAX_BENCH_CLIENTS:
        return f"--clients: {settings.clients} is not in 1..{MAX_BENCH_CLIENTS}"
    if not 1 <= settings.concurrency <= MAX_CONCURRENCY:
        return f"--concurrency: {settings.concurrency} is not in 1..{MAX_CONCURRENCY}"
    if not 0 < settings.seconds <= MAX_SECONDS:  # also false for NaN
        return f"--seconds: {settings.seconds:g} is not in (0, {MAX_SECONDS:g}]"
    if settings.rate is not None and not 0 < settings.rate <= MAX_RATE_PER_S:
        return f"--rate: {settings.rate:g} payments/s is not in (0, {MAX_RATE_PER_S:g}]"
    if settings.accounts is not None:
        # Each client pays from accounts of its own: at least two each.
        least = 2 * settings.clients
        if not least <= settings.accounts <= MAX_GENERATED_ACCOUNTS:
            return (
                f"--accounts: {settings.accounts} is not in {least}..{MAX_GENERATED_ACCOUNTS:,} "
                "(at least two for each client)"
            )
        if settings.accounts * BENCH_BALANCE > MAX_TOTAL:
            return f"--accounts: {settings.accounts} accounts hold more than {MAX_TOTAL} in all"
    return None


# --- the ceiling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ceiling:
    sign_us: float
    verify_us: float
    cores: int

    def per_s(self, replicas: int) -> float:
        """Payments a second if the machine did nothing but sign once and verify n times."""
        return self.cores / ((self.sign_us + replicas * self.verify_us) / 1e6)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def measure_ceiling(seconds: float = 0.25) -> Ceiling:
    """Time Ed25519 sign and verify (cryptography) on one core, `seconds` each, on a message
    the size of a payment request."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    message = bytes(range(160))

    def per_call_us(call: Callable[[], object]) -> float:
        count = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(50):
                call()
            count += 50
        return elapsed / count * 1e6

    signature = key.sign(message)
    return Ceiling(
        per_call_us(lambda: key.sign(message)),
        per_call_us(lambda: public.verify(signature, message)),
        usable_cores(),
    )


# --- one phase -----------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase measured. Latencies of decided payments (confirmed or rejected)."""

    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    rejected: int = 0
    timeouts: int = 0
    skipped: int = 0  # open loop: sends not made, too far behind
    unfinished: int = 0  # open loop: sent, undecided when the drain ended
    replica_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)  # summed over replicas

    @property
    def payments(self) -> int:
        return len(self.latencies_ms)

    def per_payment(self, value: float) -> float:
        return value / self.payments if self.payments else 0.0

    def percentile(self, percent: float) -> float:
        return float(nearest_rank(self.latencies_ms, percent)) if self.latencies_ms else 0.0


def _pair(client: PaymentClient, index: int) -> tuple[str, str]:
    """A payer the client owns and a payee of the next client. Listed genesis: write_cluster
    gives client c accounts 2c and 2c + 1. Generated: account i belongs to client
    i mod clients, and the task's accounts are spread over the whole ledger."""
    clients = len(client.cluster.client_keys)
    genesis = client.cluster.accounts
    if isinstance(genesis, GeneratedAccounts):
        rounds = genesis.count // clients  # accounts each client owns, at least 2
        spread = (index * _SPREAD_STEP) % rounds
        payer = genesis.name(client.client_id + clients * spread)
        payee = (client.client_id + 1) % clients + clients * ((spread + rounds // 2) % rounds)
        return payer, genesis.name(payee)
    payer = account_name(2 * client.client_id + index % 2)
    return payer, account_name((2 * client.client_id + 2) % (2 * clients))


# A large prime: tasks' accounts land far apart in a large generated ledger.
_SPREAD_STEP = 1_000_003


async def _pay(
    client: PaymentClient,
    payer: str,
    payee: str,
    since: float,
    phase: Phase,
    until: float = math.inf,
) -> None:
    """One payment; counted if decided by `until`."""
    try:
        decided = await client.pay(payer, payee, 1)
    except PaymentTimeout:
        phase.timeouts += 1
        return
    now = trio.current_time()
    if now <= until:
        phase.latencies_ms.append((now - since) * 1000)
        if decided.outcome != "confirmed":
            phase.rejected += 1


async def _closed_loop(clients: list[PaymentClient], concurrency: int, phase: Phase) -> None:
    deadline = trio.current_time() + phase.seconds

    async def worker(client: PaymentClient, index: int) -> None:
        payer, payee = _pair(client, index)
        while trio.current_time() < deadline:
            await _pay(client, payer, payee, trio.current_time(), phase, deadline)

    # Payments still in flight at the deadline finish, uncounted, rather than be cancelled:
    # a cancelled `pay` frees the client's slot while its request is still in flight.
    async with trio.open_nursery() as nursery:
        for client in clients:
            for index in range(concurrency):
                nursery.start_soon(worker, client, index)


async def _open_loop(clients: list[PaymentClient], rate: float, phase: Phase) -> None:
    start = trio.current_time()
    end = start + phase.seconds
    outstanding = 0

    async def one(client: PaymentClient, index: int, scheduled: float) -> None:
        nonlocal outstanding
        try:
            payer, payee = _pair(client, index)
            await _pay(client, payer, payee, scheduled, phase)
        finally:
            outstanding -= 1

    async with trio.open_nursery() as nursery:
        sent = 0
        while (scheduled := start + sent / rate) < end:
            await trio.sleep_until(scheduled)
            # Every send already due goes now: a late loop catches up rather than lowering
            # the offered rate, and each payment's latency counts from its own time.
            while (scheduled := start + sent / rate) <= trio.current_time() and scheduled < end:
                if outstanding >= MAX_OPEN_OUTSTANDING:
                    phase.skipped += 1
                else:
                    outstanding += 1
                    client = clients[sent % len(clients)]
                    nursery.start_soon(one, client, sent // len(clients), scheduled)
                sent += 1
        # Let what was sent finish, for as long as the phase ran, then count the rest.
        with trio.move_on_after(min(phase.seconds, CLIENT_TIMEOUT_S)):
            while outstanding:
                await trio.sleep(0.01)
        phase.unfinished = outstanding
        nursery.cancel_scope.cancel()


# --- a cluster -----------------------------------------------------------------------------------


class _Replicas:
    """The counters and CPU of a LocalCluster's replica processes, read between phases."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def cpu_s(self) -> float:
        return sum(cpu_seconds(self.cluster.pid(replica)) for replica in self.cluster.processes)

    async def counters(self) -> dict[str, int]:
        """Ask every replica for a `statistics` line (SIGUSR1) and sum the new ones."""
        before = {replica: self._lines(replica) for replica in self.cluster.processes}
        for replica in self.cluster.processes:
            os.kill(self.cluster.pid(replica), signal.SIGUSR1)
        totals: dict[str, int] = {}
        with trio.move_on_after(STATISTICS_TIMEOUT_S):
            for replica, seen in before.items():
                while len(lines := self._lines(replica)) <= len(seen):
                    if (code := self.cluster.exited().get(replica)) is not None:
                        raise BenchError(self.cluster.exit_report(replica, code))
                    await trio.sleep(0.02)
                for key, value in lines[-1].items():
                    if isinstance(value, int) and key not in ("replica", "time"):
                        totals[key] = totals.get(key, 0) + value
            return totals
        raise BenchError(
            f"the replicas did not log their statistics within {STATISTICS_TIMEOUT_S:g} s"
        )

    def _lines(self, replica: int) -> list[dict[str, object]]:
        return [r for r in self.cluster.events(replica) if r.get("event") == "statistics"]


async def _measure(
    replicas: _Replicas,
    phase: Phase,
    run: Callable[[Phase], Awaitable[None]],
    progress: Progress | None,
    label: str,
) -> Phase:
    before = await replicas.counters()
    cpu, client_cpu = replicas.cpu_s(), time.process_time()
    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(_tick, progress, label, phase.seconds)
        await run(phase)
        nursery.cancel_scope.cancel()
    phase.replica_cpu_s = replicas.cpu_s() - cpu
    phase.client_cpu_s = time.process_time() - client_cpu
    after = await replicas.counters()
    phase.counters = {key: after[key] - before.get(key, 0) for key in after}
    return phase


async def _tick(progress: Progress, label: str, seconds: float) -> None:
    started = trio.current_time()
    while (elapsed := trio.current_time() - started) < seconds:
        progress(f"{label}: {elapsed:4.1f} / {seconds:g} s")
        await trio.sleep(0.5)
    progress(f"{label}: waiting for the payments still in flight")


async def _bench_cluster(
    cluster: LocalCluster,
    settings: BenchSettings,
    progress: Progress | None,
    label: str,
    started: float,
) -> tuple[Phase, Phase, Phase | None, float]:
    if progress is not None:
        progress(f"{label}: starting the replicas")
    # Each replica builds a generated genesis's Merkle tree before it listens (a few
    # seconds a million accounts, longer with every replica on the same two cores).
    await cluster.wait_listening(timeout_s=30.0 + (settings.accounts or 0) / 10_000)
    replicas = _Replicas(cluster)
    loaded = cluster.cluster
    async with trio.open_nursery() as nursery:
        clients = []
        for client_id in range(settings.clients):
            client = PaymentClient(loaded, client_id, timeout_s=CLIENT_TIMEOUT_S)
            await nursery.start(_serve_client, client)
            clients.append(client)
        # A first payment warms every connection and the replicas' caches; not counted.
        await _pay(clients[0], *_pair(clients[0], 0), trio.current_time(), Phase(0))
        # From process start to that first decision: every replica has built its genesis
        # (a generated genesis's Merkle tree included).
        start_s = time.perf_counter() - started
        lone = await _measure(
            replicas,
            Phase(settings.seconds),
            lambda phase: _closed_loop(clients[:1], 1, phase),
            progress,
            f"{label}: lone payment",
        )
        closed = await _measure(
            replicas,
            Phase(settings.seconds),
            lambda phase: _closed_loop(clients, settings.concurrency, phase),
            progress,
            f"{label}: closed loop",
        )
        opened = None
        if settings.rate is not None:
            rate = settings.rate
            opened = await _measure(
                replicas,
                Phase(settings.seconds),
                lambda phase: _open_loop(clients, rate, phase),
                progress,
                f"{label}: open loop at {rate:g}/s",
            )
        nursery.cancel_scope.cancel()
    return lone, closed, opened, start_s


async def _serve_client(
    client: PaymentClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with client:
        await client.wait_connected()
        task_status.started()
        await trio.sleep_forever()


def bench_replicas(
    replicas: int, settings: BenchSettings, root: Path, progress: Progress | None = None
) -> dict[str, object]:
    """One replica count: the ceiling, a fresh cluster in `root`, every phase; the figures."""
    label = f"n = {replicas}"
    if progress is not None:
        progress(f"{label}: timing Ed25519")
    ceiling = measure_ceiling()
    cluster = LocalCluster.create(
        root,
        replicas=replicas,
        clients=settings.clients,
        initial_balance=BENCH_BALANCE,
        generated_accounts=settings.accounts,
    )
    started = time.perf_counter()
    cluster.start_all()
    try:
        lone, closed, opened, start_s = trio.run(
            _bench_cluster, cluster, settings, progress, label, started
        )
        # Views installed while measuring: a cluster that falls behind may take its slow
        # primary for a faulty one, and every view change costs throughput.
        view = cluster.current_view()
    finally:
        problems = cluster.stop_all()
    if problems:
        raise BenchError("; ".join(problems))
    throughput = closed.payments / closed.seconds
    ceiling_per_s = ceiling.per_s(replicas)
    figures: dict[str, object] = {
        "replicas": replicas,
        "accounts": len(cluster.cluster.accounts),
        "start_s": round(start_s, 3),
        "cores": ceiling.cores,
        "sign_us": round(ceiling.sign_us, 2),
        "verify_us": round(ceiling.verify_us, 2),
        "ceiling_per_s": round(ceiling_per_s, 1),
        "throughput_per_s": round(throughput, 1),
        "ratio_to_ceiling": round(throughput / ceiling_per_s, 6),
        "lone_payments": lone.payments,
        "lone_p50_ms": round(lone.percentile(50), 3),
        "lone_p99_ms": round(lone.percentile(99), 3),
        "load_payments": closed.payments,
        "load_clients": settings.clients,
        "load_concurrency": settings.concurrency,
        "load_p50_ms": round(closed.percentile(50), 3),
        "load_p99_ms": round(closed.percentile(99), 3),
        "load_p999_ms": round(closed.percentile(99.9), 3),
        "load_rejected": closed.rejected,
        "load_timeouts": closed.timeouts,
        "cpu_s_per_payment": round(closed.per_payment(closed.replica_cpu_s), 6),
        "client_cpu_s_per_payment": round(closed.per_payment(closed.client_cpu_s), 6),
        "fsyncs_per_payment": round(closed.per_payment(closed.counters.get("fsyncs", 0)), 3),
        "messages_per_payment": round(closed.per_payment(closed.counters.get("frames_out", 0)), 3),
        "lone_fsyncs_per_payment": round(lone.per_payment(lone.counters.get("fsyncs", 0)), 3),
        "lone_messages_per_payment": round(lone.per_payment(lone.counters.get("frames_out", 0)), 3),
        "view_at_end": view,
        "open_loop": None,
    }
    if opened is not None:
        figures["open_loop"] = {
            "offered_per_s": settings.rate,
            "decided_per_s": round(opened.payments / opened.seconds, 1),
            "payments": opened.payments,
            "p50_ms": round(opened.percentile(50), 3),
            "p99_ms": round(opened.percentile(99), 3),
            "p999_ms": round(opened.percentile(99.9), 3),
            "rejected": opened.rejected,
            "timeouts": opened.timeouts,
            "skipped": opened.skipped,
            "unfinished": opened.unfinished,
            "cpu_s_per_payment": round(opened.per_payment(opened.replica_cpu_s), 6),
            "fsyncs_per_payment": round(opened.per_payment(opened.counters.get("fsyncs", 0)), 3),
            "messages_per_payment": round(
                opened.per_payment(opened.counters.get("frames_out", 0)), 3
            ),
        }
    return figures


def run_bench(settings: BenchSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Every replica count in turn, each on a fresh cluster in a temporary directory."""
    runs = []
    load = os.getloadavg()
    for replicas in settings.replicas:
        with tempfile.TemporaryDirectory(prefix=f"pbft-bench-{replicas}-") as root:
            runs.append(bench_replicas(replicas, settings, Path(root), progress))
    return {
        "settings": asdict(settings) | {"replicas": list(settings.replicas)},
        "cores": usable_cores(),
        "load_average_at_start": [round(value, 2) for value in load],
        "ceiling_formula": "cores / (sign_s + n * verify_s)",
        "runs": runs,
    }


def format_report(result: dict[str, Any]) -> str:
    """The figures of run_bench as a table, with what they mean."""
    runs, settings = result["runs"], result["settings"]
    load = result["load_average_at_start"]
    lines = [
        f"{result['cores']} cores (os.sched_getaffinity), shared by every replica process and "
        f"the clients; load average at start {' '.join(str(v) for v in load)}",
        "ceiling = cores / (sign + n x verify): the client signs each payment once, each "
        "replica verifies it once (Ed25519, timed now)",
        f"lone: 1 client, 1 payment outstanding; load: closed loop, {settings['clients']} "
        f"clients x {settings['concurrency']} tasks; {settings['seconds']:g} s each",
        *(
            f"n = {run['replicas']}: {run['accounts']:,} genesis accounts; replicas started and "
            f"the first payment decided in {run['start_s']:.1f} s (genesis built once, not timed "
            "below)"
            for run in runs
        ),
        "",
        f"{'n':>3} {'ceiling/s':>10} {'payments/s':>11} {'ratio':>6} {'lone p50':>9} "
        f"{'lone p99':>9} {'p50':>7} {'p99':>7} {'p99.9':>7} {'cpu ms/pay':>10} "
        f"{'msgs/pay':>9} {'fsyncs/pay':>10}",
    ]
    for run in runs:
        lines.append(
            f"{run['replicas']:>3} {run['ceiling_per_s']:>10.0f} {run['throughput_per_s']:>11.1f} "
            f"{run['ratio_to_ceiling']:>6.1%} {run['lone_p50_ms']:>9.1f} "
            f"{run['lone_p99_ms']:>9.1f} "
            f"{run['load_p50_ms']:>7.1f} {run['load_p99_ms']:>7.1f} {run['load_p999_ms']:>7.1f} "
            f"{run['cpu_s_per_payment'] * 1000:>10.2f} {run['messages_per_payment']:>9.1f} "
            f"{run['fsyncs_per_payment']:>10.2f}"
        )
    lines.append(
        "latencies in ms; cpu: the replica processes' CPU (/proc) per payment; msgs: frames "
        "the replicas sent; fsyncs: the replicas' durable stores"
    )
    for run in runs:
        trouble = [
            f"{run[key]} {word}"
            for key, word in (
                ("load_rejected", "closed-loop payments rejected"),
                ("load_timeouts", "closed-loop payments timed out"),
            )
            if run[key]
        ]
        if run["view_at_end"]:
            trouble.append(f"the cluster ended in view {run['view_at_end']} (view changes)")
        if trouble:
            lines.append(f"n = {run['replicas']}: {', '.join(trouble)}")
        opened = run["open_loop"]
        if opened:
            latency = (
                f"from the scheduled send: p50 {opened['p50_ms']:.1f} ms, p99 "
                f"{opened['p99_ms']:.1f} ms, p99.9 {opened['p999_ms']:.1f} ms"
                if opened["payments"]
                else "no payment decided in time"
            )
            lines.append(
                f"n = {run['replicas']}: open loop offered {opened['offered_per_s']:g}/s, decided "
                f"{opened['decided_per_s']:.1f}/s, {latency}; {opened['timeouts']} timed out, "
                f"{opened['skipped']} not sent (too far behind), {opened['unfinished']} undecided"
            )
    return "\n".join(lines)
