"""`pbft gateway`: the HTTP payment gateway (gateway/), optionally hosting a replica.

Everything the user can get wrong is checked here, before trio starts, and said in one
line with exit 2: the cluster file, each --client (known to the cluster, its private key
readable), the --listen address (loopback only), the --db path, --replica/--data. The work
is in gateway.server.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import sqlite3
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from cli.exits import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, leaf

GATEWAY_EXIT_CODES = """The API is served on --listen (loopback only: plain HTTP, put a TLS proxy in
front of it); API keys come from `pbft gateway-key create --db PATH --client I`. It logs JSON
lines on stderr (`listening` carries the URL, useful with port 0). SIGTERM or SIGINT: stop
accepting, answer the requests in flight (up to --graceful-timeout-s), then stop.

exit codes:
  0  stopped by SIGTERM or SIGINT
  2  bad arguments or files: the cluster file, a --client (unknown, or its key missing or
     readable by others), --listen (not HOST:PORT, not loopback, or the port is taken),
     --db, --replica/--data
  3  an internal error (a bug)
  4  --replica: that replica's log is locked (another process runs it)
  5  --replica: its storage failed (see the OS error)
  6  --replica: refused to start on a damaged log
  7  --replica: halted, its state diverged from the cluster's"""

DEFAULT_DB_NAME = "gateway.sqlite"
MAX_CLUSTER_TIMEOUT_S = 3600.0
MAX_GRACEFUL_TIMEOUT_S = 600.0


def add_gateway(commands: Any) -> None:
    parser = commands.add_parser(
        "gateway",
        help="serve the HTTP payment API (optionally hosting a replica)",
        epilog=GATEWAY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cluster", required=True, help="DIR/cluster.toml")
    parser.add_argument(
        "--client",
        type=int,
        action="append",
        required=True,
        help="a client id the gateway acts for (repeat for several); its private key is read "
        "from the cluster directory",
    )
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (loopback only)")
    parser.add_argument(
        "--db", help=f"the gateway's SQLite database (default: DIR/{DEFAULT_DB_NAME})"
    )
    parser.add_argument("--replica", type=int, help="also run this replica, in this process")
    parser.add_argument("--data", help="--replica's data directory (default: DIR/data-ID)")
    parser.add_argument(
        "--cluster-timeout-s",
        type=float,
        default=10.0,
        help="seconds to wait for the cluster's decision before answering 504 (default 10)",
    )
    parser.add_argument(
        "--webhook-allow-private",
        action="store_true",
        help="let webhook endpoints point at loopback/private addresses (tests, local setups)",
    )
    parser.add_argument(
        "--graceful-timeout-s",
        type=float,
        default=15.0,
        help="on SIGTERM, seconds the requests in flight get to finish (default 15)",
    )


def _check_seconds(option: str, value: float, most: float) -> str | None:
    if not math.isfinite(value) or not 0 < value <= most:
        return f"{option}: {value:g} is not in (0, {most:g}] seconds"
    return None


def _check(arguments: argparse.Namespace, cluster: Any) -> str | None:
    """What is wrong with the arguments, in one line; None if nothing."""
    from gateway.server import ListenAddressError, parse_listen
    from runtime.cluster import ClusterFileError

    try:
        parse_listen(arguments.listen)
    except ListenAddressError as error:
        return str(error)
    problem = _check_seconds(
        "--cluster-timeout-s", arguments.cluster_timeout_s, MAX_CLUSTER_TIMEOUT_S
    ) or _check_seconds(
        "--graceful-timeout-s", arguments.graceful_timeout_s, MAX_GRACEFUL_TIMEOUT_S
    )
    if problem:
        return problem
    seen: list[int] = []
    for client in arguments.client:
        if client in seen:
            return f"--client: {client} is given twice"
        seen.append(client)
        if client not in cluster.client_keys:
            known = ", ".join(str(known) for known in sorted(cluster.client_keys)[:10])
            return f"--client: no client {client} in this cluster ({known})"
        try:
            cluster.load_private_key("client", client)
        except ClusterFileError as error:
            return str(error)
    db = _db_path(arguments, cluster)
    if db.is_dir():
        return f"--db: {db} is a directory"
    if not db.parent.is_dir():
        return f"--db: directory {db.parent} does not exist"
    if arguments.data is not None and arguments.replica is None:
        return "--data: only with --replica"
    if arguments.replica is not None:
        if arguments.replica not in [replica.replica_id for replica in cluster.replicas]:
            return f"--replica: no replica {arguments.replica} in this cluster"
        try:
            cluster.load_private_key("replica", arguments.replica)
        except ClusterFileError as error:
            return str(error)
        data = _data_path(arguments, cluster)
        if data.exists() and not data.is_dir():
            return f"--data: {data} is not a directory"
    return None


def _db_path(arguments: argparse.Namespace, cluster: Any) -> Path:
    return Path(arguments.db) if arguments.db else cluster.directory / DEFAULT_DB_NAME


def _data_path(arguments: argparse.Namespace, cluster: Any) -> Path:
    if arguments.data:
        return Path(arguments.data)
    return cluster.directory / f"data-{arguments.replica}"


def gateway(arguments: argparse.Namespace) -> int:
    from cli.cluster import _replica_stops
    from gateway.server import log_line, parse_listen, run_gateway
    from gateway.store import GatewayStore, StoreError
    from pbft.receipt import short_id
    from runtime.cluster import load_cluster
    from runtime.node import ReplicaNode

    cluster = load_cluster(arguments.cluster)
    problem = _check(arguments, cluster)
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE
    listen = parse_listen(arguments.listen)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    cluster_id = short_id(cluster.cluster_id)
    try:
        store = GatewayStore(_db_path(arguments, cluster))
    except StoreError as error:
        print(f"pbft: --db: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        adopted = store.database.bind_cluster(cluster_id, arguments.client)
    except (StoreError, sqlite3.Error) as error:
        store.close()
        print(f"pbft: --db: {error}", file=sys.stderr)
        return EXIT_USAGE
    if adopted:  # written before databases recorded their cluster
        log_line(sys.stderr, "db_adopted", db=str(store.path), cluster=cluster_id)
    node = None
    if arguments.replica is not None:
        node = ReplicaNode(cluster, arguments.replica, _data_path(arguments, cluster))
    try:
        trio.run(
            partial(
                run_gateway,
                cluster,
                arguments.client,
                store,
                listen,
                timeout_s=arguments.cluster_timeout_s,
                webhook_allow_private=arguments.webhook_allow_private,
                node=node,
                graceful_timeout_s=arguments.graceful_timeout_s,
            )
        )
    except BaseException as raised:
        if leaf(raised, (KeyboardInterrupt,)) is not None:
            print("pbft: gateway interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        refused = leaf(raised, (OSError,))
        if isinstance(refused, OSError) and refused.errno == errno.EADDRINUSE:
            print(
                f"pbft: --listen {arguments.listen}: address in use (another process "
                "listens there, or on the embedded replica's port)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if node is not None:
            stops = _replica_stops()
            error = leaf(raised, tuple(kind for kind, _, _ in stops))
            for kind, code, template in stops:
                if isinstance(error, kind) and template:
                    line = template.format(replica=arguments.replica, error=error)
                    print(line, file=sys.stderr)
                    return code
        raise
    finally:
        store.close()
    return EXIT_OK
