"""The real network: replica processes on 127.0.0.1, a PaymentClient, kill -9 and restart.

Every server here is started by the test, on 127.0.0.1 only, and stopped by it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pbft.receipt import verify_receipt
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster
from runtime.supervisor import replica_command

REPLICAS = 4
# Replica processes start slowly on a loaded 2-core machine: generous, and only an upper bound.
STARTUP_S = 60.0


def _local(root: Path) -> LocalCluster:
    return LocalCluster.create(root, replicas=REPLICAS, clients=2)


def _stop(local: LocalCluster) -> None:
    """Stop every replica; on stderr (pytest shows it for a failing test), each that had
    exited by itself, with the end of its log, so a failure in CI says why."""
    for replica, code in sorted(local.exited().items()):
        print(local.exit_report(replica, code), file=sys.stderr)
    local.stop_all()


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = _local(tmp_path)
    cluster.start_all()
    try:
        yield cluster
    finally:
        _stop(cluster)


def _run(coroutine_function, *arguments):  # a test helper
    return trio.run(coroutine_function, *arguments)


def test_four_replica_processes_confirm_and_reject_with_verifiable_receipts(
    local_cluster: LocalCluster,
) -> None:
    async def scenario() -> list:
        async with PaymentClient(local_cluster.cluster, 0) as client:
            await client.wait_connected(timeout_s=STARTUP_S)
            decided = [
                await client.pay("acct-00000", "acct-00002", 500),
                await client.pay("acct-00000", "acct-00002", 10**12),  # more than it holds
                await client.pay("acct-00002", "acct-00000", 5),  # client 0 does not own it
            ]
            read = await client.balance("acct-00002")
            assert (read.exists, read.balance) == (True, 100_500)
            assert len(read.replicas) >= 2 and read.seq >= 1
            missing = await client.balance("no-such-account")
            assert not missing.exists
            return decided

    decided = _run(scenario)
    keyring = local_cluster.cluster.keyring()
    results = [(d.outcome, d.reason) for d in decided]
    assert results == [
        ("confirmed", ""),
        ("rejected", "insufficient_funds"),
        ("rejected", "unauthorized"),
    ]
    for decision in decided:
        verified = verify_receipt(decision.receipt, keyring, local_cluster.cluster.cluster_id)
        assert (verified.outcome, verified.reason) == (decision.outcome, decision.reason)


def test_kill_9_of_the_primary_under_load_then_restart_converges(
    local_cluster: LocalCluster,
) -> None:
    """Payments continue through a view change; the killed replica restarts from its
    durable log, catches up, and reaches the same ledger digest as the others."""

    async def scenario() -> tuple[int, int]:
        confirmed = 0
        async with PaymentClient(local_cluster.cluster, 0, timeout_s=20) as client:
            await client.wait_connected(timeout_s=STARTUP_S)
            for _ in range(30):
                confirmed += (
                    await client.pay("acct-00000", "acct-00002", 1)
                ).outcome == "confirmed"
            local_cluster.kill(0)  # the primary of view 0, mid-stream
            for _ in range(40):
                confirmed += (
                    await client.pay("acct-00000", "acct-00002", 1)
                ).outcome == "confirmed"
            local_cluster.start(0)
            for _ in range(60):
                confirmed += (
                    await client.pay("acct-00000", "acct-00002", 1)
                ).outcome == "confirmed"
            await trio.sleep(2)
        return confirmed, 130

    confirmed, total = _run(scenario)
    assert confirmed == total
    view_changes = [e for e in local_cluster.events(1) if e["event"] == "new_view"]
    assert view_changes, "a view change must follow the primary's death"
    restarted = local_cluster.events(0)
    assert sum(1 for event in restarted if event["event"] == "start") == 2
    # Every replica's digest at every checkpoint they share is the same.
    common: dict[int, set[str]] = {}
    for replica in range(REPLICAS):
        for seq, digest in local_cluster.checkpoints(replica).items():
            common.setdefault(seq, set()).add(digest)
    assert common, "no checkpoint became stable"
    assert all(len(digests) == 1 for digests in common.values())
    latest = max(common)
    assert all(latest in local_cluster.checkpoints(replica) for replica in range(REPLICAS)), (
        "the restarted replica must reach the others' latest checkpoint"
    )


def test_torn_log_tail_recovers_and_corrupt_log_refuses_to_start(tmp_path: Path) -> None:
    cluster = _local(tmp_path)
    cluster.start_all()
    try:

        async def pay_some() -> None:
            async with PaymentClient(cluster.cluster, 0) as client:
                await client.wait_connected(timeout_s=STARTUP_S)
                for _ in range(20):
                    await client.pay("acct-00000", "acct-00002", 1)

        _run(pay_some)
        cluster.kill(3)
        log = tmp_path / "data-3" / "replica-3.log"
        with open(log, "ab") as handle:
            handle.write(b"\x00\x00\x01\x00partial")  # a record torn mid-write
        cluster.start(3)
        time.sleep(2.5)
        assert cluster.processes[3].poll() is None, "a torn tail must not stop the replica"
        starts = [e for e in cluster.events(3) if e["event"] == "start"]
        assert starts[-1]["torn_tail"] is True
        cluster.kill(3)
        data = bytearray(log.read_bytes())
        data[40] ^= 0xFF  # damage inside an early record
        log.write_bytes(bytes(data))
        result = subprocess.run(
            replica_command(cluster.path, 3),
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 6  # EXIT_STORAGE_CORRUPT
        assert b"refusing to start on damaged storage" in result.stderr
        assert str(log).encode() in result.stderr
    finally:
        _stop(cluster)


def test_replicas_stop_cleanly_on_sigterm(local_cluster: LocalCluster) -> None:
    deadline = time.monotonic() + 30
    for replica in range(REPLICAS):
        # SIGTERM before the replica set up its signal handling would just kill it.
        while not any(event["event"] == "listening" for event in local_cluster.events(replica)):
            assert time.monotonic() < deadline, f"replica {replica} never started listening"
            time.sleep(0.05)
    processes = dict(local_cluster.processes)
    assert local_cluster.stop_all() == []
    for replica, process in processes.items():
        assert process.returncode == 0, replica
        assert local_cluster.events(replica)[-1]["event"] == "stopped"
    assert os.path.exists(local_cluster.root / "data-0" / "replica-0.log")


@pytest.mark.slow
def test_soak_kill_and_restart_a_random_replica_under_load_20_rounds(tmp_path: Path) -> None:
    """20 rounds: kill -9 a random replica (at most f = 1 down at once) while clients pay,
    restart it. Afterwards every payment a client holds a receipt for is in every replica's
    durable ledger with the same outcome, and the money is conserved."""
    import random

    local = _local(tmp_path)
    local.start_all()
    rng = random.Random(20)
    receipts: list = []

    async def load(client: PaymentClient, payer: str, payee: str, count: int) -> None:
        for _ in range(count):
            receipts.append(await client.pay(payer, payee, rng.randrange(1, 50)))

    async def soak() -> None:
        async with (
            PaymentClient(local.cluster, 0, timeout_s=30) as first,
            PaymentClient(local.cluster, 1, timeout_s=30) as second,
        ):
            await first.wait_connected(timeout_s=STARTUP_S)
            await second.wait_connected(timeout_s=STARTUP_S)
            for _round in range(20):
                victim = rng.randrange(REPLICAS)
                local.kill(victim)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load, first, "acct-00000", "acct-00002", 4)
                    nursery.start_soon(load, first, "acct-00001", "acct-00003", 4)
                    nursery.start_soon(load, second, "acct-00002", "acct-00000", 4)
                local.start(victim)
                await trio.sleep(0.3)
            await trio.sleep(3)  # let the last restarted replica catch up

    try:
        _run(soak)
    finally:
        _stop(local)
    keyring = local.cluster.keyring()
    assert len(receipts) == 20 * 12
    cores = [local.rebuilt_replica(replica) for replica in range(REPLICAS)]
    total = sum(account.balance for account in local.cluster.accounts.values())
    for core in cores:
        assert core.ledger.total_balance() == core.ledger.recount_total() == total
    for decided in receipts:
        verified = verify_receipt(decided.receipt, keyring, local.cluster.cluster_id)
        for core in cores:
            # A replica rebuilt from its log may stand just behind the others' last batch.
            decision = core.ledger.lookup(verified.client_id, verified.request_id)
            if decision is None:
                assert core.last_executed < verified.seq, (core.id, verified)
                continue
            assert (decision.outcome.value, decision.reason.value, decision.seq) == (
                verified.outcome,
                verified.reason,
                verified.seq,
            )
    assert max(core.last_executed for core in cores) - min(c.last_executed for c in cores) <= 2


def test_hostile_connections_do_not_disturb_a_replica_process(local_cluster: LocalCluster) -> None:
    """Garbage bytes, an oversized frame, a false identity and a frame that never finishes,
    all sent to replica 0's port: each connection is dropped, and payments go on."""
    import socket
    import struct

    from crypto.keys import SigningKey

    address = local_cluster.cluster.replica(0)
    deadline = time.monotonic() + 30
    while not any(e["event"] == "listening" for e in local_cluster.events(0)):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def connect() -> socket.socket:
        connection = socket.create_connection((address.host, address.port), timeout=5)
        header = connection.recv(4)  # the replica speaks first: its HELLO frame
        length = struct.unpack(">I", header)[0]
        hello = b""
        while len(hello) < length:
            hello += connection.recv(length - len(hello))
        assert hello[:1] == b"H"
        return connection

    def closed_by_peer(connection: socket.socket) -> bool:
        connection.settimeout(15)
        try:
            return connection.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    garbage = connect()
    garbage.sendall(b"\xff" * 64)
    oversized = connect()
    oversized.sendall(struct.pack(">I", 2**31))
    impostor = connect()
    transcript = b"\x00" * 32  # a wrong transcript and a key nobody knows: a false identity
    stranger = SigningKey.generate()
    principal = bytes([0]) + (1).to_bytes(8, "big")  # claims to be replica 1
    signature = stranger.sign(b"pbft/v2/handshake", transcript)
    auth = b"A" + principal + b"\x01" * 32 + b"\x09" * 32 + signature  # nonce, ephemeral
    impostor.sendall(struct.pack(">I", len(auth)) + auth)
    stalled = connect()
    stalled.sendall(struct.pack(">I", 100) + b"half")  # and never the rest
    for connection in (garbage, oversized, impostor):
        assert closed_by_peer(connection)
        connection.close()

    async def pay() -> str:
        async with PaymentClient(local_cluster.cluster, 0) as client:
            await client.wait_connected(timeout_s=STARTUP_S)
            return (await client.pay("acct-00000", "acct-00002", 5)).outcome

    assert _run(pay) == "confirmed"
    assert closed_by_peer(stalled), "a frame that never finishes must be dropped"
    stalled.close()
    assert local_cluster.processes[0].poll() is None
