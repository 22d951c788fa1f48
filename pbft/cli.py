"""The `pbft` command line: a thin shell around the simulator and the runtime.

This is the one module of the pbft package that does I/O; the protocol core never
imports it. Exit codes: 0 the scenario's expectations hold, 1 one does not,
2 a bad scenario file or bad arguments (one line, never a traceback), 3 an internal error
(a bug), 130 interrupted (Ctrl-C). The runtime commands add theirs (runtime.commands:
4 for no decision within the timeout); each command's --help lists its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_VIOLATED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 too; keep its message format
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pbft", description="Byzantine fault-tolerant payment confirmation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    from runtime.commands import add_runtime_commands

    add_runtime_commands(commands)
    keygen = commands.add_parser(
        "keygen",
        help="generate keys and DIR/cluster.toml for a local cluster",
        epilog="exit codes:\n  0  written\n  2  bad arguments, or DIR already holds a cluster",
        formatter_class=formatter,
    )
    keygen.add_argument("--replicas", type=int, default=4)
    keygen.add_argument("--clients", type=int, default=2)
    keygen.add_argument("--out", required=True, metavar="DIR")
    keygen.add_argument("--host", default="127.0.0.1")
    keygen.add_argument("--base-port", type=int, default=7000)
    keygen.add_argument("--accounts-per-client", type=int, default=2)
    keygen.add_argument("--initial-balance", type=int, default=100_000)
    keygen.add_argument(
        "--generated-accounts",
        type=int,
        metavar="N",
        help="a [genesis] of N accounts by rule instead of --accounts-per-client listed ones",
    )
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
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while importing the runtime, which takes a while
        print("pbft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:  # Ctrl-C inside a trio task arrives in a group
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
        print("pbft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    arguments = _build_parser().parse_args(argv)
    try:
        if arguments.command == "run":
            return _run(arguments)
        if arguments.command == "sweep":
            return _sweep(arguments)
        if arguments.command == "fuzz":
            return _fuzz(arguments)
        if arguments.command == "keygen":
            return _keygen(arguments)
        from runtime.commands import RUNTIME_COMMANDS, run_runtime_command

        if arguments.command in RUNTIME_COMMANDS:
            return run_runtime_command(arguments)
    except Exception:  # noqa: BLE001 - the last line of defence: report, exit 3
        traceback.print_exc()
        print(
            "pbft: internal error (a bug: please report it with the scenario and seed)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return EXIT_USAGE


def _run(arguments: argparse.Namespace) -> int:
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
        trace_file = open(arguments.trace, "w", encoding="utf-8") if arguments.trace else None  # noqa: SIM115
        json_file = (
            open(arguments.json, "w", encoding="utf-8")  # noqa: SIM115
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


def _keygen(arguments: argparse.Namespace) -> int:
    from pbft.config import MAX_REPLICAS, MIN_REPLICAS
    from runtime.cluster import MAX_ACCOUNTS, MAX_CLIENTS, write_cluster

    problem = None
    if not MIN_REPLICAS <= arguments.replicas <= MAX_REPLICAS:
        problem = f"--replicas: {arguments.replicas} is not in {MIN_REPLICAS}..{MAX_REPLICAS}"
    elif not 1 <= arguments.clients <= MAX_CLIENTS:
        problem = f"--clients: {arguments.clients} is not in 1..{MAX_CLIENTS}"
    elif not 0 <= arguments.accounts_per_client <= MAX_ACCOUNTS // arguments.clients:
        problem = (
            f"--accounts-per-client: {arguments.accounts_per_client} is not in "
            f"0..{MAX_ACCOUNTS // arguments.clients} (at most {MAX_ACCOUNTS} accounts in all)"
        )
    elif not 1 <= arguments.base_port <= 65536 - arguments.replicas:
        problem = f"--base-port: {arguments.base_port}: the replicas' ports must be in 1..65535"
    elif not arguments.host or len(arguments.host) > 255:
        problem = "--host: expected a host name or address of 1..255 characters"
    elif Path(arguments.out).exists() and not Path(arguments.out).is_dir():
        problem = f"--out: {arguments.out} exists and is not a directory"
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = write_cluster(
            arguments.out,
            replicas=arguments.replicas,
            clients=arguments.clients,
            host=arguments.host,
            base_port=arguments.base_port,
            accounts_per_client=arguments.accounts_per_client,
            initial_balance=arguments.initial_balance,
            generated_accounts=arguments.generated_accounts,
        )
    except (ValueError, FileExistsError) as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"pbft: --out: cannot write in {arguments.out}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path} and {arguments.replicas + arguments.clients} private keys (mode 0600)")
    return EXIT_OK


def _jobs(arguments: argparse.Namespace) -> int | None:
    """--jobs for sweep and fuzz: default one worker per core; None (after saying why) if bad."""
    from sim.sweep import default_jobs

    jobs = arguments.jobs if arguments.jobs is not None else default_jobs()
    if not 1 <= jobs <= 256:
        print(f"pbft: --jobs: {jobs} is not in 1..256", file=sys.stderr)
        return None
    return jobs


def _sweep(arguments: argparse.Namespace) -> int:
    from sim.progress import TerminalProgress
    from sim.scenario import ScenarioError, load_scenario
    from sim.sweep import SeedRangeError, parse_seeds, report, sweep

    try:
        load_scenario(arguments.scenario)
        seeds = parse_seeds(arguments.seeds)
    except ScenarioError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SeedRangeError as error:
        print(f"pbft: --seeds: {error}", file=sys.stderr)
        return EXIT_USAGE
    jobs = _jobs(arguments)
    if jobs is None:
        return EXIT_USAGE
    with TerminalProgress("sweep", len(seeds)) as progress:
        outcomes = sweep(arguments.scenario, seeds, jobs, progress.sweep_step)
    report(arguments.scenario, outcomes)
    if any(outcome.verdict == "error" for outcome in outcomes):
        return EXIT_INTERNAL
    return EXIT_OK if all(outcome.verdict == "ok" for outcome in outcomes) else EXIT_VIOLATED


def _fuzz(arguments: argparse.Namespace) -> int:
    import random

    from sim.fuzz import MAX_FUZZ_REPLICAS, fuzz, summarize
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
    jobs = _jobs(arguments)
    if jobs is None:
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
    print(
        f"pbft fuzz --seed {seed} --replicas {arguments.replicas}: "
        f"{arguments.budget:g} s on {jobs} job(s)",
        file=sys.stderr,
    )
    with TerminalProgress("fuzz", arguments.budget) as progress:
        report = fuzz(
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
        )
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


if __name__ == "__main__":
    sys.exit(main())
