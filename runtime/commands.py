"""The `pbft` commands that run the real network: replica, pay, verify-receipt, cluster up.

Thin shells: the work is in runtime.node (ReplicaNode), runtime.client (PaymentClient)
and pbft.receipt (verify_receipt). Exit codes as for every `pbft` command: 0 ok,
1 the answer is no (a rejected payment is still 0: it was decided), 2 bad arguments or
files, 3 an internal error; `pbft replica` adds 4 to 7 (REPLICA_EXIT_CODES).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

RUNTIME_COMMANDS = ("replica", "pay", "verify-receipt", "cluster", "balance")

# `pbft replica` exit codes: one per way it stops, so a supervisor can tell them apart.
EXIT_REPLICA_LOCKED = 4
EXIT_STORAGE_FAILED = 5
EXIT_STORAGE_CORRUPT = 6
EXIT_REPLICA_HALTED = 7
REPLICA_EXIT_CODES = """exit codes:
  0  stopped by SIGINT or SIGTERM
  2  bad arguments or files: the cluster file, the replica id, the private key (missing,
     not this replica's, readable by group or others), a data directory it cannot create
  3  internal error (a bug)
  4  this replica's log is locked: another process runs it already
  5  storage failed: opening, writing or fsyncing the log (see the OS error); restart
     once the disk is fixed, the log is read back and checked on start
  6  refused to start on a damaged log (the message names the file and byte offset)
  7  halted: its state diverged from the cluster's (for example a chain fork)
"""


def add_runtime_commands(commands: Any) -> None:
    replica = commands.add_parser(
        "replica",
        help="run one replica of a cluster (trio, TCP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=REPLICA_EXIT_CODES,
    )
    replica.add_argument("--cluster", required=True, help="DIR/cluster.toml")
    replica.add_argument("--id", type=int, required=True, help="the replica's id")
    replica.add_argument("--data", help="data directory (default: DIR/data-ID)")
    pay = commands.add_parser("pay", help="make one payment and keep its receipt")
    pay.add_argument("--cluster", required=True)
    pay.add_argument("--client", type=int, required=True, help="the paying client's id")
    pay.add_argument("--from", dest="payer", required=True, help="payer account")
    pay.add_argument("--to", dest="payee", required=True, help="payee account")
    pay.add_argument("--amount", type=int, required=True, help="integer minor units")
    pay.add_argument("--request-id", type=int, help="to retry a payment safely, reuse its id")
    pay.add_argument("--receipt", help="write the receipt to this file")
    pay.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    balance = commands.add_parser("balance", help="read a balance (f + 1 replicas agree)")
    balance.add_argument("--cluster", required=True)
    balance.add_argument("--account", required=True)
    balance.add_argument("--client", type=int, default=0, help="the asking client's id")
    balance.add_argument("--timeout", type=float, default=10.0)
    verify = commands.add_parser("verify-receipt", help="check a receipt offline")
    verify.add_argument("receipt", help="a receipt file written by pbft pay")
    verify.add_argument("--cluster", required=True)
    cluster = commands.add_parser("cluster", help="local clusters")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    up = actions.add_parser("up", help="start a local cluster on free 127.0.0.1 ports")
    up.add_argument("--replicas", type=int, default=4)
    up.add_argument("--clients", type=int, default=2)
    up.add_argument("--dir", required=True, help="keys, cluster.toml, data and logs go here")


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
    node = ReplicaNode(cluster, arguments.id, data)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope, node)
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
        )
        error = _leaf(raised, kinds)
        if isinstance(error, ClusterFileError | DataDirError):
            print(f"pbft: {error}", file=sys.stderr)
            return 2
        if isinstance(error, StorageLockedError):
            print(f"pbft: replica {arguments.id} is already running: {error}", file=sys.stderr)
            return EXIT_REPLICA_LOCKED
        if isinstance(error, StorageFailedError):
            print(f"pbft: replica {arguments.id}: storage failed: {error}", file=sys.stderr)
            return EXIT_STORAGE_FAILED
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


async def _cancel_on_signal(scope: trio.CancelScope, node: Any) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            node.log("signal", signal=signal.Signals(signum).name)
            scope.cancel()
            return


def _pay(arguments: argparse.Namespace) -> int:
    from runtime.client import PaymentClient, PaymentTimeout
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)
    if arguments.amount < 0 or arguments.amount >= 2**64:
        print("pbft: --amount must be a non-negative integer below 2**64", file=sys.stderr)
        return 2

    async def main() -> Any:
        async with PaymentClient(cluster, arguments.client, timeout_s=arguments.timeout) as client:
            return await client.pay(
                arguments.payer, arguments.payee, arguments.amount, arguments.request_id
            )

    try:
        decided = trio.run(main)
    except PaymentTimeout as error:
        print(f"pbft: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "request_id": decided.request_id,
                "outcome": decided.outcome,
                "reason": decided.reason,
                "seq": decided.seq,
            }
        )
    )
    if arguments.receipt and decided.receipt is not None:
        Path(arguments.receipt).write_bytes(decided.receipt.encode())
    return 0 if decided.receipt is not None else 1


def _balance(arguments: argparse.Namespace) -> int:
    from runtime.client import PaymentClient, PaymentTimeout
    from runtime.cluster import load_cluster

    cluster = load_cluster(arguments.cluster)

    async def main() -> Any:
        async with PaymentClient(cluster, arguments.client, timeout_s=arguments.timeout) as client:
            return await client.balance(arguments.account)

    try:
        read = trio.run(main)
    except PaymentTimeout as error:
        print(f"pbft: {error}", file=sys.stderr)
        return 1
    if not read.exists:
        print(f"pbft: no account {arguments.account!r}", file=sys.stderr)
        return 1
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
    return 0


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
    from runtime.cluster import CLUSTER_FILE_NAME, load_cluster, write_cluster

    root = Path(arguments.dir)
    path = root / CLUSTER_FILE_NAME
    if not path.exists():
        ports = free_ports(arguments.replicas)
        if ports != list(range(ports[0], ports[0] + len(ports))):
            # write_cluster numbers ports consecutively: find a free consecutive run.
            ports = _consecutive_free_ports(arguments.replicas)
        write_cluster(
            root, replicas=arguments.replicas, clients=arguments.clients, base_port=ports[0]
        )
    cluster = load_cluster(path)
    processes = []
    for replica in cluster.replicas:
        log_path = root / f"replica-{replica.replica_id}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until it stops
        command = replica_command(path, replica.replica_id)
        processes.append(
            (subprocess.Popen(command, stdout=log, stderr=log), log, replica, log_path)
        )
        print(
            f"replica {replica.replica_id}: {replica.host}:{replica.port}  log {log_path}",
            flush=True,
        )
    print(f"cluster file {path}; Ctrl-C stops every replica", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while all(process.poll() is None for process, *_ in processes):
            time.sleep(0.2)
        for process, _, replica, _ in processes:
            if process.poll() is not None:
                print(f"replica {replica.replica_id} exited with {process.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        for process, _log, _, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, log, _, _ in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
    return 0


def _consecutive_free_ports(count: int) -> list[int]:
    for _ in range(50):
        base = free_ports(1)[0]
        if base + count >= 65536:
            continue
        try:
            sockets = []
            for port in range(base, base + count):
                handle = socket.socket()
                handle.bind(("127.0.0.1", port))
                sockets.append(handle)
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for handle in sockets:
                handle.close()
    raise OSError("no run of free consecutive ports on 127.0.0.1")
