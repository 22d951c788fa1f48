"""`pbft authorize`, `capture`, `void`, `refund`, `open-account`: one ledger operation each,
decided by f + 1 replicas like `pbft pay`, with the same options, output, receipt and exit
codes (cli/payments.py holds the shared path; the work is in runtime.client). Holds and
payments are named CLIENT:REQUEST on the command line and in the output (cli/ids.py).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from cli.exits import EXIT_USAGE
from cli.ids import parse_id
from cli.payments import (
    PAY_EXIT_CODES,
    add_submission_options,
    check_account,
    check_submission,
    check_uint64,
    submit_and_report,
)
from pbft.operations import Operation

ID_FORMAT = "CLIENT:REQUEST, the client and request id of the {what} (e.g. 0:1764475200000000)"


def _parser(commands: Any, name: str, summary: str, description: str, client: str) -> Any:
    parser = commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 78),
        epilog=PAY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_submission_options(parser, client)
    return parser


def add_operations(commands: Any) -> None:
    authorize = _parser(
        commands,
        "authorize",
        "hold an amount for a payee (capture or void it later)",
        "Hold --amount of --from's available balance for --to. It is taken by `pbft "
        "capture`, released by `pbft void`, or released by itself --expires-in-ms after "
        "its batch's time. The hold's id (printed as \"hold\") is CLIENT:REQUEST of this "
        "request.",
        "the payer's owner's client id",
    )
    authorize.add_argument("--from", dest="payer", required=True, help="payer account")
    authorize.add_argument("--to", dest="payee", required=True, help="payee account")
    authorize.add_argument("--amount", type=int, required=True, help="integer minor units")
    authorize.add_argument(
        "--expires-in-ms",
        type=int,
        metavar="MS",
        required=True,
        help="milliseconds the hold lasts, from its batch's time",
    )

    capture = _parser(
        commands,
        "capture",
        "take (part of) a hold: the payee gets it, the rest goes back",
        "Post --amount (at most what is held) of a hold to its payee and release the rest "
        "to its payer; at most once. The payment to refund later is named by the hold's id.",
        "the payee's owner's client id",
    )
    capture.add_argument(
        "--hold", required=True, metavar="CLIENT:REQUEST", help=ID_FORMAT.format(what="authorize")
    )
    capture.add_argument("--amount", type=int, required=True, help="integer minor units")

    void = _parser(
        commands,
        "void",
        "release a hold to its payer",
        "Release a hold: its whole amount goes back to the payer's available balance; at "
        "most once.",
        "the payer's or the payee's owner's client id",
    )
    void.add_argument(
        "--hold", required=True, metavar="CLIENT:REQUEST", help=ID_FORMAT.format(what="authorize")
    )

    refund = _parser(
        commands,
        "refund",
        "give (part of) a payment back to its payer",
        "Move --amount from the payee back to the payer of a confirmed payment; all refunds "
        "of one payment together never exceed it.",
        "the payee's owner's client id",
    )
    refund.add_argument(
        "--payment",
        required=True,
        metavar="CLIENT:REQUEST",
        help=ID_FORMAT.format(what="transfer (`pbft pay`), or of the authorize for a capture"),
    )
    refund.add_argument("--amount", type=int, required=True, help="integer minor units")

    opening = _parser(
        commands,
        "open-account",
        "open an account (balance 0) owned by the client",
        "Open --account with balance 0, owned by --client; money reaches it by payments.",
        "the client that will own the account",
    )
    opening.add_argument("--account", required=True, help="the new account's name")


def authorize(arguments: argparse.Namespace) -> int:
    def build() -> Operation | str:
        problem = (
            check_uint64("--amount", arguments.amount)
            or check_uint64("--expires-in-ms", arguments.expires_in_ms)
            or check_account("--from", arguments.payer)
            or check_account("--to", arguments.payee)
        )
        if problem:
            return problem
        return Operation.authorize(
            arguments.payer, arguments.payee, arguments.amount, arguments.expires_in_ms
        )

    return _run(arguments, "authorization", build)


def capture(arguments: argparse.Namespace) -> int:
    def build() -> Operation | str:
        hold = parse_id("--hold", arguments.hold)
        if isinstance(hold, str):
            return hold
        problem = check_uint64("--amount", arguments.amount)
        if problem:
            return problem
        return Operation.capture(hold, arguments.amount)

    return _run(arguments, "capture", build)


def void(arguments: argparse.Namespace) -> int:
    def build() -> Operation | str:
        hold = parse_id("--hold", arguments.hold)
        if isinstance(hold, str):
            return hold
        return Operation.void(hold)

    return _run(arguments, "void", build)


def refund(arguments: argparse.Namespace) -> int:
    def build() -> Operation | str:
        payment = parse_id("--payment", arguments.payment)
        if isinstance(payment, str):
            return payment
        problem = check_uint64("--amount", arguments.amount)
        if problem:
            return problem
        return Operation.refund(payment, arguments.amount)

    return _run(arguments, "refund", build)


def open_account(arguments: argparse.Namespace) -> int:
    def build() -> Operation | str:
        problem = check_account("--account", arguments.account)
        if problem:
            return problem
        return Operation.open_account(arguments.account)

    return _run(arguments, "account opening", build)


def _run(arguments: argparse.Namespace, noun: str, build: Callable[[], Operation | str]) -> int:
    """Check the shared options, then the command's own (`build`: the operation, or one line
    saying what is wrong), then submit it."""
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    problem = check_submission(cluster, arguments)
    built = problem if problem else build()
    if isinstance(built, str):
        print(f"pbft: {built}", file=sys.stderr)
        return EXIT_USAGE
    return submit_and_report(arguments, cluster, built, noun)
