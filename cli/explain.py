"""`pbft explain`: the story of a payment, a view or a replica, from a trace (sim/explain.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cli.exits import EXIT_OK, EXIT_USAGE
from cli.outputs import output_file_problem


def add_explain(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="tell what happened to a payment, why a view began, or how a replica ran",
        description="Read a trace (`pbft run --trace PATH`, or replicas' JSON-lines logs with "
        "the same events, merged by time) and tell one story from it.",
        epilog="exit codes:\n  0  told\n  2  an unreadable trace, or an id, view or replica "
        "it does not hold",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("trace", nargs="+", metavar="TRACE", help="JSON-lines trace file(s)")
    target = explain.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--payment", metavar="ID", help="a payment: CLIENT:REQUEST or pay_CLIENT_REQUEST"
    )
    target.add_argument("--view", type=int, metavar="V", help="why view V began")
    target.add_argument("--replica", type=int, metavar="I", help="replica I's run, summarised")
    explain.add_argument(
        "--json", metavar="PATH", help="write the story as JSON instead; '-' = stdout"
    )


def explain(arguments: argparse.Namespace) -> int:
    from sim.explain import (
        ExplainError,
        explain_payment,
        explain_replica,
        explain_view,
        parse_payment_id,
        render_payment,
        render_replica,
        render_view,
    )

    destination = arguments.json
    problem = output_file_problem("--json", destination) if destination != "-" else None
    if problem is not None:
        print(f"pbft explain: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if arguments.payment is not None:
            story = explain_payment(arguments.trace, parse_payment_id(arguments.payment))
            text = render_payment(story)
        elif arguments.view is not None:
            if arguments.view < 0:
                raise ExplainError(f"--view {arguments.view}: a view is 0 or more")
            story = explain_view(arguments.trace, arguments.view)
            text = render_view(story)
        else:
            if arguments.replica < 0:
                raise ExplainError(f"--replica {arguments.replica}: a replica id is 0 or more")
            story = explain_replica(arguments.trace, arguments.replica)
            text = render_replica(story)
    except ExplainError as error:
        print(f"pbft explain: {error}", file=sys.stderr)
        return EXIT_USAGE
    if destination not in (None, "-"):
        with open(destination, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(story, indent=2) + "\n")
    try:
        print(json.dumps(story, indent=2) if destination == "-" else text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `pbft explain ... | head`: the reader has what it wanted.
        # Python flushes stdout again at exit: point it at /dev/null (the docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
