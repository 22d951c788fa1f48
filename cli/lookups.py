"""`pbft status`, `pbft history`, `pbft hold`: lookups of what the cluster executed, each
answered by f + 1 matching signed replies (runtime.client's status, history and hold).

Like `pbft balance`: every argument is checked before anything is sent, the answer is one
JSON line on stdout, and each outcome has its exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from cli.exits import EXIT_NO, EXIT_NO_DECISION, EXIT_OK, EXIT_USAGE
from cli.ids import format_id, named_ids, parse_id
from cli.outputs import output_file_problem
from cli.payments import (
    check_account,
    check_client,
    check_timeout,
    check_uint64,
    write_atomically,
)

LOOKUP_EXIT_CODES = """exit codes:
  0  f + 1 replicas agree on the answer (JSON on stdout)
  1  {no}
  2  bad arguments or files, found before anything is sent
  3  an internal error (a bug)
  4  no f + 1 matching answers within --timeout"""
_CURSOR = re.compile(r"([0-9]+):([0-9]+)")


NOT_HELD = "the replicas no longer hold that part of history (retention)"


def _parser(commands: Any, name: str, summary: str, no: str) -> Any:
    parser = commands.add_parser(
        name,
        help=summary,
        epilog=LOOKUP_EXIT_CODES.format(no=no),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--client", type=int, default=0, help="the asking client's id")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return parser


def add_lookups(commands: Any) -> None:
    status = _parser(
        commands,
        "status",
        "a request's outcome, even one too old to retry (f + 1 agree)",
        f"no such request (as of the seq printed), or\n     {NOT_HELD}",
    )
    status.add_argument(
        "--client-id", type=int, help="the client that sent the request (default: --client)"
    )
    status.add_argument("--request-id", type=int, required=True)
    status.add_argument(
        "--receipt", help="write the receipt to this file (for --client's own requests)"
    )

    history = _parser(
        commands, "history", "an account's postings, a page at a time (f + 1 agree)", NOT_HELD
    )
    history.add_argument("--account", required=True)
    history.add_argument(
        "--after",
        metavar="SEQ:POSITION",
        default="0:0",
        help='the cursor: the "next" the page before printed (default: from the start)',
    )
    history.add_argument("--limit", type=int, help="entries in the page (default: the most)")

    hold = _parser(
        commands,
        "hold",
        "one hold's fate (f + 1 agree)",
        f"no such hold (as of the seq printed), or\n     {NOT_HELD}",
    )
    hold.add_argument(
        "hold",
        metavar="CLIENT:REQUEST",
        help="the hold's id: the client and request id of its authorize",
    )


def status(arguments: argparse.Namespace) -> int:
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    client_id = arguments.client if arguments.client_id is None else arguments.client_id
    problem = (
        _common_problem(cluster, arguments)
        or check_uint64("--request-id", arguments.request_id)
        or _client_id_problem(client_id)
        or output_file_problem("--receipt", arguments.receipt)
    )
    if problem is None and arguments.receipt and client_id != arguments.client:
        problem = (
            f"--receipt: a receipt is for the asking client's own requests; this one is "
            f"client {client_id}'s (ask as --client {client_id})"
        )
    if problem:
        return _usage(problem)
    result = _ask(cluster, arguments, lambda client: client.status(client_id, arguments.request_id))
    if isinstance(result, int):
        return result
    if result.state != "found":
        return _no(result, f"request {format_id(client_id, arguments.request_id)}")
    record = result.record
    fields = _plain(record)
    names = named_ids(
        record.op,
        record.client_id,
        record.request_id,
        record.payer,
        record.ref_client,
        record.ref_request,
    )
    _print(result, {**fields, **names})
    if arguments.receipt and result.receipt is not None:
        try:
            write_atomically(Path(arguments.receipt), result.receipt.encode())
        except OSError as error:
            return _usage(f"--receipt: cannot write {arguments.receipt}: {error.strerror}")
    return EXIT_OK


def history(arguments: argparse.Namespace) -> int:
    from pbft.history import MAX_PAGE
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    limit = MAX_PAGE if arguments.limit is None else arguments.limit
    problem = _common_problem(cluster, arguments) or check_account("--account", arguments.account)
    if problem is None and not 1 <= limit <= MAX_PAGE:
        problem = f"--limit: {limit} is not in 1..{MAX_PAGE}"
    if problem:
        return _usage(problem)
    after = _cursor(arguments.after)
    if isinstance(after, str):
        return _usage(after)
    result = _ask(
        cluster,
        arguments,
        lambda client: client.history(arguments.account, after=after, limit=limit),
    )
    if isinstance(result, int):
        return result
    if result.state != "found":
        return _no(result, f"history of {arguments.account!r}")
    entries = [_plain(entry) for entry in result.entries]
    last = result.entries[-1] if result.entries else None
    # A full page may have more after it; a shorter one was all there is as of as_of_seq.
    following = format_id(last.seq, last.position) if last and len(entries) == limit else None
    _print(result, {"account": arguments.account, "entries": entries, "next": following})
    return EXIT_OK


def hold(arguments: argparse.Namespace) -> int:
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    problem = _common_problem(cluster, arguments)
    if problem:
        return _usage(problem)
    ident = parse_id("hold", arguments.hold)
    if isinstance(ident, str):
        return _usage(ident)
    result = _ask(cluster, arguments, lambda client: client.hold(ident))
    if isinstance(result, int):
        return result
    if result.state != "found":
        return _no(result, f"hold {format_id(*ident)}")
    _print(result, {"hold": format_id(*ident), **_plain(result.hold)})
    return EXIT_OK


def _common_problem(cluster: Any, arguments: argparse.Namespace) -> str | None:
    return check_timeout(arguments.timeout) or check_client(cluster, arguments.client)


def _client_id_problem(client_id: int) -> str | None:
    from pbft.client import MAX_CLIENT_ID

    if not 0 <= client_id <= MAX_CLIENT_ID:
        return f"--client-id: {client_id} is not in 0..{MAX_CLIENT_ID}"
    return None


def _cursor(text: str) -> tuple[int, int] | str:
    from pbft.client import MAX_POSITION
    from pbft.messages import MAX_SEQ

    matched = _CURSOR.fullmatch(text)
    if matched is None:
        shown = text if len(text) <= 60 else text[:57] + "..."
        return f'--after: {shown!r} is not SEQ:POSITION (the "next" of the page before)'
    seq, position = int(matched.group(1)), int(matched.group(2))
    if seq > MAX_SEQ or position > MAX_POSITION:
        return f"--after: {text} is out of range (seq 0..{MAX_SEQ}, position 0..{MAX_POSITION})"
    return seq, position


def _ask(
    cluster: Any, arguments: argparse.Namespace, lookup: Callable[[Any], Awaitable[Any]]
) -> Any:
    """The lookup's LookupResult, or the exit code after saying why there is none."""
    from pbft.client import ClientError
    from runtime.client import PaymentClient, PaymentTimeout

    async def main() -> Any:
        async with PaymentClient(cluster, arguments.client, timeout_s=arguments.timeout) as client:
            return await lookup(client)

    try:
        return trio.run(main)
    except PaymentTimeout:
        print(f"pbft: no f + 1 matching answers within {arguments.timeout:g} s", file=sys.stderr)
        return EXIT_NO_DECISION
    except ClientError as error:
        return _usage(str(error))


def _no(result: Any, what: str) -> int:
    if result.state == "not_found":
        print(f"pbft: no {what} (as of seq {result.as_of_seq})", file=sys.stderr)
    else:
        print(
            f"pbft: the replicas no longer hold the {what} ({result.state}: older than "
            "their history's retention, or executed before they caught up)",
            file=sys.stderr,
        )
    return EXIT_NO


def _print(result: Any, fields: dict[str, Any]) -> None:
    shown = {**fields, "as_of_seq": result.as_of_seq, "replicas": list(result.replicas)}
    print(json.dumps(shown), flush=True)


def _plain(value: Any) -> Any:
    """A record as JSON values: dataclasses as dicts, bytes as hex, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _usage(problem: str) -> int:
    print(f"pbft: {problem}", file=sys.stderr)
    return EXIT_USAGE
