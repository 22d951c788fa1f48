"""A fresh client's first payment after a view change: assuming view 0 against learning it.

    python -m runtime.bench_view [--rounds 10]

Starts 4 replica processes on 127.0.0.1, kills the primary of view 0 (replica 0) with
SIGKILL and pays until the others have moved to view 1. Then, `rounds` times each, a new
PaymentClient makes one payment: the baseline assumes view 0 (sends to the dead primary,
waits out the client timeout, then asks everyone); the other learns the view from the
replicas' signed replies. Prints the latency of that first payment for both, measured in
the same run. Figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.ports import consecutive_free_ports
from runtime.supervisor import replica_command


async def _first_payment_ms(cluster_path: Path, view: int | None) -> tuple[float, int, int]:
    """Latency of a fresh client's first payment, the view it ends in, its retransmissions."""
    cluster = load_cluster(cluster_path)
    async with PaymentClient(cluster, 0, view=view, timeout_s=30) as client:
        await client.wait_connected(3)
        started = time.perf_counter()
        await client.pay("acct-00000", "acct-00002", 1)
        elapsed = (time.perf_counter() - started) * 1000
        return elapsed, client.core.view, client.core.retransmissions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        path = write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])
        processes = []
        for replica in range(4):
            log = open(root / f"replica-{replica}.log", "ab")  # child's
            processes.append(
                subprocess.Popen(replica_command(path, replica), stdout=log, stderr=log)
            )
            log.close()
        try:
            time.sleep(1.0)
            processes[0].send_signal(signal.SIGKILL)
            processes[0].wait()
            # Pay until the survivors have changed view (the client's retries trigger it).
            _, view, _ = trio.run(_first_payment_ms, path, None)
            print(f"replica 0 killed; the cluster is in view {view}")
            results: dict[str, list[float]] = {"assume view 0": [], "learn the view": []}
            for _ in range(arguments.rounds):
                for label, assumed in (("assume view 0", 0), ("learn the view", None)):
                    elapsed, _, _ = trio.run(_first_payment_ms, path, assumed)
                    results[label].append(elapsed)
            for label, values in results.items():
                print(
                    f"{label:<15} first payment: median {statistics.median(values):7.1f} ms  "
                    f"min {min(values):7.1f}  max {max(values):7.1f}  ({len(values)} clients)"
                )
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    main()
