"""`pbft calibrate`: measure this machine's figures for the simulator's CPU model.

The measuring is in sim.calibrate; here are the arguments and the file written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import tomli_w

from cli.exits import EXIT_OK, EXIT_USAGE
from cli.outputs import output_file_problem

MAX_SECONDS = 60.0
MAX_BENCH_FILE_BYTES = 16 * 1024 * 1024

CALIBRATE_EPILOG = """Writes a TOML file with a [cpu] table (sign_us, verify_us,
per_message_us, per_request_us, fsync_us) that a scenario uses as `[cluster] cpu = "FILE"`
(a path relative to the scenario file), and a [machine] table saying where and under what
load it was measured.
Figures only: a busy machine measures slower.

exit codes:
  0  measured (and written)
  2  bad arguments (one line on stderr), or --out cannot be written"""


def add_calibrate(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="measure this machine's CPU costs for the simulator's CPU model",
        epilog=CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument(
        "--out", metavar="FILE", help="write the figures here as TOML (default: stdout)"
    )
    calibrate.add_argument(
        "--bench",
        metavar="FILE",
        help="also fit per_request_us to the replicas' CPU per payment in this pbft bench "
        "--json file (the runtime's costs beyond the simulated core's)",
    )
    calibrate.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="time spent timing each of sign and verify (default 1)",
    )


def calibrate(arguments: argparse.Namespace) -> int:
    seconds = arguments.seconds
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        print(
            f"pbft: calibrate: --seconds: {seconds:g} is not in (0, {MAX_SECONDS:g}]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    problem = output_file_problem("--out", arguments.out)
    if problem is not None:
        print(f"pbft: calibrate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    bench = None
    if arguments.bench is not None:
        try:
            with open(arguments.bench, encoding="utf-8") as file:
                bench = json.loads(file.read(MAX_BENCH_FILE_BYTES))
        except OSError as error:
            print(
                f"pbft: calibrate: --bench: cannot read {arguments.bench}: {error.strerror}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        except (ValueError, RecursionError) as error:
            print(
                f"pbft: calibrate: --bench: {arguments.bench} is not JSON: {error}", file=sys.stderr
            )
            return EXIT_USAGE
        if not isinstance(bench, dict):
            print(
                f"pbft: calibrate: --bench: {arguments.bench} is not a pbft bench --json file",
                file=sys.stderr,
            )
            return EXIT_USAGE
    from sim.calibrate import CalibrationError
    from sim.calibrate import calibrate as measure

    try:
        calibration = measure(seconds, bench)
    except CalibrationError as error:
        print(f"pbft: calibrate: --bench: {arguments.bench}: {error}", file=sys.stderr)
        return EXIT_USAGE
    text = tomli_w.dumps(calibration.document())
    if arguments.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(arguments.out, "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as error:
        print(
            f"pbft: calibrate: --out: cannot write {arguments.out}: {error.strerror}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"wrote {arguments.out}", file=sys.stderr)
    return EXIT_OK
