"""Does a payment cost more in a larger ledger? The simulator's wall time for the same
payments of one scenario at its own account count (the baseline) and at a large one,
measured in the same run, interleaved, median of R.

    python -m sim.ledger_bench [SCENARIO] [--accounts 1000000] [--payments 1000] [--repeat 3]

The one-time build of the genesis (the shared Merkle tree of a generated genesis,
pbft/ledger.py) is timed on its own line, cold, before any run; each run's setup (the
replicas, cluster ids, the planned workload) is printed apart from its wall time, which
is `Simulation.run()` alone, as in sim/bench.py. Figures only; nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from pbft.config import ClusterConfig
from pbft.ledger import Ledger
from sim.scenario import Scenario, ScenarioError, load_scenario
from sim.scenario.loading import MAX_ACCOUNTS
from sim.simulator import Simulation
from sim.workload import genesis_accounts


def _with(scenario: Scenario, accounts: int, payments: int) -> Scenario:
    workload = dataclasses.replace(scenario.workload, accounts=accounts, payments=payments)
    return dataclasses.replace(scenario, workload=workload)


def _timed_run(scenario: Scenario) -> tuple[float, float, str, int]:
    """Setup seconds, run seconds, the verdict and the payments decided."""
    started = time.perf_counter()
    simulation = Simulation(scenario)
    built = time.perf_counter()
    result = simulation.run()
    finished = time.perf_counter()
    decided = result.submitted - result.undecided
    return built - started, finished - built, result.verdict, decided


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.ledger_bench")
    parser.add_argument("scenario", nargs="?", default="scenarios/fault-free.toml")
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--payments", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args(argv)
    if not 2 <= arguments.accounts <= MAX_ACCOUNTS:
        print(f"ledger_bench: --accounts must be in 2..{MAX_ACCOUNTS:,}", file=sys.stderr)
        return 2
    if arguments.payments < 1 or arguments.repeat < 1:
        print("ledger_bench: --payments and --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        scenario = load_scenario(arguments.scenario)
    except ScenarioError as error:
        print(f"ledger_bench: {error}", file=sys.stderr)
        return 2
    small = _with(scenario, scenario.workload.accounts, arguments.payments)
    large = _with(scenario, arguments.accounts, arguments.payments)

    # Cold: the first ledger of this genesis in the process builds the shared tree.
    workload = large.workload
    started = time.perf_counter()
    genesis = genesis_accounts(workload.accounts, workload.clients, workload.initial_balance)
    Ledger(genesis, ClusterConfig(replica_count=scenario.cluster.replicas).dedup_window).digest()
    genesis_s = time.perf_counter() - started

    walls: dict[str, list[float]] = {"small": [], "large": []}
    setups: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(arguments.repeat):
        for label, variant in (("small", small), ("large", large)):
            setup_s, wall_s, verdict, decided = _timed_run(variant)
            if verdict != "ok":
                print(f"ledger_bench: the {label} run's verdict is {verdict}", file=sys.stderr)
                return 1
            walls[label].append(wall_s)
            setups[label].append(setup_s)
            print(
                f"  {variant.workload.accounts:>9,} accounts: run {wall_s:.2f} s, "
                f"setup {setup_s:.2f} s, {decided} decided",
                file=sys.stderr,
            )

    def median(values: list[float]) -> float:
        return statistics.median(values)

    def listing(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    print(
        f"scenario                  {scenario.name} ({arguments.payments} payments, n = "
        f"{scenario.cluster.replicas}, seed {scenario.seed}, median of {arguments.repeat})"
    )
    print(
        f"genesis build             {genesis_s:.2f} s  (once per process: "
        f"{arguments.accounts:,} generated accounts' Merkle tree)"
    )
    print(
        f"baseline: {small.workload.accounts:>9,} accounts  run {median(walls['small']):.2f} s "
        f"({listing(walls['small'])}), setup {median(setups['small']):.2f} s"
    )
    print(
        f"large:    {large.workload.accounts:>9,} accounts  run {median(walls['large']):.2f} s "
        f"({listing(walls['large'])}), setup {median(setups['large']):.2f} s"
    )
    print(f"ratio large / baseline    {median(walls['large']) / median(walls['small']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
