"""`pbft pay` and `pbft balance`: one payment with its receipt, one balance read; and the
path every command that submits one ledger operation shares with pay (its options, checks,
output and exit codes: add_submission_options, check_submission, submit_and_report).

The work is in runtime.client (PaymentClient); here every argument is checked before
anything is sent, and each outcome gets its exit code and its one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import trio

from cli.exits import EXIT_INTERRUPTED, EXIT_NO, EXIT_NO_DECISION, EXIT_OK, EXIT_USAGE, leaf
from cli.ids import named_ids
from cli.outputs import output_file_problem
from pbft.operations import Operation

PAY_EXIT_CODES = """exit codes:
  0  confirmed (the JSON line on stdout; the receipt in --receipt)
  1  rejected: the reason is printed (a receipt proves the rejection too)
  2  bad arguments or files, found before anything is sent
  3  an internal error (a bug)
  4  no decision within --timeout: retry with the printed --request-id, never a new one
     (also: the replicas no longer remember that request id's outcome)"""
BALANCE_EXIT_CODES = """exit codes:
  0  f + 1 replicas agree on the balance (JSON on stdout)
  1  no such account
  2  bad arguments or files
  3  an internal error (a bug)
  4  no f + 1 matching answers within --timeout"""


def add_pay(commands: Any) -> None:
    pay = commands.add_parser(
        "pay",
        help="make one payment and keep its receipt",
        epilog=PAY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_submission_options(pay, "the paying client's id")
    pay.add_argument("--from", dest="payer", required=True, help="payer account")
    pay.add_argument("--to", dest="payee", required=True, help="payee account")
    pay.add_argument("--amount", type=int, required=True, help="integer minor units")


def add_balance(commands: Any) -> None:
    balance = commands.add_parser(
        "balance",
        help="read a balance (f + 1 replicas agree)",
        epilog=BALANCE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    balance.add_argument("--cluster", required=True)
    balance.add_argument("--account", required=True)
    balance.add_argument("--client", type=int, default=0, help="the asking client's id")
    balance.add_argument("--timeout", type=float, default=10.0)


def pay(arguments: argparse.Namespace) -> int:
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    problem = (
        check_submission(cluster, arguments)
        or check_uint64("--amount", arguments.amount)
        or check_account("--from", arguments.payer)
        or check_account("--to", arguments.payee)
    )
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE
    operation = Operation.transfer(arguments.payer, arguments.payee, arguments.amount)
    return submit_and_report(arguments, cluster, operation, "payment")


def add_submission_options(parser: Any, client_help: str) -> None:
    """The options every command that submits one ledger operation shares with `pay`."""
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--client", type=int, required=True, help=client_help)
    parser.add_argument("--request-id", type=int, help="to retry a request safely, reuse its id")
    parser.add_argument("--receipt", help="write the receipt to this file")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def check_submission(cluster: Any, arguments: argparse.Namespace) -> str | None:
    """What is wrong with the options add_submission_options added, as one line; None if
    nothing."""
    return (
        check_timeout(arguments.timeout)
        or check_uint64("--request-id", arguments.request_id)
        or check_client(cluster, arguments.client)
        or output_file_problem("--receipt", arguments.receipt)
    )


def submit_and_report(
    arguments: argparse.Namespace,
    cluster: Any,
    operation: Operation,
    noun: str,
) -> int:
    """Submit `operation` (checked already), print its decision as one JSON line, write its
    receipt, and return the exit code: 0 confirmed, 1 rejected, 4 no decision. `noun` names
    the operation in messages ("payment", "capture", ...). The JSON line names the hold,
    payment or account the request makes or refers to (cli/ids.py)."""
    from pbft.client import ClientError
    from runtime.client import PaymentClient, PaymentTimeout

    sent: list[int] = []

    async def main() -> Any:
        async with PaymentClient(cluster, arguments.client, timeout_s=arguments.timeout) as client:
            request_id = arguments.request_id
            if request_id is None:
                request_id = client.new_request_id()
            # Said before sending: whatever happens next, the user can retry with it.
            print(f"pbft: request id {request_id}", file=sys.stderr, flush=True)
            sent.append(request_id)
            return await client.submit(operation, request_id)

    try:
        decided = trio.run(main)
    except PaymentTimeout as error:
        print(
            f"pbft: no decision within {arguments.timeout:g} s; the {noun} may still go "
            f"through: retry with --request-id {error.request_id} (never with a new id)",
            file=sys.stderr,
        )
        return EXIT_NO_DECISION
    except ClientError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as raised:
        if sent and leaf(raised, (KeyboardInterrupt,)) is not None:
            print(
                f"pbft: interrupted; the {noun} may still go through: retry with "
                f"--request-id {sent[0]} to learn its outcome",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        raise
    names = named_ids(
        operation.op,
        decided.client_id,
        decided.request_id,
        operation.payer,
        operation.ref_client,
        operation.ref_request,
    )
    print(
        json.dumps(
            {
                "request_id": decided.request_id,
                "op": operation.op,
                "outcome": decided.outcome,
                "reason": decided.reason,
                "seq": decided.seq,
                **names,
            }
        ),
        flush=True,
    )
    if arguments.receipt and decided.receipt is not None:
        try:
            write_atomically(Path(arguments.receipt), decided.receipt.encode())
        except OSError as error:
            print(
                f"pbft: --receipt: cannot write {arguments.receipt}: {error.strerror}; the "
                f"{noun} was decided: send it again with --request-id {decided.request_id} "
                "to get its receipt",
                file=sys.stderr,
            )
            return EXIT_USAGE
    if decided.outcome == "confirmed":
        return EXIT_OK
    if decided.outcome == "rejected":
        print(f"pbft: {noun} rejected: {decided.reason}", file=sys.stderr)
        return EXIT_NO
    print(
        f"pbft: the outcome of request {decided.request_id} is unknown: the replicas no "
        f"longer remember it ({decided.reason})",
        file=sys.stderr,
    )
    return EXIT_NO_DECISION


def balance(arguments: argparse.Namespace) -> int:
    from pbft.client import ClientError
    from runtime.client import PaymentClient, PaymentTimeout
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    problem = (
        check_timeout(arguments.timeout)
        or check_account("--account", arguments.account)
        or check_client(cluster, arguments.client)
    )
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> Any:
        async with PaymentClient(cluster, arguments.client, timeout_s=arguments.timeout) as client:
            return await client.balance(arguments.account)

    try:
        read = trio.run(main)
    except PaymentTimeout as error:
        print(f"pbft: {error} within {arguments.timeout:g} s", file=sys.stderr)
        return EXIT_NO_DECISION
    except ClientError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not read.exists:
        print(f"pbft: no account {arguments.account!r}", file=sys.stderr)
        return EXIT_NO
    print(
        json.dumps(
            {
                "account": read.account,
                "balance": read.balance,  # available
                "held": read.held,
                "as_of_seq": read.seq,
                "replicas": list(read.replicas),
            }
        )
    )
    return EXIT_OK


def check_timeout(timeout: float) -> str | None:
    from runtime.client import MAX_TIMEOUT_S

    if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        return f"--timeout: {timeout:g} is not in (0, {MAX_TIMEOUT_S:g}] seconds"
    return None


def check_uint64(option: str, value: int | None) -> str | None:
    if value is not None and not 0 <= value < 2**64:
        return f"{option}: {value} is not in 0..2**64-1"
    return None


def check_account(option: str, name: str) -> str | None:
    from pbft.ledger import MAX_ACCOUNT_NAME_LENGTH

    if not 0 < len(name) <= MAX_ACCOUNT_NAME_LENGTH:
        return (
            f"{option}: an account name has 1..{MAX_ACCOUNT_NAME_LENGTH} characters, "
            f"this one {len(name)}"
        )
    return None


def check_client(cluster: Any, client_id: int) -> str | None:
    if client_id not in cluster.client_keys:
        known = sorted(cluster.client_keys)
        listed = ", ".join(str(client) for client in known[:10])
        more = ", ..." if len(known) > 10 else ""
        return (
            f"--client: client {client_id} is unknown to the cluster {cluster.path} "
            f"(its clients: {listed}{more})"
        )
    return None


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
