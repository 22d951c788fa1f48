"""How fast the simulator runs a scenario, with a baseline measured in the same run.

    python -m sim.bench [SCENARIO] [--payments N] [--repeat R]

Prints the wall time of the run (median of R), payments per wall second, and the
time the same run would spend on Ed25519 verifications alone, measured on this
machine a moment earlier: the ratio says how much the simulator and protocol add on
top of the unavoidable cryptography. Figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from crypto.keys import SigningKey
from sim.scenario import ScenarioError, load_scenario
from sim.simulator import Simulation

VERIFY_SAMPLES = 2000


def verify_cost_us() -> float:
    """Median cost of one Ed25519 verification of a 200-byte message, in microseconds."""
    key = SigningKey.derive(0, "bench")
    payload = bytes(200)
    signature = key.sign(b"bench", payload)
    verify_key = key.verify_key
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(VERIFY_SAMPLES // 5):
            verify_key.verify(b"bench", payload, signature)
        timings.append((time.perf_counter() - started) / (VERIFY_SAMPLES // 5))
    return statistics.median(timings) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.bench")
    parser.add_argument("scenario", nargs="?", default="scenarios/fault-free.toml")
    parser.add_argument("--payments", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args(argv)
    try:
        scenario = load_scenario(arguments.scenario)
    except ScenarioError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    workload = dataclasses.replace(scenario.workload, payments=arguments.payments)
    scenario = dataclasses.replace(scenario, workload=workload)
    verify_us = verify_cost_us()
    walls = []
    verifications = 0
    for _ in range(arguments.repeat):
        simulation = Simulation(scenario)
        started = time.perf_counter()
        result = simulation.run()
        walls.append(time.perf_counter() - started)
        verifications = simulation.signature_cache.statistics().misses
        if result.verdict != "ok":
            print(f"bench: the run did not meet its expectations: {result.expectation_failures}")
            return 1
    wall_s = statistics.median(walls)
    floor_s = verifications * verify_us / 1e6
    decided = result.submitted - result.undecided
    print(
        f"scenario                 {scenario.name} ({arguments.payments} payments, n = "
        f"{scenario.cluster.replicas}, seed {scenario.seed})"
    )
    print(
        f"wall time                {wall_s:.2f} s  (median of {arguments.repeat}: "
        f"{', '.join(f'{wall:.2f}' for wall in walls)})"
    )
    print(f"simulated time           {result.simulated_ms / 1000:.2f} s")
    print(f"payments per wall second {decided / wall_s:.0f}")
    print(
        f"latency p50/p99          {result.latency_ms['p50']} / {result.latency_ms['p99']} ms "
        "(simulated)"
    )
    print(
        f"baseline: verify         {verify_us:.1f} us per Ed25519 verification (this machine, now)"
    )
    print(
        f"baseline: verify floor   {floor_s:.2f} s for the {verifications} distinct "
        "verifications of this run"
    )
    print(f"ratio wall / floor       {wall_s / floor_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
