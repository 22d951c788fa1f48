"""State transfer over TCP: a wiped replica of a cluster whose ledger holds a million accounts
catches up by chunks from real replica processes on 127.0.0.1.

Every server here is started by the test, on 127.0.0.1 only, and stopped by it. The test
prints the catch-up time and peak memory of the wiped replica next to the same figures of a
replica that did not need a transfer (run with -s to see them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import trio

from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster, peak_rss_kib

REPLICAS = 4
ACCOUNTS = 1_000_000
# The wiped replica's whole catch-up (start, genesis build, transfer) must end in this.
CATCH_UP_DEADLINE_S = 600


@pytest.mark.slow
def test_wiped_replica_of_a_million_account_ledger_catches_up_over_tcp(tmp_path: Path) -> None:
    local = LocalCluster.create(
        tmp_path,
        replicas=REPLICAS,
        clients=2,
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
    cluster = local.cluster
    checkpoints = local.checkpoints

    async def pay(count: int, replicas_up: int) -> None:
        async with PaymentClient(cluster, 0, timeout_s=120) as client:
            # Each replica builds the million-account genesis before it listens.
            await client.wait_connected(replicas_up, timeout_s=CATCH_UP_DEADLINE_S)
            for _ in range(count):
                decided = await client.pay("acct-000000", "acct-000002", 1)
                assert decided.outcome == "confirmed"

    try:
        local.start_all()
        trio.run(pay, 4, 4)
        # Replica 3 loses everything: killed, its data directory gone.
        local.kill(3)
        shutil.rmtree(tmp_path / "data-3", ignore_errors=True)
        trio.run(pay, 4, 3)
        deadline = time.monotonic() + CATCH_UP_DEADLINE_S
        while 8 not in checkpoints(0) or 8 not in checkpoints(1):
            assert time.monotonic() < deadline, "checkpoint 8 never became stable"
            time.sleep(0.2)

        started = time.monotonic()
        local.start(3)
        while 8 not in checkpoints(3):
            assert time.monotonic() < deadline, "the wiped replica never caught up"
            assert 3 not in local.exited(), local.exit_report(3, local.exited()[3])
            time.sleep(0.1)
        caught_up_s = time.monotonic() - started
        peak_wiped = peak_rss_kib(local.pid(3)) / 1024
        peak_server = peak_rss_kib(local.pid(1)) / 1024

        events = local.events(3)
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
        local.stop_all()
