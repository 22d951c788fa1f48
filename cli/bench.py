"""`pbft bench`: throughput and latency of a local cluster against its crypto ceiling.

The work is in runtime.bench; here are the arguments, the progress line and the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.exits import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE
from cli.outputs import output_file_problem

BENCH_EPILOG = """Each replica count runs on a fresh cluster of `pbft replica` processes on
127.0.0.1, one after another. Every replica and the clients (in this process) share this
machine's cores: the ceiling, cores / (sign + n x verify) with Ed25519 timed in the same
run, is for the whole machine. Phases: a lone payment (1 client, 1 outstanding), closed-
loop load (--clients x --concurrency tasks), and with --rate open-loop load at that offered
rate, latency counted from each payment's scheduled send time. Figures only.

exit codes:
  0  measured
  2  bad arguments (one line on stderr), or --json cannot be written
  3  an internal error (a bug), or the cluster did not come up or answer
  130  interrupted (Ctrl-C); the replicas are stopped"""


def add_bench(commands: Any) -> None:
    from runtime.bench import BenchSettings

    defaults = BenchSettings()
    bench = commands.add_parser(
        "bench",
        help="throughput and latency of a local cluster against its crypto ceiling",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--replicas",
        type=int,
        action="append",
        metavar="N",
        help="a replica count, may be given several times (default: 4, 7 and 10 in turn)",
    )
    bench.add_argument(
        "--clients",
        type=int,
        default=defaults.clients,
        metavar="N",
        help="clients under load (default 4)",
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        metavar="N",
        help="closed-loop tasks per client (default 8)",
    )
    bench.add_argument(
        "--rate", type=float, metavar="PER_S", help="also run open-loop load at this offered rate"
    )
    bench.add_argument(
        "--seconds",
        type=float,
        default=defaults.seconds,
        metavar="S",
        help="length of each phase (default 5)",
    )
    bench.add_argument(
        "--accounts",
        type=int,
        metavar="N",
        help="genesis accounts, given to the cluster file as a count (default: 2 per client)",
    )
    bench.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-': stdout)")


def bench(arguments: argparse.Namespace) -> int:
    from runtime.bench import DEFAULT_REPLICAS, BenchError, BenchSettings, settings_problem
    from runtime.localcluster import ClusterStartError

    replicas = tuple(dict.fromkeys(arguments.replicas or DEFAULT_REPLICAS))
    settings = BenchSettings(
        replicas=replicas,
        clients=arguments.clients,
        concurrency=arguments.concurrency,
        rate=arguments.rate,
        seconds=arguments.seconds,
        accounts=arguments.accounts,
    )
    problem = settings_problem(settings)
    if problem is None and arguments.json != "-":
        problem = output_file_problem("--json", arguments.json)
    if problem is not None:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _ProgressLine() as progress:
            result = _run(settings, progress)
    except (BenchError, ClusterStartError) as error:
        print(f"pbft: bench: {error}", file=sys.stderr)
        return EXIT_INTERNAL
    return _write(result, arguments.json)


def _run(settings: Any, progress: _ProgressLine) -> dict[str, Any]:
    from runtime.bench import run_bench

    return run_bench(settings, progress.update if progress.enabled else None)


def _write(result: dict[str, Any], destination: str | None) -> int:
    from runtime.bench import format_report

    text = json.dumps(result, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)  # only JSON on stdout; the table goes to stderr
        print(format_report(result), file=sys.stderr)
        return EXIT_OK
    print(format_report(result))
    if destination is not None:
        try:
            Path(destination).write_text(text)
        except OSError as error:
            print(f"pbft: --json: cannot write {destination}: {error.strerror}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK


class _ProgressLine:
    """One line on stderr saying what runs now (rich), only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._status: Any = None

    def __enter__(self) -> _ProgressLine:
        if self.enabled:
            from rich.console import Console

            self._status = Console(file=sys.stderr).status("bench: starting")
            self._status.start()
        return self

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(f"bench {text}")

    def __exit__(self, *raised: object) -> None:
        if self._status is not None:
            self._status.stop()
