"""Closed-loop load on a local cluster of replica processes: throughput and latency.

    python -m runtime.bench [--replicas 4] [--clients 4] [--concurrency 8] [--seconds 10]

Starts the replicas as processes on 127.0.0.1 (free ports, a temporary directory),
then every client runs `concurrency` tasks that each pay, wait for the receipt, and pay
again, for `seconds`. Prints payments per second and latency percentiles, next to a
baseline measured in the same run: one client, one task (the latency of a lone payment).
Figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from pbft.genesis import account_name
from pbft.stats import nearest_rank
from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.ports import free_ports
from runtime.supervisor import replica_command


async def _load(cluster_path: Path, clients: int, concurrency: int, seconds: float) -> list[float]:
    cluster = load_cluster(cluster_path)
    latencies_ms: list[float] = []
    deadline = trio.current_time() + seconds

    async def worker(client: PaymentClient, payer: str, payee: str) -> None:
        while trio.current_time() < deadline:
            started = trio.current_time()
            await client.pay(payer, payee, 1)
            latencies_ms.append((trio.current_time() - started) * 1000)

    async with trio.open_nursery() as nursery:
        for client_id in range(clients):
            client = PaymentClient(cluster, client_id, timeout_s=30)
            await nursery.start(_serve_client, client)
            for index in range(concurrency):
                payer = account_name(2 * client_id + index % 2)
                payee = account_name((2 * client_id + 2) % (2 * clients))
                nursery.start_soon(worker, client, payer, payee)
        await trio.sleep(seconds)
        # Payments still in flight at the deadline are not counted.
        nursery.cancel_scope.cancel()
    return latencies_ms


async def _serve_client(
    client: PaymentClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with client:
        await client.wait_connected()
        task_status.started()
        await trio.sleep_forever()


def _report(label: str, latencies_ms: list[float], seconds: float) -> None:
    if not latencies_ms:
        print(f"{label:<22} no payment completed")
        return
    print(
        f"{label:<22} {len(latencies_ms) / seconds:8.1f} payments/s   "
        f"p50 {nearest_rank(latencies_ms, 50):6.1f} ms   "
        f"p99 {nearest_rank(latencies_ms, 99):6.1f} ms   ({len(latencies_ms)} payments)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="tasks per client")
    parser.add_argument("--seconds", type=float, default=10.0)
    arguments = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pbft-bench-"))
    base = free_ports(1)[0]
    path = write_cluster(
        root, replicas=arguments.replicas, clients=arguments.clients, base_port=min(base, 60000)
    )
    processes = []
    for replica in range(arguments.replicas):
        log = open(root / f"replica-{replica}.log", "ab")
        processes.append(subprocess.Popen(replica_command(path, replica), stdout=log, stderr=log))
        log.close()
    try:
        time.sleep(1.5)
        print(f"cluster      {arguments.replicas} replica processes on 127.0.0.1 ({root})")
        baseline = trio.run(_load, path, 1, 1, min(3.0, arguments.seconds))
        _report("baseline (1 x 1)", baseline, min(3.0, arguments.seconds))
        loaded = trio.run(_load, path, arguments.clients, arguments.concurrency, arguments.seconds)
        label = f"closed loop ({arguments.clients} x {arguments.concurrency})"
        _report(label, loaded, arguments.seconds)
        if baseline and loaded:
            ratio = (len(loaded) / arguments.seconds) / (
                len(baseline) / min(3.0, arguments.seconds)
            )
            print(f"throughput ratio to baseline  {ratio:.1f}x")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
