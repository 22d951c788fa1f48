"""The simulator's cost per request with the ledger's operations mixed in, against a
transfer-only workload measured in the same run.

    python -m sim.ops_cost [SCENARIO] [--payments N] [--repeat R] [--mix op=w,op=w...]

Runs SCENARIO (default scenarios/ops-mix.toml) twice over per repeat, interleaved so both
see the same machine load: once with its workload's mix (or --mix), once with transfers
only; same seed, same number of requests, same cluster and network. Prints the median
wall and CPU time of each, CPU time per request, and the ratios. Figures only; nothing
here asserts a speed. A mixed run submits as many requests, but refused ones
(hold_not_found, exceeds_hold...) cost the replicas as much to order as confirmed ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time

from sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from sim.scenario.writing import to_toml
from sim.simulator import Simulation, SimulationResult
from sim.workload import TRANSFER_ONLY


def _run(scenario: Scenario) -> tuple[float, float, SimulationResult]:
    """Wall and CPU seconds of one run (CPU time is what a loaded machine distorts least:
    the simulator is one thread)."""
    simulation = Simulation(scenario)
    started, started_cpu = time.perf_counter(), time.process_time()
    result = simulation.run()
    return time.perf_counter() - started, time.process_time() - started_cpu, result


def _mix_of(text: str) -> tuple[tuple[str, float], ...]:
    """`op=w,op=w`, checked by the scenario loader's own rules (one error line if wrong)."""
    table: dict[str, float] = {}
    for item in text.split(","):
        op, _, weight = item.partition("=")
        try:
            table[op.strip()] = float(weight)
        except ValueError:
            raise ScenarioError("--mix", op.strip(), f"expected a number, got {weight!r}") from None
        if not math.isfinite(table[op.strip()]):
            raise ScenarioError("--mix", op.strip(), f"must be finite, got {weight!r}")
    document = to_toml({"name": "mix", "workload": {"mix": table}})
    return parse_scenario(document, "--mix").workload.mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.ops_cost")
    parser.add_argument("scenario", nargs="?", default="scenarios/ops-mix.toml")
    parser.add_argument("--payments", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mix", default="", help="op=weight,... (default: the scenario's)")
    arguments = parser.parse_args(argv)
    if arguments.payments < 1 or arguments.repeat < 1:
        print("ops_cost: --payments and --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(arguments.scenario)
        mix = _mix_of(arguments.mix) if arguments.mix else scenario.workload.mix
    except ScenarioError as error:
        print(f"ops_cost: {error}", file=sys.stderr)
        return 2
    workload = dataclasses.replace(scenario.workload, payments=arguments.payments, mix=mix)
    mixed = dataclasses.replace(scenario, workload=workload)
    plain = dataclasses.replace(scenario, workload=dataclasses.replace(workload, mix=TRANSFER_ONLY))
    walls: dict[str, list[float]] = {"transfers": [], "mixed": []}
    cpus: dict[str, list[float]] = {"transfers": [], "mixed": []}
    results: dict[str, SimulationResult] = {}
    for _ in range(arguments.repeat):
        for label, run in (("transfers", plain), ("mixed", mixed)):
            wall, cpu, results[label] = _run(run)
            walls[label].append(wall)
            cpus[label].append(cpu)
            if results[label].verdict != "ok":
                failures = results[label].expectation_failures
                print(f"ops_cost: the {label} run did not meet its expectations: {failures}")
                return 1
    print(
        f"scenario   {scenario.name} ({arguments.payments} requests, n = "
        f"{scenario.cluster.replicas}, seed {scenario.seed}, median of {arguments.repeat})"
    )
    print(f"mix        {', '.join(f'{op} {weight:g}' for op, weight in mix)}")
    wall = {label: statistics.median(times) for label, times in walls.items()}
    cpu = {label: statistics.median(times) for label, times in cpus.items()}
    for label in ("transfers", "mixed"):
        result = results[label]
        print(
            f"{label:<10} {wall[label]:.2f} s wall, {cpu[label]:.2f} s CPU, "
            f"{cpu[label] / arguments.payments * 1e6:.0f} us CPU per request, "
            f"{result.confirmed} confirmed, {sum(result.rejected.values())} refused, "
            f"{result.messages_sent} messages, p50 {result.latency_ms['p50']} ms simulated"
        )
    print(
        f"ratio      mixed / transfers {wall['mixed'] / wall['transfers']:.2f}x wall, "
        f"{cpu['mixed'] / cpu['transfers']:.2f}x CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
