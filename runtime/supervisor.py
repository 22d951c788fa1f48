"""Supervise local replica processes: `pbft cluster up`.

One replica dying does not stop the others (the cluster tolerates f of them down). Each
death is reported with the replica, its exit status or signal and the last line it logged.
With restarts on, a dead replica is started again from its durable log after a backoff that
doubles with each quick death, up to a bound; a replica that then ran for `stable_s` earns
its backoff back. Stopping the supervisor stops every replica.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1
LAST_LINE_BYTES = 2048


@dataclass
class _Child:
    replica_id: int
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each within stable_s of its start
    restarts: int = 0
    restart_at: float | None = None
    given_up: bool = False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL, so no
    replica outlives it holding its port (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def describe_exit(returncode: int) -> str:
    """`exited with status 3`, or `killed by SIGKILL` for a negative Popen return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def last_line(path: Path) -> str:
    """The last non-empty line of a log file, or '' (a death report quotes it)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - LAST_LINE_BYTES))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class Supervisor:
    def __init__(
        self,
        commands: dict[int, list[str]],
        log_dir: Path,
        *,
        restart: bool,
        max_restarts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stable_s: float = 30.0,
        report: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = {
            replica_id: _Child(replica_id, command, log_dir / f"replica-{replica_id}.log")
            for replica_id, command in sorted(commands.items())
        }
        self.restart = restart
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.report = report if report is not None else sys.stderr
        self.clock = clock
        self.deaths = 0

    def start_all(self) -> None:
        for child in self.children.values():
            self._start(child)

    def pid(self, replica_id: int) -> int | None:
        process = self.children[replica_id].process
        return None if process is None else process.pid

    def running(self) -> int:
        return sum(
            child.process is not None and child.process.poll() is None
            for child in self.children.values()
        )

    def poll(self) -> bool:
        """Reap deaths, report them, start due restarts. False once nothing runs or waits."""
        now = self.clock()
        for child in self.children.values():
            process = child.process
            if process is not None and process.poll() is not None:
                self._died(child, process, process.returncode, now)
            if child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                pid = self._start(child)
                self._say(f"replica {child.replica_id} restarted (pid {pid})")
        return any(
            child.process is not None or child.restart_at is not None
            for child in self.children.values()
        )

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every replica, wait for them, SIGKILL whoever is still there."""
        living = [
            child.process
            for child in self.children.values()
            if child.process is not None and child.process.poll() is None
        ]
        for process in living:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in living:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in self.children.values():
            child.process = None
            child.restart_at = None

    def _start(self, child: _Child) -> int:
        with open(child.log_path, "ab") as log:  # the child holds its own descriptor
            child.process = subprocess.Popen(
                child.command, stdout=log, stderr=log, preexec_fn=_die_with_parent
            )
        child.started_at = self.clock()
        return child.process.pid

    def _died(
        self, child: _Child, process: subprocess.Popen[bytes], returncode: int, now: float
    ) -> None:
        child.process = None
        self.deaths += 1
        message = f"replica {child.replica_id} (pid {process.pid}) {describe_exit(returncode)}"
        if returncode > 0:
            line = last_line(child.log_path)
            if line:
                message += f"; its last log line: {line}"
        if now - child.started_at >= self.stable_s:
            child.quick_deaths = 0
        child.quick_deaths += 1
        if not self.restart:
            self._say(f"{message}; the others keep running (--restart would restart it)")
            return
        if child.quick_deaths > self.max_restarts:
            child.given_up = True
            self._say(
                f"{message}; not restarted again: it died {child.quick_deaths} times in a "
                f"row within {self.stable_s:g} s of starting"
            )
            return
        delay = min(self.backoff_s * 2 ** (child.quick_deaths - 1), self.max_backoff_s)
        child.restart_at = now + delay
        self._say(
            f"{message}; restarting it from its log in {delay:g} s "
            f"(attempt {child.quick_deaths} of {self.max_restarts})"
        )

    def _say(self, line: str) -> None:
        self.report.write(f"pbft: {line}\n")
        self.report.flush()


def replica_command(cluster_path: Path, replica_id: int) -> list[str]:
    """The command line that runs one replica of a cluster file as its own process
    (`pbft replica`, through the interpreter running this one)."""
    return [
        sys.executable,
        "-m",
        "cli",
        "replica",
        "--cluster",
        str(cluster_path),
        "--id",
        str(replica_id),
    ]
