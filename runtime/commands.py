"""The `pbft` commands that run the real network: replica, pay, verify-receipt, cluster up.

Thin shells: the work is in runtime.node (ReplicaNode), runtime.client (PaymentClient)
and pbft.receipt (verify_receipt). Exit codes: 0 ok, 1 the answer is no (pay: rejected;
balance: no such account), 2 bad arguments or files (always one line, checked before
anything is sent), 3 an internal error (a bug), 4 no decision within the timeout (pay
prints the request id to retry with); `pbft replica` has its own 4 to 7
(REPLICA_EXIT_CODES). Each command's --help lists its own.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio

RUNTIME_COMMANDS = ("replica", "pay", "verify-receipt", "cluster", "balance")
EXIT_OK = 0
EXIT_NO = 1  # pay: rejected; balance: no such account
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_NO_DECISION = 4  # no decision within the timeout: retry with the same request id


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
UP_EXIT_CODES = """A replica that dies is reported on stderr (its id, exit status or signal,
last log line); the others keep running. With --restart it is started again from its log
after 0.5 s, 1 s, 2 s, ... (at most 30 s); after --max-restarts quick deaths in a row it
is left down. SIGINT or SIGTERM stops every replica.

exit codes:
  0  stopped by SIGINT or SIGTERM
  1  every replica has stopped and none is to be restarted
  2  bad arguments, or --replicas/--clients differ from the cluster in --dir
  3  an internal error (a bug)"""

# `pbft replica` exit codes: one per way it stops, so a supervisor can tell them apart.
EXIT_REPLICA_LOCKED = 4
EXIT_STORAGE_FAILED = 5
EXIT_STORAGE_CORRUPT = 6
EXIT_REPLICA_HALTED = 7
REPLICA_EXIT_CODES = """exit codes:
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


def add_runtime_commands(commands: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    replica = commands.add_parser(
        "replica",
        help="run one replica of a cluster (trio, TCP)",
        epilog=REPLICA_EXIT_CODES,
        formatter_class=formatter,
    )
    replica.add_argument("--cluster", required=True, help="DIR/cluster.toml")
    replica.add_argument("--id", type=int, required=True, help="the replica's id")
    replica.add_argument("--data", help="data directory (default: DIR/data-ID)")
    pay = commands.add_parser(
        "pay",
        help="make one payment and keep its receipt",
        epilog=PAY_EXIT_CODES,
        formatter_class=formatter,
    )
    pay.add_argument("--cluster", required=True)
    pay.add_argument("--client", type=int, required=True, help="the paying client's id")
    pay.add_argument("--from", dest="payer", required=True, help="payer account")
    pay.add_argument("--to", dest="payee", required=True, help="payee account")
    pay.add_argument("--amount", type=int, required=True, help="integer minor units")
    pay.add_argument("--request-id", type=int, help="to retry a payment safely, reuse its id")
    pay.add_argument("--receipt", help="write the receipt to this file")
    pay.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    balance = commands.add_parser(
        "balance",
        help="read a balance (f + 1 replicas agree)",
        epilog=BALANCE_EXIT_CODES,
        formatter_class=formatter,
    )
    balance.add_argument("--cluster", required=True)
    balance.add_argument("--account", required=True)
    balance.add_argument("--client", type=int, default=0, help="the asking client's id")
    balance.add_argument("--timeout", type=float, default=10.0)
    verify = commands.add_parser("verify-receipt", help="check a receipt offline")
    verify.add_argument("receipt", help="a receipt file written by pbft pay")
    verify.add_argument("--cluster", required=True)
    cluster = commands.add_parser("cluster", help="local clusters")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    up = actions.add_parser(
        "up",
        help="start and supervise a local cluster on free 127.0.0.1 ports",
        epilog=UP_EXIT_CODES,
        formatter_class=formatter,
    )
    up.add_argument(
        "--replicas", type=int, help="for a new cluster (default 4); must match an existing one"
    )
    up.add_argument(
        "--clients", type=int, help="for a new cluster (default 2); must match an existing one"
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


def run_runtime_command(arguments: argparse.Namespace) -> int:
    from runtime.cluster import ClusterFileError

    try:
        if arguments.command == "replica":
            return _replica(arguments)
        if arguments.command == "pay":
            return _pay(arguments)
        if arguments.command == "verify-receipt":
            return _verify(arguments)
        if arguments.command == "balance":
            return _balance(arguments)
        if arguments.command == "cluster":
            return _cluster_up(arguments)
    except ClusterFileError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return 2
    return 2


def _replica(arguments: argparse.Namespace) -> int:
    from runtime.cluster import ClusterFileError, load_cluster
    from runtime.node import DataDirError, ReplicaHalted, ReplicaNode
    from runtime.storage import StorageCorruptError, StorageFailedError, StorageLockedError

    cluster = load_cluster(arguments.cluster)
    cluster.replica(arguments.id)  # a clear error for an unknown id
    # The key before anything is created, and outside trio, so its error is one line.
    cluster.load_private_key("replica", arguments.id)
    data = Path(arguments.data) if arguments.data else cluster.directory / f"data-{arguments.id}"
    if data.exists() and not data.is_dir():
        print(f"pbft: --data: {data} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    node = ReplicaNode(cluster, arguments.id, data)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # Listening for signals before the store's recovery, which blocks: a Ctrl-C
            # then waits for it and stops cleanly.
            await nursery.start(_cancel_on_signal, nursery.cancel_scope, node)
            await node.run()

    try:
        trio.run(main)
    except BaseException as raised:  # noqa: BLE001 - unwrapped below, re-raised if unknown
        kinds = (
            ClusterFileError,
            DataDirError,
            StorageLockedError,
            StorageFailedError,
            StorageCorruptError,
            ReplicaHalted,
            OSError,
            KeyboardInterrupt,
        )
        error = _leaf(raised, kinds)
        if isinstance(error, KeyboardInterrupt):
            print(f"pbft: replica {arguments.id} interrupted", file=sys.stderr)
            return 130
        if isinstance(error, ClusterFileError | DataDirError):
            print(f"pbft: {error}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(error, StorageLockedError):
            print(f"pbft: replica {arguments.id} is already running: {error}", file=sys.stderr)
            return EXIT_REPLICA_LOCKED
        if isinstance(error, StorageFailedError):
            print(f"pbft: replica {arguments.id}: storage failed: {error}", file=sys.stderr)
            return EXIT_STORAGE_FAILED
        if isinstance(error, OSError):
            # The port (or another OS refusal), not a bug: say which and stop.
            where = f" ({error.filename})" if error.filename else ""
            if error.errno == errno.EADDRINUSE:
                address = cluster.replica(arguments.id)
                where = f" ({address.host}:{address.port}: another process listens there)"
            reason = error.strerror or str(error)
            print(f"pbft: replica {arguments.id}: {reason}{where}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(error, StorageCorruptError):
            print(f"pbft: refusing to start on damaged storage: {error}", file=sys.stderr)
            return EXIT_STORAGE_CORRUPT
        if isinstance(error, ReplicaHalted):
            print(f"pbft: replica {arguments.id} halted: {error}", file=sys.stderr)
            return EXIT_REPLICA_HALTED
        raise
    return 0


def _leaf(raised: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of one of `kinds` inside (possibly nested) exception groups."""
    if isinstance(raised, kinds):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            found = _leaf(inner, kinds)
            if found is not None:
                return found
    return None


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
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            node.log("signal", signal=signal.Signals(signum).name)
            break
    scope.cancel()


def _pay(arguments: argparse.Namespace) -> int:
    from pbft.client import ClientError
    from runtime.client import PaymentClient, PaymentTimeout
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    problem = (
        _check_timeout(arguments.timeout)
        or _check_uint64("--amount", arguments.amount)
        or _check_uint64("--request-id", arguments.request_id)
        or _check_account("--from", arguments.payer)
        or _check_account("--to", arguments.payee)
        or _check_client(cluster, arguments.client)
        or _check_output_file("--receipt", arguments.receipt)
    )
    if problem:
        print(f"pbft: {problem}", file=sys.stderr)
        return EXIT_USAGE

    sent: list[int] = []

    async def main() -> Any:
        async with PaymentClient(cluster, arguments.client, timeout_s=arguments.timeout) as client:
            request_id = arguments.request_id
            if request_id is None:
                request_id = client.new_request_id()
            # Said before sending: whatever happens next, the user can retry with it.
            print(f"pbft: request id {request_id}", file=sys.stderr, flush=True)
            sent.append(request_id)
            return await client.pay(arguments.payer, arguments.payee, arguments.amount, request_id)

    try:
        decided = trio.run(main)
    except PaymentTimeout as error:
        print(
            f"pbft: no decision within {arguments.timeout:g} s; the payment may still go "
            f"through: retry with --request-id {error.request_id} (never with a new id)",
            file=sys.stderr,
        )
        return EXIT_NO_DECISION
    except ClientError as error:
        print(f"pbft: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as raised:
        if sent and _leaf(raised, (KeyboardInterrupt,)) is not None:
            print(
                f"pbft: interrupted; the payment may still go through: retry with "
                f"--request-id {sent[0]} to learn its outcome",
                file=sys.stderr,
            )
            return 130
        raise
    print(
        json.dumps(
            {
                "request_id": decided.request_id,
                "outcome": decided.outcome,
                "reason": decided.reason,
                "seq": decided.seq,
            }
        ),
        flush=True,
    )
    if arguments.receipt and decided.receipt is not None:
        try:
            _write_atomically(Path(arguments.receipt), decided.receipt.encode())
        except OSError as error:
            print(
                f"pbft: --receipt: cannot write {arguments.receipt}: {error.strerror}; the "
                f"payment was decided: pay again with --request-id {decided.request_id} "
                "to get its receipt",
                file=sys.stderr,
            )
            return EXIT_USAGE
    if decided.outcome == "confirmed":
        return EXIT_OK
    if decided.outcome == "rejected":
        print(f"pbft: payment rejected: {decided.reason}", file=sys.stderr)
        return EXIT_NO
    print(
        f"pbft: the outcome of request {decided.request_id} is unknown: the replicas no "
        f"longer remember it ({decided.reason})",
        file=sys.stderr,
    )
    return EXIT_NO_DECISION


def _balance(arguments: argparse.Namespace) -> int:
    from pbft.client import ClientError
    from runtime.client import PaymentClient, PaymentTimeout
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    problem = (
        _check_timeout(arguments.timeout)
        or _check_account("--account", arguments.account)
        or _check_client(cluster, arguments.client)
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
                "balance": read.balance,
                "as_of_seq": read.seq,
                "replicas": list(read.replicas),
            }
        )
    )
    return EXIT_OK


def _check_timeout(timeout: float) -> str | None:
    from runtime.client import MAX_TIMEOUT_S

    if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        return f"--timeout: {timeout:g} is not in (0, {MAX_TIMEOUT_S:g}] seconds"
    return None


def _check_uint64(option: str, value: int | None) -> str | None:
    if value is not None and not 0 <= value < 2**64:
        return f"{option}: {value} is not in 0..2**64-1"
    return None


def _check_account(option: str, name: str) -> str | None:
    from pbft.ledger import MAX_ACCOUNT_NAME_LENGTH

    if not 0 < len(name) <= MAX_ACCOUNT_NAME_LENGTH:
        return (
            f"{option}: an account name has 1..{MAX_ACCOUNT_NAME_LENGTH} characters, "
            f"this one {len(name)}"
        )
    return None


def _check_client(cluster: Any, client_id: int) -> str | None:
    if client_id not in cluster.client_keys:
        known = sorted(cluster.client_keys)
        listed = ", ".join(str(client) for client in known[:10])
        more = ", ..." if len(known) > 10 else ""
        return (
            f"--client: client {client_id} is unknown to the cluster {cluster.path} "
            f"(its clients: {listed}{more})"
        )
    return None


def _check_output_file(option: str, name: str | None) -> str | None:
    """A file we will write after the fact: fail now, before anything is sent."""
    if name is None:
        return None
    if not name:
        return f"{option}: an empty file name"
    path = Path(name)
    parent = path.parent
    if path.is_dir():
        return f"{option}: {name} is a directory, not a file"
    if not parent.is_dir():
        return f"{option}: the directory {parent} does not exist"
    writable = os.access(parent, os.W_OK | os.X_OK)
    if not writable or (path.exists() and not os.access(path, os.W_OK)):
        return f"{option}: {name} is not writable"
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _verify(arguments: argparse.Namespace) -> int:
    """Exit 0 valid, 1 invalid (one line saying why), 2 when the input is not a receipt."""
    from pbft.receipt import MAX_RECEIPT_BYTES, ReceiptError, UnreadableReceipt, verify_receipt
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    path = Path(arguments.receipt)
    try:
        # is_file first: a directory or a FIFO is not a receipt (and a FIFO could block).
        if not path.is_file():
            problem = "no such file" if not path.exists() else "not a regular file"
            print(f"pbft: {arguments.receipt}: {problem}", file=sys.stderr)
            return 2
        with path.open("rb") as handle:
            data = handle.read(MAX_RECEIPT_BYTES + 1)
    except OSError as error:
        print(f"pbft: cannot read {arguments.receipt}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        verified = verify_receipt(data, cluster.keyring(), cluster.cluster_id)
    except UnreadableReceipt as error:
        print(f"pbft: {arguments.receipt}: {error}", file=sys.stderr)
        return 2
    except ReceiptError as error:
        print(f"invalid receipt: {error}")
        return 1
    fields = {**verified.__dict__, "cluster_id": verified.cluster_id.hex()}
    print(json.dumps({"valid": True, **fields}, default=list))
    return 0


def replica_command(cluster_path: Path, replica_id: int) -> list[str]:
    """The command line that runs one replica of a cluster file as its own process."""
    return [
        sys.executable,
        "-m",
        "pbft.cli",
        "replica",
        "--cluster",
        str(cluster_path),
        "--id",
        str(replica_id),
    ]


def free_ports(count: int) -> list[int]:
    """Ports the OS just handed out on 127.0.0.1 (closed again, so normally still free)."""
    sockets = []
    for _ in range(count):
        handle = socket.socket()
        handle.bind(("127.0.0.1", 0))
        sockets.append(handle)
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


def _cluster_up(arguments: argparse.Namespace) -> int:
    import fcntl

    from pbft.config import MAX_REPLICAS, MIN_REPLICAS
    from runtime.cluster import CLUSTER_FILE_NAME, MAX_CLIENTS, load_cluster, write_cluster
    from runtime.supervisor import Supervisor

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
    elif not 0 <= arguments.max_restarts <= 1000:
        problem = f"--max-restarts: {arguments.max_restarts} is not in 0..1000"
    elif root.exists() and not root.is_dir():
        problem = f"--dir: {root} is not a directory"
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
            )
        except ValueError as error:
            print(f"pbft: cannot create a cluster in {root}: {error}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as error:
            reason = error.strerror or str(error)
            print(f"pbft: cannot create a cluster in {root}: {reason}", file=sys.stderr)
            return EXIT_USAGE
        cluster = load_cluster(path)
    # One supervisor per cluster directory: a second would fight the first for the ports.
    try:
        lock = open(root / "cluster-up.lock", "w")  # noqa: SIM115 - held until we return
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
                    for replica in cluster.replicas
                },
                root,
                restart=arguments.restart,
                max_restarts=arguments.max_restarts,
            ),
            cluster,
            path,
        )


def _supervise(supervisor: Any, cluster: Any, path: Path) -> int:
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
                f"log {path.parent / f'replica-{replica.replica_id}.log'}",
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


# Where Linux hands out ports for outgoing connections, when /proc does not say.
DEFAULT_EPHEMERAL_PORTS = (32768, 60999)
# Ports below this are left to system services.
LOWEST_CLUSTER_PORT = 10000


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_PORTS


def consecutive_free_ports(count: int) -> list[int]:
    """`count` consecutive ports free on 127.0.0.1 a moment ago, outside the OS's ephemeral
    range: a replica that restarts must get its port back, and meanwhile the OS hands out
    ephemeral ports to every outgoing connection on the machine. The search starts at a
    random place, so clusters set up at once rarely race for the same ports."""
    low, high = ephemeral_port_range()
    ranges = [
        (start, end)
        for start, end in ((LOWEST_CLUSTER_PORT, low - 1), (high + 1, 65535))
        if end - start + 1 >= count
    ]
    candidates = [base for start, end in ranges for base in range(start, end - count + 2, count)]
    if not candidates:
        candidates = [free_ports(1)[0]]
    offset = int.from_bytes(os.urandom(4), "big") % len(candidates)
    for index in range(min(len(candidates), 500)):
        base = candidates[(offset + index) % len(candidates)]
        if base + count > 65536:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                handle = socket.socket()
                sockets.append(handle)
                handle.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for handle in sockets:
                handle.close()
    raise OSError("no run of free consecutive ports on 127.0.0.1")
