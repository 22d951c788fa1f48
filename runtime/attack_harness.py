"""What `python -m runtime.attack` measures with: the honest client's closed loop against a
local cluster of replica processes (runtime/localcluster.py), and the replicas' view
changes, RSS and CPU read from outside, as an operator would (their JSON log lines and
/proc/PID, Linux).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import trio

from pbft.stats import nearest_rank
from runtime.client import PaymentClient, PaymentTimeout
from runtime.localcluster import LocalCluster, cpu_seconds, rss_kib

HONEST_CLIENT = 0
ATTACKER_CLIENT = 1
FRESH_CLIENT = 2  # a new connection and one payment every PROBE_INTERVAL_S
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 5.0
PAYMENT_TIMEOUT_S = 30.0
GRACE_S = 5.0  # payments in flight when a phase ends may finish within this long
SAMPLE_INTERVAL_S = 0.1


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
        return nearest_rank(self.latencies_ms, 50) if self.latencies_ms else None

    @property
    def p99(self) -> float | None:
        return nearest_rank(self.latencies_ms, 99) if self.latencies_ms else None

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
    phase.dead = local.exited()
    phase.load_average = os.getloadavg()[0]
    return phase
