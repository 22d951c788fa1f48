"""What the CPU model predicts for a cluster: lone-payment latency and throughput against
offered load, to set beside `pbft bench`'s measured figures.

    python -m sim.cpu_bench --cpu calibration.toml [--replicas 4] [--rate R ...]

A lone payment: one client, payments far apart (no queueing). Load: open-loop payments at
each offered rate from 16 clients; throughput is the payments decided while load is offered
over that time, so once the busiest core is saturated it stops growing however much more
is offered, while latency keeps growing with the queue. The network is a LAN's
(0.05-0.2 ms, as between processes on one host); timeouts are 2 s, so short overload shows as
queueing rather than as view changes. Simulated figures; nothing here times anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from pbft.stats import nearest_rank
from sim.scenario import CpuSpec, ScenarioError, parse_scenario
from sim.simulator import Simulation

DEFAULT_RATES = (100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)

_SCENARIO = """
name = "cpu-bench"
seed = {seed}
[cluster]
replicas = {replicas}
view_change_timeout_ms = 2000
heartbeat_interval_ms = 50
client_timeout_ms = 2000
[cluster.cpu]
sign_us = {sign_us}
verify_us = {verify_us}
per_message_us = {per_message_us}
fsync_us = {fsync_us}
per_request_us = {per_request_us}
cores = {cores}
[network]
latency_ms = {{ dist = "uniform", min = 0.05, max = 0.2 }}
[workload]
clients = {clients}
payments = {payments}
rate_per_s = {rate}
overdraw = 0.0
"""


@dataclass(frozen=True)
class LoadPoint:
    offered_per_s: float
    throughput_per_s: float
    p50_ms: float
    p99_ms: float
    decided: int
    # Busy time per decided payment, replicas and clients apart (as pbft bench's cpu ms/pay
    # counts the replica processes from /proc; with fsync_us, storage waits are in it too).
    replica_cpu_ms: float = 0.0
    client_cpu_ms: float = 0.0


def run_load(
    cpu: CpuSpec,
    *,
    replicas: int = 4,
    rate: float,
    payments: int,
    clients: int = 16,
    seed: int = 1,
) -> LoadPoint:
    scenario = parse_scenario(
        _SCENARIO.format(
            seed=seed,
            replicas=replicas,
            sign_us=cpu.sign_us,
            verify_us=cpu.verify_us,
            per_message_us=cpu.per_message_us,
            fsync_us=cpu.fsync_us,
            per_request_us=cpu.per_request_us,
            cores=cpu.cores,
            clients=clients,
            payments=payments,
            rate=rate,
        )
    )
    simulation = Simulation(scenario)
    simulation.run()
    decided = simulation.decided_at_us
    submitted = simulation.submitted_at_us
    latencies = sorted(decided[identity] - submitted[identity] for identity in decided)
    if not latencies:
        return LoadPoint(rate, 0.0, 0.0, 0.0, 0)
    cores = simulation.cores or {}
    replica_us = sum(core.busy_us for name, core in cores.items() if name[0] == "replica")
    client_us = sum(core.busy_us for name, core in cores.items() if name[0] == "client")
    # Decisions while load is offered, over that time: past saturation the backlog left at
    # the end (and any request a full queue refused, decided only after a retry) does not
    # count, so this is what the cluster sustains, not the offered rate.
    first_us = min(submitted.values())
    last_us = max(submitted.values())
    if last_us > first_us:
        within = sum(1 for at_us in decided.values() if at_us <= last_us)
        throughput = within / ((last_us - first_us) / 1e6)
    else:
        throughput = 0.0
    return LoadPoint(
        offered_per_s=rate,
        throughput_per_s=throughput,
        p50_ms=nearest_rank(latencies, 50) / 1000,
        p99_ms=nearest_rank(latencies, 99) / 1000,
        decided=len(latencies),
        replica_cpu_ms=replica_us / len(latencies) / 1000,
        client_cpu_ms=client_us / len(latencies) / 1000,
    )


def lone_latency_ms(cpu: CpuSpec, replicas: int = 4, payments: int = 20) -> float:
    """Median latency of payments from one client, 100 ms apart (nothing queues)."""
    return run_load(cpu, replicas=replicas, rate=10.0, payments=payments, clients=1).p50_ms


def load_curve(
    cpu: CpuSpec,
    rates: tuple[float, ...] = DEFAULT_RATES,
    *,
    replicas: int = 4,
    seconds: float = 1.0,
) -> list[LoadPoint]:
    return [
        run_load(cpu, replicas=replicas, rate=rate, payments=max(20, int(rate * seconds)))
        for rate in rates
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.cpu_bench", description=__doc__)
    parser.add_argument("--cpu", required=True, help="a calibration file (pbft calibrate)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rate", type=float, action="append", help="offered payments/s")
    parser.add_argument("--seconds", type=float, default=1.0, help="offered load's length")
    parser.add_argument(
        "--cores", type=int, help="the nodes share this many cores (as in pbft bench)"
    )
    arguments = parser.parse_args(argv)
    try:
        probe = parse_scenario(f"name = 'probe'\n[cluster]\ncpu = {arguments.cpu!r}\n")
    except ScenarioError as error:
        print(f"python -m sim.cpu_bench: {error}", file=sys.stderr)
        return 2
    cpu = probe.cluster.cpu
    assert cpu is not None
    if arguments.cores is not None:
        cpu = dataclasses.replace(cpu, cores=arguments.cores)
    cores = f"{cpu.cores} shared cores" if cpu.cores else "a core per node"
    print(
        f"model: sign {cpu.sign_us} us, verify {cpu.verify_us} us, "
        f"per message {cpu.per_message_us} us, per request {cpu.per_request_us} us, "
        f"fsync {cpu.fsync_us} us, {cores}; "
        f"n = {arguments.replicas}"
    )
    print(f"lone payment p50 {lone_latency_ms(cpu, arguments.replicas):.2f} ms")
    print(
        f"{'offered/s':>10} {'payments/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'replica cpu ms/pay':>19} {'client cpu ms/pay':>18}"
    )
    rates = tuple(arguments.rate) if arguments.rate else DEFAULT_RATES
    for point in load_curve(cpu, rates, replicas=arguments.replicas, seconds=arguments.seconds):
        print(
            f"{point.offered_per_s:>10.0f} {point.throughput_per_s:>11.1f} "
            f"{point.p50_ms:>8.2f} {point.p99_ms:>8.2f} "
            f"{point.replica_cpu_ms:>19.3f} {point.client_cpu_ms:>18.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
