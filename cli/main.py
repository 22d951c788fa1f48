"""The `pbft` command: the parser, the dispatch to each command, and the last line of
defence (an unexpected exception is a bug: exit 3; Ctrl-C: exit 130). Exit codes: cli/exits.py.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from cli.exits import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VIOLATED,
)

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "EXIT_VIOLATED", "main"]

Command = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 too; keep its message format
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser and each command's function. The command modules are imported here, inside
    main's guard: importing the runtime takes a while, and Ctrl-C then must exit 130 too."""
    from cli import (
        bench,
        calibrate,
        cluster,
        gateway,
        gateway_keys,
        keys,
        lookups,
        operations,
        payments,
        receipts,
        scenarios,
    )

    parser = _Parser(prog="pbft", description="Byzantine fault-tolerant payment confirmation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # In the order `pbft --help` lists them.
    for add in (
        scenarios.add_run,
        cluster.add_replica,
        payments.add_pay,
        operations.add_operations,
        payments.add_balance,
        lookups.add_lookups,
        receipts.add_verify_receipt,
        cluster.add_cluster,
        gateway.add_gateway,
        keys.add_keygen,
        gateway_keys.add_gateway_key,
        scenarios.add_sweep,
        scenarios.add_fuzz,
        bench.add_bench,
        calibrate.add_calibrate,
    ):
        add(commands)
    handlers: dict[str, Command] = {
        "run": scenarios.run,
        "sweep": scenarios.sweep,
        "fuzz": scenarios.fuzz,
        "keygen": keys.keygen,
        "replica": cluster.replica,
        "cluster": cluster.cluster_up,
        "pay": payments.pay,
        "authorize": operations.authorize,
        "capture": operations.capture,
        "void": operations.void,
        "refund": operations.refund,
        "open-account": operations.open_account,
        "balance": payments.balance,
        "status": lookups.status,
        "history": lookups.history,
        "hold": lookups.hold,
        "verify-receipt": receipts.verify_receipt,
        "bench": bench.bench,
        "calibrate": calibrate.calibrate,
        "gateway": gateway.gateway,
        "gateway-key": gateway_keys.gateway_key,
    }
    return parser, handlers


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
    parser, handlers = _build_parser()
    arguments = parser.parse_args(argv)
    handler = handlers.get(arguments.command)
    if handler is None:
        return EXIT_USAGE
    from runtime.cluster import ClusterFileError

    try:
        return handler(arguments)
    except ClusterFileError as error:  # a bad cluster file, found by any runtime command
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # the last line of defence: report, exit 3
        traceback.print_exc()
        print(
            "pbft: internal error (a bug: please report it with the scenario and seed)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
