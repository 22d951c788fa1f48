"""State transfer over TCP: a wiped replica of a cluster whose ledger holds a million accounts
catches up by chunks from real replica processes on 127.0.0.1.

Every server here is started by the test, on 127.0.0.1 only, and stopped by it. The test
prints the catch-up time and peak memory of the wiped replica next to the same figures of a
replica that did not need a transfer (run with -s to see them).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.commands import replica_command

REPLICAS = 4
ACCOUNTS = 1_000_000
# The wiped replica's whole catch-up (start, genesis build, transfer) must end in this.
CATCH_UP_DEADLINE_S = 600


def _events(path: Path) -> list[dict[str, object]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    return events


def _ports_outside_the_ephemeral_range(count: int) -> int:
    """The first of `count` consecutive free ports below Linux's ephemeral range: replica 3
    is down for a while, and a port the OS hands out for outgoing connections (or to
    free_ports) could be taken in the meantime, and its restart then fails to listen."""
    for base in range(21000, 32000 - count, 97):
        sockets = []
        try:
            for port in range(base, base + count):
                handle = socket.socket()
                sockets.append(handle)
                handle.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for handle in sockets:
                handle.close()
        return base
    raise AssertionError("no free ports in 21000..32000")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
def test_wiped_replica_of_a_million_account_ledger_catches_up_over_tcp(tmp_path: Path) -> None:
    base = _ports_outside_the_ephemeral_range(REPLICAS)
    path = write_cluster(
        tmp_path,
        replicas=REPLICAS,
        clients=2,
        base_port=base,
        initial_balance=1000,
        generated_accounts=ACCOUNTS,
        # A checkpoint of a million accounts takes the replicas seconds of CPU: long timeouts
        # so that this is not taken for a dead primary.
        protocol={
            "checkpoint_interval": 4,
            "batch_size": 1,
            "view_change_timeout_ms": 120_000,
            "heartbeat_interval_ms": 200,
        },
    )
    cluster = load_cluster(path)
    processes: dict[int, subprocess.Popen[bytes]] = {}

    def log(replica: int) -> Path:
        return tmp_path / f"replica-{replica}.log"

    def start(replica: int) -> None:
        with open(log(replica), "ab") as handle:
            processes[replica] = subprocess.Popen(
                replica_command(path, replica), stdout=handle, stderr=handle
            )

    def checkpoints(replica: int) -> dict[int, str]:
        return {
            int(event["seq"]): str(event["ledger_digest"])
            for event in _events(log(replica))
            if event["event"] == "checkpoint_stable"
        }

    async def pay(count: int, replicas_up: int) -> None:
        async with PaymentClient(cluster, 0, timeout_s=120) as client:
            # Each replica builds the million-account genesis before it listens.
            await client.wait_connected(replicas_up, timeout_s=CATCH_UP_DEADLINE_S)
            for _ in range(count):
                decided = await client.pay("acct-000000", "acct-000002", 1)
                assert decided.outcome == "confirmed"

    try:
        for replica in range(REPLICAS):
            start(replica)
        trio.run(pay, 4, 4)
        # Replica 3 loses everything: killed, its data directory gone.
        processes.pop(3).send_signal(signal.SIGKILL)
        shutil.rmtree(tmp_path / "data-3", ignore_errors=True)
        trio.run(pay, 4, 3)
        deadline = time.monotonic() + CATCH_UP_DEADLINE_S
        while 8 not in checkpoints(0) or 8 not in checkpoints(1):
            assert time.monotonic() < deadline, "checkpoint 8 never became stable"
            time.sleep(0.2)

        started = time.monotonic()
        start(3)
        while 8 not in checkpoints(3):
            assert time.monotonic() < deadline, "the wiped replica never caught up"
            assert processes[3].poll() is None, log(3).read_text()[-2000:]
            time.sleep(0.1)
        caught_up_s = time.monotonic() - started
        peak_wiped = _peak_rss_mib(processes[3].pid)
        peak_server = _peak_rss_mib(processes[1].pid)

        events = _events(log(3))
        transfers = [e for e in events if e["event"] == "state_transfer"]
        assert transfers, "caught up without a state transfer?"
        assert checkpoints(3)[8] == checkpoints(0)[8] == checkpoints(1)[8]
        starts = [e for e in events if e["event"] == "start"]
        listening = [e for e in events if e["event"] == "listening"]
        transfer_s = float(transfers[0]["time"]) - float(listening[-1]["time"])  # type: ignore[arg-type]
        print(
            f"\n1M-account catch-up over TCP: wiped replica start to checkpoint 8 "
            f"{caught_up_s:.1f} s (of it, listening to state installed {transfer_s:.1f} s); "
            f"peak RSS wiped replica {peak_wiped:.0f} MiB, baseline (replica 1, no transfer) "
            f"{peak_server:.0f} MiB; {len(starts)} start"
        )
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
