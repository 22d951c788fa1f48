"""`pbft replica` and `pbft cluster up`: run one replica, or supervise a local cluster.

The work is in runtime.node (ReplicaNode) and runtime.supervisor (Supervisor); here are the
arguments, the signals, and which exit code each way of stopping gets.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from cli.exits import (
    EXIT_INTERRUPTED,
    EXIT_NO,
    EXIT_OK,
    EXIT_REPLICA_HALTED,
    EXIT_REPLICA_LOCKED,
    EXIT_STORAGE_CORRUPT,
    EXIT_STORAGE_FAILED,
    EXIT_USAGE,
    leaf,
)

REPLICA_EXIT_CODES = """SIGUSR1 logs a `statistics` line (events handled, fsyncs, frames in and out
since start); it is also logged at stop.

exit codes:
  0  stopped by SIGINT or SIGTERM
  2  bad arguments or files: the cluster file, the replica id, the private key (missing,
     not this replica's, readable by group or others), a data directory it cannot
     create, or the port is taken
  3  internal error (a bug)
  4  this replica's log is locked: another process runs it already
  5  storage failed: opening, writing or fsyncing the log (see the OS error); restart
     once the disk is fixed, the log is read back and checked on start
  6  refused to start on a damaged log (the message names the file and byte offset)
  7  halted: its state diverged from the cluster's (for example a chain fork)
"""


UP_EXIT_CODES = """A replica that dies is reported on stderr (its id, exit status or signal,
last log line); the others keep running. With --restart it is started again from its log
after 0.5 s, 1 s, 2 s, ... (at most 30 s); after --max-restarts quick deaths in a row it
is left down. SIGINT or SIGTERM stops every replica.

exit codes:
  0  stopped by SIGINT or SIGTERM
  1  every replica has stopped and none is to be restarted
  2  bad arguments, or --replicas/--clients differ from the cluster in --dir
  3  an internal error (a bug)"""


def add_replica(commands: Any) -> None:
    replica = commands.add_parser(
        "replica",
        help="run one replica of a cluster (trio, TCP)",
        epilog=REPLICA_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replica.add_argument("--cluster", required=True, help="DIR/cluster.toml")
    replica.add_argument("--id", type=int, required=True, help="the replica's id")
    replica.add_argument("--data", help="data directory (default: DIR/data-ID)")
    replica.add_argument(
        "--metrics",
        metavar="127.0.0.1:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback addresses only)",
    )


def add_cluster(commands: Any) -> None:
    cluster = commands.add_parser("cluster", help="local clusters")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    up = actions.add_parser(
        "up",
        help="start and supervise a local cluster on free 127.0.0.1 ports",
        epilog=UP_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "--replicas", type=int, help="for a new cluster (default 4); must match an existing one"
    )
    up.add_argument(
        "--clients", type=int, help="for a new cluster (default 2); must match an existing one"
    )
    up.add_argument(
        "--generated-accounts",
        type=int,
        metavar="N",
        help="for a new cluster: N genesis accounts written as a count, a [genesis] rule "
        "(default: 2 listed accounts per client); must match an existing one",
    )
    up.add_argument("--dir", required=True, help="keys, cluster.toml, data and logs go here")
    up.add_argument(
        "--restart",
        action="store_true",
        help="restart a replica that dies, from its log, after a growing backoff",
    )
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="give up on a replica after this many quick deaths in a row (default 5)",
    )
    up.add_argument(
        "--metrics-base-port",
        type=int,
        metavar="PORT",
        help="replica I serves Prometheus metrics on 127.0.0.1:PORT+I (pbft replica --metrics)",
    )


def _port_refused(error: OSError, replica_id: int, cluster: Any) -> str:
    # The port (or another OS refusal), not a bug: say which and stop.
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.EADDRINUSE:
        address = cluster.replica(replica_id)
        where = f" ({address.host}:{address.port}: another process listens there)"
    reason = error.strerror or str(error)
    return f"pbft: replica {replica_id}: {reason}{where}"


def _replica_stops() -> tuple[tuple[type[BaseException], int, str], ...]:
    """How `pbft replica` reports each way it stops: the first of these kinds found in what
    trio raised (in this order), its exit code and its one line, a template of {replica}
    and {error} (an OSError other than the storage's: _port_refused). Anything else is
    re-raised: a bug, exit 3."""
    from runtime.cluster import ClusterFileError
    from runtime.metrics import MetricsAddressError
    from runtime.node import DataDirError, ReplicaHalted
    from runtime.storage import StorageCorruptError, StorageFailedError, StorageLockedError

    return (
        (KeyboardInterrupt, EXIT_INTERRUPTED, "pbft: replica {replica} interrupted"),
        (ClusterFileError, EXIT_USAGE, "pbft: {error}"),
        (DataDirError, EXIT_USAGE, "pbft: {error}"),
        (MetricsAddressError, EXIT_USAGE, "pbft: {error}"),
        (
            StorageLockedError,
            EXIT_REPLICA_LOCKED,
            "pbft: replica {replica} is already running: {error}",
        ),
        (
            StorageFailedError,
            EXIT_STORAGE_FAILED,
            "pbft: replica {replica}: storage failed: {error}",
        ),
        (OSError, EXIT_USAGE, ""),  # the port or another OS refusal: _port_refused says it
        (
            StorageCorruptError,
            EXIT_STORAGE_CORRUPT,
            "pbft: refusing to start on damaged storage: {error}",
        ),
        (ReplicaHalted, EXIT_REPLICA_HALTED, "pbft: replica {replica} halted: {error}"),
    )


def replica(arguments: argparse.Namespace) -> int:
    from runtime.cluster import load_cluster
    from runtime.node import ReplicaNode

    cluster = load_cluster(arguments.cluster)
    cluster.replica(arguments.id)  # a clear error for an unknown id
    # The key before anything is created, and outside trio, so its error is one line.
    cluster.load_private_key("replica", arguments.id)
    data = Path(arguments.data) if arguments.data else cluster.directory / f"data-{arguments.id}"
    if data.exists() and not data.is_dir():
        print(f"pbft: --data: {data} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    metrics_address = None
    if arguments.metrics is not None:
        from runtime.metrics import MetricsAddressError, parse_address

        try:
            metrics_address = parse_address(arguments.metrics)
        except MetricsAddressError as error:
            print(f"pbft: {error}", file=sys.stderr)
            return EXIT_USAGE
    node = ReplicaNode(cluster, arguments.id, data)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # Listening for signals before the store's recovery, which blocks: a Ctrl-C
            # then waits for it and stops cleanly.
            await nursery.start(_cancel_on_signal, nursery.cancel_scope, node)
            if metrics_address is not None:
                from runtime.metrics import MetricsServer, open_metrics_listener, registry_for

                listener = await open_metrics_listener(*metrics_address)
                nursery.start_soon(MetricsServer(registry_for(node)).serve, listener)
            await node.run()

    try:
        trio.run(main)
    except BaseException as raised:  # unwrapped below, re-raised if unknown
        stops = _replica_stops()
        error = leaf(raised, tuple(kind for kind, _, _ in stops))
        for kind, code, template in stops:
            if isinstance(error, kind):
                if kind is OSError and isinstance(error, OSError):
                    line = _port_refused(error, arguments.id, cluster)
                else:
                    line = template.format(replica=arguments.id, error=error)
                print(line, file=sys.stderr)
                return code
        raise
    return EXIT_OK


async def _cancel_on_signal(
    scope: trio.CancelScope,
    node: Any,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # The receiver restores these on exit and hands them any signal still pending: ignored,
    # so a second signal (Ctrl-C reaches `cluster up` and its replicas, and it then sends
    # SIGTERM) cannot cut the clean stop short. SIGKILL still works.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGUSR1:  # `pbft bench` reads counters between its phases
                node.log_statistics()
                continue
            node.log("signal", signal=signal.Signals(signum).name)
            break
    scope.cancel()


def cluster_up(arguments: argparse.Namespace) -> int:
    import fcntl

    from pbft.config import MAX_REPLICAS, MIN_REPLICAS
    from pbft.ledger import MAX_GENERATED_ACCOUNTS
    from runtime.cluster import CLUSTER_FILE_NAME, MAX_CLIENTS, load_cluster, write_cluster
    from runtime.ports import consecutive_free_ports
    from runtime.supervisor import Supervisor, replica_command

    root = Path(arguments.dir)
    path = root / CLUSTER_FILE_NAME
    problem = None
    if arguments.replicas is not None and not MIN_REPLICAS <= arguments.replicas <= MAX_REPLICAS:
        problem = (
            f"--replicas: {arguments.replicas} is not in {MIN_REPLICAS}..{MAX_REPLICAS} "
            "(n = 3f + 1 replicas tolerate f faulty ones; the least is 4, for f = 1)"
        )
    elif arguments.clients is not None and not 1 <= arguments.clients <= MAX_CLIENTS:
        problem = f"--clients: {arguments.clients} is not in 1..{MAX_CLIENTS}"
    elif arguments.generated_accounts is not None and not (
        1 <= arguments.generated_accounts <= MAX_GENERATED_ACCOUNTS
    ):
        problem = (
            f"--generated-accounts: {arguments.generated_accounts} is not in "
            f"1..{MAX_GENERATED_ACCOUNTS:,}"
        )
    elif not 0 <= arguments.max_restarts <= 1000:
        problem = f"--max-restarts: {arguments.max_restarts} is not in 0..1000"
    elif root.exists() and not root.is_dir():
        problem = f"--dir: {root} is not a directory"
    elif arguments.metrics_base_port is not None and not 1 <= arguments.metrics_base_port <= 65535:
        problem = f"--metrics-base-port: {arguments.metrics_base_port} is not in 1..65535"
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if path.exists():
        cluster = load_cluster(path)
        mismatch = [
            f"--{option} {wanted}"
            for option, wanted, held in (
                ("replicas", arguments.replicas, len(cluster.replicas)),
                ("clients", arguments.clients, len(cluster.client_keys)),
                ("generated-accounts", arguments.generated_accounts, len(cluster.accounts)),
            )
            if wanted is not None and wanted != held
        ]
        if mismatch:
            print(
                f"pbft: {path} holds a cluster of {len(cluster.replicas)} replicas and "
                f"{len(cluster.client_keys)} clients, not {' '.join(mismatch)}: omit them to "
                "start it, or choose another --dir for a new cluster",
                file=sys.stderr,
            )
            return EXIT_USAGE
    else:
        replicas = 4 if arguments.replicas is None else arguments.replicas
        try:
            # Consecutive (write_cluster numbers them so) and outside the ephemeral range, so
            # a replica restarted by --restart gets its port back.
            ports = consecutive_free_ports(replicas)
            write_cluster(
                root,
                replicas=replicas,
                clients=2 if arguments.clients is None else arguments.clients,
                base_port=ports[0],
                generated_accounts=arguments.generated_accounts,
            )
        except ValueError as error:
            print(f"pbft: cannot create a cluster in {root}: {error}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as error:
            reason = error.strerror or str(error)
            print(f"pbft: cannot create a cluster in {root}: {reason}", file=sys.stderr)
            return EXIT_USAGE
        cluster = load_cluster(path)
    base = arguments.metrics_base_port
    if base is not None and base + len(cluster.replicas) - 1 > 65535:
        last = base + len(cluster.replicas) - 1
        print(f"pbft: --metrics-base-port: {base}: replica ports run to {last}", file=sys.stderr)
        return EXIT_USAGE
    # One supervisor per cluster directory: a second would fight the first for the ports.
    try:
        lock = open(root / "cluster-up.lock", "w")  # held until we return
    except OSError as error:
        print(f"pbft: cannot write in {root}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"pbft: another `pbft cluster up` is running on {root}", file=sys.stderr)
            return EXIT_USAGE
        return _supervise(
            Supervisor(
                {
                    replica.replica_id: replica_command(path, replica.replica_id)
                    + (
                        []
                        if base is None
                        else ["--metrics", f"127.0.0.1:{base + replica.replica_id}"]
                    )
                    for replica in cluster.replicas
                },
                root,
                restart=arguments.restart,
                max_restarts=arguments.max_restarts,
            ),
            cluster,
            path,
            base,
        )


def _metrics_url(base: int | None, replica_id: int) -> str:
    return "" if base is None else f"  metrics http://127.0.0.1:{base + replica_id}/metrics"


def _supervise(
    supervisor: Any, cluster: Any, path: Path, metrics_base_port: int | None = None
) -> int:
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    # Also when started in the background, where a shell leaves SIGINT ignored.
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start_all()
        for replica in cluster.replicas:
            print(
                f"replica {replica.replica_id}: {replica.host}:{replica.port}  "
                f"pid {supervisor.pid(replica.replica_id)}  "
                f"log {path.parent / f'replica-{replica.replica_id}.log'}"
                + _metrics_url(metrics_base_port, replica.replica_id),
                flush=True,
            )
        restarting = "restarts a replica that dies" if supervisor.restart else "does not restart"
        print(
            f"cluster file {path}; f = {cluster.config.fault_tolerance}; "
            f"this supervisor {restarting}; Ctrl-C stops every replica",
            flush=True,
        )
        while not stopping:
            if not supervisor.poll():
                print("pbft: every replica has stopped", file=sys.stderr)
                return EXIT_NO
            time.sleep(0.1)
    finally:
        supervisor.stop_all()
        print("pbft: every replica stopped", file=sys.stderr)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK
