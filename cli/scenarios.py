"""`pbft run`, `pbft sweep` and `pbft fuzz`: scenarios in the deterministic simulator."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.exits import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, EXIT_VIOLATED


def add_run(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    run = commands.add_parser(
        "run",
        help="run one scenario file in the deterministic simulator",
        epilog="exit codes:\n  0  the scenario's expectations hold\n  1  one does not\n"
        "  2  a bad scenario file or bad arguments\n  3  an internal error (a bug)",
        formatter_class=formatter,
    )
    run.add_argument("scenario", help="path to a scenario TOML file")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument(
        "--json",
        metavar="PATH",
        help="also write the summary as JSON; '-' = stdout, and then the text goes to stderr",
    )
    run.add_argument("--trace", metavar="PATH", help="write every event as JSON lines")


def add_sweep(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    sweep = commands.add_parser(
        "sweep",
        help="run one scenario under many seeds, in parallel",
        epilog="exit codes:\n  0  every seed ok\n  1  some seed violated an expectation\n"
        "  2  a bad scenario file or bad arguments\n  3  some seed hit an internal error",
        formatter_class=formatter,
    )
    sweep.add_argument("scenario", help="path to a scenario TOML file")
    sweep.add_argument("--seeds", default="0..99", help="e.g. 0..999 or 1,5,10..20")
    sweep.add_argument("--jobs", type=int, help="worker processes (default: one per core)")
    sweep.add_argument(
        "--json",
        metavar="PATH",
        help="also write per-seed results and their spread as JSON; '-' = stdout (JSON only)",
    )
    _add_scheduler(sweep)


def _add_scheduler(parser: Any) -> None:
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing dask.distributed cluster, e.g. tcp://HOST:8786 "
        "(--jobs then = tasks in flight, default: the cluster's threads)",
    )


def add_fuzz(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    fuzz = commands.add_parser(
        "fuzz",
        help="run random scenarios within the fault bound; shrink the first failure",
        epilog="exit codes:\n  0  no failure within the budget\n  1  a failure (written, shrunk)\n"
        "  2  bad arguments\n  3  an internal error (a bug)",
        formatter_class=formatter,
    )
    fuzz.add_argument("--replicas", type=int, default=4, help="cluster size n (default 4)")
    fuzz.add_argument(
        "--budget", type=float, default=60.0, help="seconds to spend running cases (default 60)"
    )
    fuzz.add_argument(
        "--seed", type=int, help="the first case seed (default: random); cases are S, S + 1, ..."
    )
    fuzz.add_argument(
        "--out", default="reports/fuzz", help="where a shrunk failing scenario is written"
    )
    fuzz.add_argument("--jobs", type=int, help="worker processes (default: one per core)")
    fuzz.add_argument(
        "--shrink-runs",
        type=int,
        default=200,
        help="most runs spent shrinking a failure (default 200)",
    )
    _add_scheduler(fuzz)


def run(arguments: argparse.Namespace) -> int:
    from sim.scenario import ScenarioError, load_scenario
    from sim.simulator import run_scenario

    try:
        scenario = load_scenario(arguments.scenario)
    except ScenarioError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    if arguments.seed is not None and not 0 <= arguments.seed < 2**63:
        print(f"pbft: --seed: {arguments.seed} is not in 0..2**63-1", file=sys.stderr)
        return EXIT_USAGE
    # Open the outputs before the run, so a bad path fails at once, as a usage error.
    try:
        trace_file = open(arguments.trace, "w", encoding="utf-8") if arguments.trace else None
        json_file = (
            open(arguments.json, "w", encoding="utf-8")
            if arguments.json and arguments.json != "-"
            else None
        )
    except OSError as error:
        print(f"pbft: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    try:
        result = run_scenario(scenario, arguments.seed, trace_file)
    finally:
        if trace_file is not None:
            trace_file.close()
    wall_s = time.perf_counter() - started
    summary = result.summary()
    summary["wall_s"] = round(wall_s, 3)
    summary["fault_bound"] = _fault_bound(scenario)
    # With `--json -` stdout carries the JSON document alone, so it can be piped.
    print(_format(summary), file=sys.stderr if arguments.json == "-" else sys.stdout)
    if arguments.json:
        text = json.dumps(summary, indent=2, sort_keys=False)
        if json_file is None:
            print(text)
        else:
            with json_file:
                json_file.write(text + "\n")
    return EXIT_OK if result.verdict == "ok" else EXIT_VIOLATED


def _fault_bound(scenario: Any) -> dict[str, Any]:
    """f for the cluster size against the most replicas the scenario makes faulty at once."""
    from sim.faultbound import max_faulty

    faulty = max_faulty(scenario)
    return {
        "replicas": scenario.cluster.replicas,
        "f": scenario.fault_tolerance,
        "max_faulty_at_once": faulty,
        "exceeded": faulty > scenario.fault_tolerance,
    }


def _jobs(arguments: argparse.Namespace) -> int | None:
    """--jobs for sweep and fuzz: default one worker per core; None (after saying why) if bad."""
    from sim.sweep import default_jobs

    jobs = arguments.jobs if arguments.jobs is not None else default_jobs()
    if not 1 <= jobs <= 256:
        print(f"pbft: --jobs: {jobs} is not in 1..256", file=sys.stderr)
        return None
    return jobs


def _connect(arguments: argparse.Namespace) -> tuple[Any, int] | None:
    """(dask client or None, tasks in flight); None (after saying why) if
    the scheduler cannot be reached or --jobs is bad."""
    from sim.dask_pool import SchedulerError, connect, worker_threads

    if arguments.scheduler is None:
        jobs = _jobs(arguments)
        return None if jobs is None else (None, jobs)
    if arguments.jobs is not None and not 1 <= arguments.jobs <= 4096:
        print(f"pbft: --jobs: {arguments.jobs} is not in 1..4096", file=sys.stderr)
        return None
    try:
        client = connect(arguments.scheduler)
    except SchedulerError as error:
        print(f"pbft: --scheduler: {error}", file=sys.stderr)
        return None
    return client, arguments.jobs if arguments.jobs is not None else worker_threads(client)


def sweep(arguments: argparse.Namespace) -> int:
    from sim.dask_pool import executor
    from sim.progress import TerminalProgress
    from sim.scenario import ScenarioError, load_scenario
    from sim.sweep import SeedRangeError, document, parse_seeds, report
    from sim.sweep import sweep as sweep_seeds

    try:
        load_scenario(arguments.scenario)
        seeds = parse_seeds(arguments.seeds)
    except ScenarioError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SeedRangeError as error:
        print(f"pbft: --seeds: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        json_file = (
            open(arguments.json, "w", encoding="utf-8")
            if arguments.json and arguments.json != "-"
            else None
        )
    except OSError as error:
        print(f"pbft: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    connected = _connect(arguments)
    if connected is None:
        if json_file is not None:
            json_file.close()
        return EXIT_USAGE
    client, jobs = connected
    try:
        with TerminalProgress("sweep", len(seeds)) as progress:
            outcomes = sweep_seeds(
                arguments.scenario,
                seeds,
                jobs,
                progress.sweep_step,
                executor(client) if client is not None else None,
            )
    finally:
        if client is not None:
            client.close()
    # With `--json -` stdout carries the JSON document alone, so it can be piped.
    report(arguments.scenario, outcomes, sys.stderr if arguments.json == "-" else sys.stdout)
    if arguments.json:
        text = json.dumps(document(arguments.scenario, outcomes), indent=2)
        if json_file is None:
            print(text)
        else:
            with json_file:
                json_file.write(text + "\n")
    if any(outcome.verdict == "error" for outcome in outcomes):
        return EXIT_INTERNAL
    return EXIT_OK if all(outcome.verdict == "ok" for outcome in outcomes) else EXIT_VIOLATED


def fuzz(arguments: argparse.Namespace) -> int:
    import random

    from sim.dask_pool import executor
    from sim.fuzz import MAX_FUZZ_REPLICAS, summarize
    from sim.fuzz import fuzz as fuzz_cases
    from sim.progress import TerminalProgress

    if not 4 <= arguments.replicas <= MAX_FUZZ_REPLICAS:
        print(
            f"pbft: --replicas: {arguments.replicas} is not in 4..{MAX_FUZZ_REPLICAS}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not 0 < arguments.budget <= 7 * 24 * 3600:
        print(f"pbft: --budget: {arguments.budget} is not in (0, 604800] seconds", file=sys.stderr)
        return EXIT_USAGE
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(2**32)
    if not 0 <= seed < 2**62:
        print(f"pbft: --seed: {seed} is not in 0..2**62-1", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= arguments.shrink_runs <= 100_000:
        print(f"pbft: --shrink-runs: {arguments.shrink_runs} is not in 0..100000", file=sys.stderr)
        return EXIT_USAGE
    # Fail at once on an output directory that cannot be made, as a usage error.
    try:
        Path(arguments.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"pbft: --out: cannot create {arguments.out}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    connected = _connect(arguments)
    if connected is None:
        return EXIT_USAGE
    client, jobs = connected
    where = f" on {arguments.scheduler}" if client is not None else ""
    print(
        f"pbft fuzz --seed {seed} --replicas {arguments.replicas}: "
        f"{arguments.budget:g} s on {jobs} job(s){where}",
        file=sys.stderr,
    )
    try:
        with TerminalProgress("fuzz", arguments.budget) as progress:
            report = fuzz_cases(
                seed,
                arguments.replicas,
                arguments.budget,
                jobs,
                arguments.out,
                progress=progress.fuzz_step,
                log=sys.stderr,
                # Shrinking logs its own lines: the bar stops first.
                on_failure=progress.stop,
                shrink_runs=arguments.shrink_runs,
                executor=executor(client) if client is not None else None,
            )
    finally:
        if client is not None:
            client.close()
    summarize(report)
    return EXIT_VIOLATED if report.failures else EXIT_OK


def _format(summary: dict[str, Any]) -> str:
    payments = summary["payments"]
    latency = summary["latency_ms"]
    lines = [
        f"scenario      {summary['scenario']}  ({summary['source']})",
        f"seed          {summary['seed']}",
        f"payments      submitted {payments['submitted']}  confirmed {payments['confirmed']}  "
        f"rejected {payments['rejected']}  undecided {payments['undecided']}",
    ]
    if summary["rejections"]:
        reasons = "  ".join(f"{reason} {count}" for reason, count in summary["rejections"].items())
        lines.append(f"rejections    {reasons}")
    bound = summary["fault_bound"]
    if bound["exceeded"]:
        lines.append(
            f"faults        up to {bound['max_faulty_at_once']} replicas faulty at once, "
            f"more than f = {bound['f']} for n = {bound['replicas']}: beyond what the "
            "protocol is built to survive"
        )
    lines.append(f"view changes  {summary['view_changes']}")
    messages = summary["messages"]
    dropped = sum(messages["dropped"].values())
    lines.append(f"messages      sent {messages['sent']}  dropped {dropped}")
    for reason, count in messages["dropped"].items():
        lines.append(f"  dropped     {reason} {count}")

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    replicas = summary["replicas"]
    ends = "  ".join(
        f"{name} {state['last_executed']}" for name, state in replicas["final"].items()
    )
    converged = "converged" if replicas["converged"] else "NOT converged"
    lines.append(f"replicas      last executed: {ends}  ({converged})")
    for offender, count in summary["evidence"].items():
        lines.append(f"evidence      {offender}: {count} conflicting signed messages")
    lines.append(
        f"latency (ms)  p50 {show(latency['p50'])}  p95 {show(latency['p95'])}  "
        f"p99 {show(latency['p99'])}   (simulated)"
    )
    for name, state in summary["checks"].items():
        lines.append(f"check         {name:<13} {state}")
        for detail in summary["check_details"].get(name, [])[:3]:
            lines.append(f"                {detail}")
    expect = summary["expect"]
    lines.append(
        f"expect        safety {'holds' if expect['safety'] else 'violated (negative control)'}"
        f"  liveness {'required' if expect['liveness'] else 'not required'}"
    )
    for failure in summary["expectation_failures"]:
        lines.append(f"UNMET         {failure}")
    lines.append(f"trace hash    {summary['trace_hash']}  ({summary['trace_events']} events)")
    lines.append(
        f"simulated     {summary['simulated_ms'] / 1000:.2f} s   wall {summary['wall_s']:.2f} s"
    )
    lines.append(f"verdict       {summary['verdict']}")
    return "\n".join(lines)
