"""A local cluster of replica processes, read from outside as an operator would.

The soak test, the standing adversary (`runtime.attack`) and the process tests all start n
`pbft replica` processes of one cluster file on 127.0.0.1, kill and restart them, and read
what they did from their JSON log lines (stderr, one file per replica) and /proc/PID. This
is the one place that does it; `pbft cluster up` (runtime/supervisor.py) is the operator's
long-running version, with restarts and a status line, and is not meant for measurements.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import trio

from pbft.replica import Replica
from runtime.cluster import Cluster, load_cluster, write_cluster
from runtime.ports import consecutive_free_ports
from runtime.storage import DurableStore
from runtime.supervisor import replica_command

# How long a replica gets to stop on SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 5
_VIEW = re.compile(r"^view (\d+)\b")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class ClusterStartError(RuntimeError):
    """The local cluster did not come up; the message names the replica and its log."""


class LocalCluster:
    """The replica processes of one cluster file, each logging to ROOT/replica-I.log.

    `create` writes a fresh cluster on consecutive free ports; the constructor takes an
    existing cluster file. Replicas that exit by themselves stay in `processes` until
    `reap` (or a stop) collects them, so a caller can see what died and why.
    """

    def __init__(self, root: Path, cluster_path: Path) -> None:
        self.root = root
        self.path = cluster_path
        self.cluster: Cluster = load_cluster(cluster_path)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.starts: dict[int, int] = {}

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        replicas: int,
        clients: int,
        accounts_per_client: int = 2,
        initial_balance: int = 100_000,
        protocol: dict[str, int] | None = None,
        generated_accounts: int | None = None,
        base_port: int | None = None,
    ) -> LocalCluster:
        """A new cluster in `root`. Every port of it, not only the first, was free a moment
        ago and is outside the ephemeral range, so a restarted replica gets its port back."""
        root.mkdir(parents=True, exist_ok=True)
        path = write_cluster(
            root,
            replicas=replicas,
            clients=clients,
            base_port=consecutive_free_ports(replicas)[0] if base_port is None else base_port,
            accounts_per_client=accounts_per_client,
            initial_balance=initial_balance,
            protocol=protocol,
            generated_accounts=generated_accounts,
        )
        return cls(root, path)

    @property
    def replica_ids(self) -> list[int]:
        return [replica.replica_id for replica in self.cluster.replicas]

    # --- processes ---------------------------------------------------------------------------

    def log_path(self, replica: int) -> Path:
        return self.root / f"replica-{replica}.log"

    def start(self, replica: int) -> None:
        with open(self.log_path(replica), "ab") as log:
            self.processes[replica] = subprocess.Popen(
                replica_command(self.path, replica), stdout=log, stderr=log
            )
        self.starts[replica] = self.starts.get(replica, 0) + 1

    def start_all(self) -> None:
        for replica in self.replica_ids:
            self.start(replica)

    def kill(self, replica: int) -> None:
        """SIGKILL: a crash, with no chance to flush or close anything."""
        process = self.processes.pop(replica)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, replica: int) -> str | None:
        """SIGTERM and wait; what went wrong (killed after the timeout, or a non-zero exit
        status), or None for a clean stop."""
        process = self.processes.pop(replica)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            return f"replica {replica} ignored SIGTERM"
        return None if code == 0 else f"replica {replica} stopped with {code}"

    def stop_all(self) -> list[str]:
        """Stop every replica (SIGTERM to all first, so they stop in parallel); what went
        wrong, one line each."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return [problem for replica in list(self.processes) if (problem := self.stop(replica))]

    def exited(self) -> dict[int, int]:
        """Replicas whose process exited by itself: id -> exit status (still in `processes`)."""
        return {
            replica: code
            for replica, process in self.processes.items()
            if (code := process.poll()) is not None
        }

    def reap(self) -> dict[int, int]:
        """Like `exited`, and forget them: each is reported once."""
        gone = self.exited()
        for replica in gone:
            del self.processes[replica]
        return gone

    def exit_report(self, replica: int, code: int) -> str:
        """A replica's exit status and the end of its log: why it died, for a failing test."""
        try:
            lines = self.log_path(replica).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        tail = "".join(f"\n  {line}" for line in lines[-LOG_TAIL_LINES:])
        return f"replica {replica} exited with {code}:{tail}"

    def pid(self, replica: int) -> int:
        return self.processes[replica].pid

    def store_path(self, replica: int) -> Path:
        """The replica's durable log (the data directory layout of runtime.cluster)."""
        return self.root / f"data-{replica}" / f"replica-{replica}.log"

    def rebuilt_replica(self, replica: int) -> Replica:
        """A replica core rebuilt from what the (stopped) process made durable."""
        with DurableStore.open(self.store_path(replica)) as store:
            records = store.records()
        cluster = self.cluster
        return Replica(
            replica,
            cluster.config,
            cluster.load_private_key("replica", replica),
            cluster.keyring(),
            cluster.accounts,
            records=records or None,
        )

    # --- what the logs say -------------------------------------------------------------------

    def events(self, replica: int) -> list[dict[str, object]]:
        """The replica's log records so far; a line cut short (by SIGKILL, or being written
        right now) is skipped."""
        try:
            lines = self.log_path(replica).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def count_events(self, kind: str, start: float, end: float) -> int:
        """Records of `kind` (summed lines count their repeats) within [start, end] wall time."""
        total = 0
        for replica in self.replica_ids:
            for record in self.events(replica):
                stamp = record.get("time")
                if record.get("event") == kind and isinstance(stamp, int | float):
                    if start <= stamp <= end:
                        repeated = record.get("repeated", 0)
                        total += 1 + (repeated if isinstance(repeated, int) else 0)
        return total

    def listening_count(self, replica: int) -> int:
        """How many times the replica has logged `listening` (once per start)."""
        return sum(1 for record in self.events(replica) if record.get("event") == "listening")

    def views(self) -> list[int]:
        """Every view any replica logged installing (NEW-VIEW), in log order per replica."""
        views = []
        for replica in self.replica_ids:
            for record in self.events(replica):
                if record.get("event") == "new_view":
                    match = _VIEW.match(str(record.get("detail", "")))
                    if match:
                        views.append(int(match.group(1)))
        return views

    def current_view(self) -> int:
        return max(self.views(), default=0)

    def checkpoints(self, replica: int) -> dict[int, str]:
        """Stable checkpoints the replica logged: seq -> ledger digest."""
        return {
            int(str(record["seq"])): str(record["ledger_digest"])
            for record in self.events(replica)
            if record.get("event") == "checkpoint_stable" and "seq" in record
        }

    async def wait_listening(self, timeout_s: float = 30.0) -> None:
        """Return once every running replica has logged `listening` since its last start;
        ClusterStartError if one exits first (a port taken by someone else since it was
        chosen) or they are not all listening in time."""
        with trio.move_on_after(timeout_s):
            while True:
                for replica, code in self.exited().items():
                    raise ClusterStartError(
                        f"replica {replica} exited with status {code} before listening "
                        f"(see {self.log_path(replica)})"
                    )
                if all(
                    self.listening_count(replica) >= self.starts.get(replica, 1)
                    for replica in self.processes
                ):
                    return
                await trio.sleep(0.1)
        raise ClusterStartError(f"the replicas did not all listen within {timeout_s:g} s")


# --- /proc, for measurements (Linux) ---------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size now (VmRSS), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_kib(pid: int) -> int:
    """The most the process was resident so far (VmHWM), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far (/proc/PID/stat, fields 14, 15)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # The command name (field 2) may hold spaces; fields after its ')' are plain.
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0
