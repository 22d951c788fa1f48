"""`pbft cluster up` as a supervisor, with real replica processes on 127.0.0.1, and `pbft pay`
against it as a user runs it: kill -9 a replica, the others keep serving, payments still
confirm; with --restart it comes back from its log; SIGTERM stops them all. Also a fresh
client after a view change learns the view instead of waiting out a timeout.

Every process here is started by the test and stopped by it (bounded waits throughout).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from pbft.receipt import verify_receipt
from runtime.client import PaymentClient
from runtime.cluster import load_cluster

WAIT_S = 60.0


class Up:
    """A `pbft cluster up` process, its output files and its replicas' pids."""

    def __init__(self, root: Path, *options: str, new_session: bool = False) -> None:
        self.root = root
        self.out_path = root.parent / f"{root.name}-up.out"
        self.err_path = root.parent / f"{root.name}-up.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli", "cluster", "up", "--dir", str(root), *options],
                stdout=out,
                stderr=err,
                start_new_session=new_session,  # its own process group, as at a terminal
            )
        self.wait_for(lambda: "Ctrl-C stops every replica" in self.out(), "the cluster to start")
        self.pids = {
            int(replica): int(pid)
            for replica, pid in re.findall(r"^replica (\d+): \S+ +pid (\d+)", self.out(), re.M)
        }
        assert sorted(self.pids) == [0, 1, 2, 3], self.out()
        self.cluster_path = root / "cluster.toml"

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert self.process.poll() is None, f"cluster up exited: {self.err()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.err()}"
            time.sleep(0.05)

    def pay(self, *extra: str, amount: int = 7) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cli", "pay", "--cluster", str(self.cluster_path)]
        command += ["--client", "0", "--from", "acct-00000", "--to", "acct-00002"]
        command += ["--amount", str(amount), *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def events(self, replica: int) -> list[dict[str, object]]:
        lines = (self.root / f"replica-{replica}.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0: look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(*options: str) -> Up:
        up = Up(tmp_path / "cluster", *options)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()
        for pid in up.pids.values():  # a replica left behind would be a bug: do not leak it
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_kill_9_of_a_replica_is_reported_the_others_keep_serving_and_restart_brings_it_back(
    up_factory: Callable[..., Up], tmp_path: Path
) -> None:
    up = up_factory("--restart")
    receipt = tmp_path / "receipt.bin"
    paid = up.pay("--receipt", str(receipt))
    assert paid.returncode == 0, paid.stderr
    assert json.loads(paid.stdout)["outcome"] == "confirmed"
    cluster = load_cluster(up.cluster_path)
    verify_receipt(receipt.read_bytes(), cluster.keyring(), cluster.cluster_id)

    victim = up.pids[2]
    os.kill(victim, signal.SIGKILL)
    up.wait_for(lambda: f"replica 2 (pid {victim}) killed by SIGKILL" in up.err(), "the report")
    assert "restarting it from its log in 0.5 s (attempt 1 of 5)" in up.err()
    assert all(_alive(up.pids[replica]) for replica in (0, 1, 3))
    again = up.pay()
    assert again.returncode == 0, again.stderr

    up.wait_for(lambda: "replica 2 restarted" in up.err(), "the restart")
    match = re.search(r"replica 2 restarted \(pid (\d+)\)", up.err())
    assert match is not None
    up.pids[2] = int(match.group(1))
    assert _alive(up.pids[2])
    up.wait_for(
        lambda: sum(event["event"] == "listening" for event in up.events(2)) == 2,
        "the restarted replica to listen",
    )
    starts = [event for event in up.events(2) if event["event"] == "start"]
    assert int(starts[-1]["recovered_records"]) > 0  # from its log, not from scratch
    assert up.pay().returncode == 0

    assert up.stop() == 0
    assert not any(_alive(pid) for pid in up.pids.values())


def test_without_restart_the_survivors_serve_a_fresh_client_learns_the_view_and_exit_codes_hold(
    up_factory: Callable[..., Up],
) -> None:
    up = up_factory()
    primary = up.pids[0]
    os.kill(primary, signal.SIGKILL)
    up.wait_for(lambda: "killed by SIGKILL; the others keep running" in up.err(), "the report")
    # The first payment after the primary's death waits for the view change.
    first = up.pay()
    assert first.returncode == 0, first.stderr
    rejected = up.pay(amount=10**12)
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout)["reason"] == "insufficient_funds"
    assert "payment rejected: insufficient_funds" in rejected.stderr

    cluster = load_cluster(up.cluster_path)

    async def fresh_payment(view: int | None) -> tuple[int, int]:
        async with PaymentClient(cluster, 1, view=view, timeout_s=30) as client:
            await client.wait_connected(3)
            decided = await client.pay("acct-00002", "acct-00000", 1)
            assert decided.outcome == "confirmed"
            return client.core.view, client.core.retransmissions

    learned_view, learned_retries = trio.run(fresh_payment, None)
    assert learned_view >= 1
    assert learned_retries == 0  # no timeout paid on the dead primary of view 0
    _, assumed_retries = trio.run(fresh_payment, 0)
    assert assumed_retries >= 1  # the old assumption: sent to replica 0, waited, retried

    os.kill(up.pids[1], signal.SIGKILL)  # now two down: more than f = 1
    up.wait_for(lambda: "replica 1 (pid" in up.err(), "the second report")
    stuck = up.pay("--timeout", "1")
    assert stuck.returncode == 4, stuck.stderr
    assert "Traceback" not in stuck.stderr
    retry = re.search(r"retry with --request-id (\d+)", stuck.stderr)
    assert retry is not None
    assert up.process.poll() is None  # the supervisor still runs the other two
    assert up.stop() == 0
    assert not _alive(up.pids[2]) and not _alive(up.pids[3])


def test_ctrl_c_stops_the_supervisor_and_every_replica_cleanly(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the replicas stop themselves (and ignore the
    supervisor's SIGTERM that follows), each logs `stopped`, nothing prints a traceback."""
    up = Up(tmp_path / "cluster", "--restart", new_session=True)
    try:
        for replica in range(4):
            up.wait_for(
                lambda replica=replica: any(e["event"] == "listening" for e in up.events(replica)),
                f"replica {replica} to listen",
            )
        assert up.pay().returncode == 0
        os.killpg(up.process.pid, signal.SIGINT)
        assert up.process.wait(timeout=30) == 0
    finally:
        up.stop()
    assert "every replica stopped" in up.err()
    assert "Traceback" not in up.err()
    for replica, pid in up.pids.items():
        assert not _alive(pid)
        log = (up.root / f"replica-{replica}.log").read_text()
        assert "Traceback" not in log and "internal error" not in log
        assert up.events(replica)[-1]["event"] == "stopped"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_no_replica_outlives_a_supervisor_killed_with_sigkill(tmp_path: Path) -> None:
    up = Up(tmp_path / "cluster")
    try:
        up.process.send_signal(signal.SIGKILL)
        up.process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in up.pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in up.pids.values())
    finally:
        for pid in up.pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
