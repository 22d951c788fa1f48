"""What `python -m runtime.attack` measures with: a local cluster of replica processes, the
honest client's closed loop, and the replicas' view changes, RSS and CPU from outside.

Everything here reads the replicas as an operator would: their JSON log lines (stderr,
kept in one file per replica) and /proc/PID (Linux).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from runtime.client import PaymentClient, PaymentTimeout
from runtime.cluster import Cluster, load_cluster, write_cluster
from runtime.commands import consecutive_free_ports, replica_command

HONEST_CLIENT = 0
ATTACKER_CLIENT = 1
FRESH_CLIENT = 2  # a new connection and one payment every PROBE_INTERVAL_S
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 5.0
PAYMENT_TIMEOUT_S = 30.0
GRACE_S = 5.0  # payments in flight when a phase ends may finish within this long
SAMPLE_INTERVAL_S = 0.1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-int(percent * len(ordered)) // 100))
    return ordered[min(len(ordered), rank) - 1]


def rss_kib(pid: int) -> int:
    """Resident set size now (VmRSS), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far (/proc/PID/stat, fields 14, 15)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # The command name (field 2) may hold spaces; fields after its ')' are plain.
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


class ClusterStartError(RuntimeError):
    """The local cluster did not come up."""


class LocalCluster:
    """n replica processes on free 127.0.0.1 ports in `root`, logs in replica-I.log."""

    def __init__(
        self,
        root: Path,
        replicas: int,
        accounts_per_client: int,
        protocol: dict[str, int] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = write_cluster(
            root,
            replicas=replicas,
            clients=3,
            base_port=consecutive_free_ports(replicas)[0],
            accounts_per_client=accounts_per_client,
            protocol=protocol,
        )
        self.cluster: Cluster = load_cluster(self.path)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def log_path(self, replica: int) -> Path:
        return self.root / f"replica-{replica}.log"

    def start(self, replica: int) -> None:
        with open(self.log_path(replica), "ab") as log:
            self.processes[replica] = subprocess.Popen(
                replica_command(self.path, replica), stdout=log, stderr=log
            )

    def start_all(self) -> None:
        for replica in range(len(self.cluster.replicas)):
            self.start(replica)

    def stop(self, replica: int) -> None:
        process = self.processes.pop(replica)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for replica in list(self.processes):
            self.stop(replica)

    def dead(self) -> dict[int, int]:
        """Replicas whose process has exited: id -> exit status."""
        return {
            replica: code
            for replica, process in self.processes.items()
            if (code := process.poll()) is not None
        }

    def events(self, replica: int) -> list[dict[str, object]]:
        try:
            lines = self.log_path(replica).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def count_events(self, kind: str, start: float, end: float) -> int:
        """Log records of `kind` (summed lines count their repeats) within [start, end]."""
        total = 0
        for replica in range(len(self.cluster.replicas)):
            for record in self.events(replica):
                stamp = record.get("time")
                if record.get("event") == kind and isinstance(stamp, int | float):
                    if start <= stamp <= end:
                        repeated = record.get("repeated", 0)
                        total += 1 + (repeated if isinstance(repeated, int) else 0)
        return total

    def current_view(self) -> int:
        view = 0
        for replica in range(len(self.cluster.replicas)):
            for record in self.events(replica):
                if record.get("event") == "new_view":
                    words = str(record.get("detail", "")).split()
                    if len(words) >= 2 and words[0] == "view" and words[1].isdigit():
                        view = max(view, int(words[1]))
        return view

    async def wait_listening(self, timeout_s: float = 30.0) -> None:
        """Return once every replica logged `listening`; ClusterStartError if one exits
        first (a port taken by someone else since free_ports chose it) or none in time."""
        with trio.move_on_after(timeout_s):
            while True:
                for replica, code in self.dead().items():
                    raise ClusterStartError(
                        f"replica {replica} exited with status {code} before listening "
                        f"(see {self.log_path(replica)})"
                    )
                listening = sum(
                    any(record.get("event") == "listening" for record in self.events(replica))
                    for replica in self.processes
                )
                if listening == len(self.processes):
                    return
                await trio.sleep(0.1)
        raise ClusterStartError(f"the replicas did not all listen within {timeout_s:g} s")


@dataclass
class Phase:
    """What one measuring window saw."""

    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    unfinished: int = 0  # still undecided a grace time after the window (counted at their age)
    view_changes: int = 0
    new_views: int = 0
    halts: int = 0
    rss_max_kib: int = 0
    cpu_s: float = 0.0
    dead: dict[int, int] = field(default_factory=dict)
    load_average: float = 0.0  # the machine's 1-minute load average when the phase ended
    # Fresh clients: each connects anew and pays once, within PROBE_TIMEOUT_S or not at all.
    fresh_tried: int = 0
    fresh_ok: int = 0

    @property
    def payments(self) -> int:
        return len(self.latencies_ms) - self.unfinished

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies_ms, 50) if self.latencies_ms else None

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies_ms, 99) if self.latencies_ms else None

    def as_json(self) -> dict[str, object]:
        return {
            "seconds": self.seconds,
            "payments": self.payments,
            "p50_ms": _round(self.p50),
            "p99_ms": _round(self.p99),
            "timeouts": self.timeouts,
            "unfinished": self.unfinished,
            "view_changes": self.view_changes,
            "new_views": self.new_views,
            "halts": self.halts,
            "rss_max_mib": round(self.rss_max_kib / 1024, 1),
            "cpu_s": round(self.cpu_s, 2),
            "dead_replicas": {str(k): v for k, v in self.dead.items()},
            "load_average": round(self.load_average, 2),
            "fresh_clients_tried": self.fresh_tried,
            "fresh_clients_paid": self.fresh_ok,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def measure(
    local: LocalCluster,
    client: PaymentClient,
    seconds: float,
    concurrency: int,
    grace_s: float = GRACE_S,
) -> Phase:
    """The honest client pays in a closed loop (`concurrency` payments at a time) for
    `seconds`, while the replicas' RSS is sampled; then view changes are read from the logs."""
    phase = Phase(seconds)
    pids = {replica: process.pid for replica, process in local.processes.items()}
    cpu_before = {replica: cpu_seconds(pid) for replica, pid in pids.items()}
    wall_start = time.time()
    deadline = trio.current_time() + seconds
    in_flight: dict[int, float] = {}
    owned = sorted(n for n, a in local.cluster.accounts.items() if a.owner == HONEST_CLIENT)
    others = sorted(n for n, a in local.cluster.accounts.items() if a.owner != HONEST_CLIENT)

    async def worker(index: int) -> None:
        payer, payee = owned[index % len(owned)], others[index % len(others)]
        while trio.current_time() < deadline:
            started = trio.current_time()
            in_flight[index] = started
            try:
                await client.pay(payer, payee, 1)
            except PaymentTimeout:
                phase.timeouts += 1
            in_flight.pop(index, None)
            phase.latencies_ms.append((trio.current_time() - started) * 1000)

    async def sample() -> None:
        while True:
            rss = max((rss_kib(pid) for pid in pids.values()), default=0)
            phase.rss_max_kib = max(phase.rss_max_kib, rss)
            await trio.sleep(SAMPLE_INTERVAL_S)

    async def fresh_client() -> None:
        # Counted once it paid or ran out of time, not when the phase cuts it short.
        with trio.move_on_after(PROBE_TIMEOUT_S):
            async with PaymentClient(
                local.cluster, FRESH_CLIENT, timeout_s=2 * PROBE_TIMEOUT_S
            ) as new:
                # n - f connections will do: one replica may be down (catch-up amplification).
                await new.wait_connected(quorum_of_live, timeout_s=2 * PROBE_TIMEOUT_S)
                await new.pay(fresh_owned[0], fresh_owned[-1], 1)
                phase.fresh_ok += 1
        phase.fresh_tried += 1

    async def probe() -> None:
        # One at a time: two connections of one client would replace each other.
        while trio.current_time() < deadline:
            started = trio.current_time()
            await fresh_client()
            await trio.sleep_until(started + PROBE_INTERVAL_S)

    quorum_of_live = len(local.cluster.replicas) - local.cluster.config.fault_tolerance
    fresh_owned = sorted(n for n, a in local.cluster.accounts.items() if a.owner == FRESH_CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        nursery.start_soon(probe)
        async with trio.open_nursery() as workers:
            for index in range(concurrency):
                workers.start_soon(worker, index)
            await trio.sleep_until(deadline)
            phase.cpu_s = sum(cpu_seconds(pid) - cpu_before[r] for r, pid in pids.items())
            with trio.move_on_after(grace_s):
                while in_flight:
                    await trio.sleep(0.01)
            now = trio.current_time()
            for started in in_flight.values():
                phase.latencies_ms.append((now - started) * 1000)
                phase.unfinished += 1
            workers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    wall_end = time.time()  # the grace too: a view change the attack caused may come late
    await trio.sleep(0.3)  # let the replicas' log lines of the window reach their files
    phase.view_changes = local.count_events("view_change", wall_start, wall_end)
    phase.new_views = local.count_events("new_view", wall_start, wall_end)
    phase.halts = local.count_events("halted", wall_start, wall_end)
    phase.dead = local.dead()
    phase.load_average = os.getloadavg()[0]
    return phase
