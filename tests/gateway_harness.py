"""A real cluster and a real `pbft gateway` process on 127.0.0.1, for process tests.

    with GatewayHarness.start(tmp_path, clients=2) as harness:
        token = harness.create_key(0)
        with harness.http(token) as http:
            http.post("/v1/payments", json={...}, headers={"Idempotency-Key": "k1"})

The cluster is four `pbft replica` processes (runtime/localcluster.py); the gateway is
`python -m cli gateway ...` with its stderr (JSON lines) in ROOT/gateway.log, where the
harness reads the URL it listens on (it is started on port 0: no port to race for). API
keys are made with the CLI, `pbft gateway-key create`, as an operator makes them. Every
wait is bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster

# Processes start slowly on a loaded 2-core machine: generous, and only upper bounds.
STARTUP_S = 60.0
STOP_S = 30.0
HTTP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20


class GatewayProcess:
    """One `pbft gateway` process (restartable: each start appends to the same log)."""

    def __init__(
        self,
        root: Path,
        cluster_path: Path,
        clients: list[int],
        *,
        db: Path | None = None,
        replica: int | None = None,
        data: Path | None = None,
        extra: tuple[str, ...] = (),
        name: str = "gateway",
    ) -> None:
        self.root = root
        self.cluster_path = cluster_path
        self.clients = clients
        self.db = db if db is not None else root / f"{name}.sqlite"
        self.replica = replica
        self.data = data
        self.extra = extra
        self.log_path = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log_offset = 0

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "cli", "gateway", "--cluster", str(self.cluster_path)]
        for client in self.clients:
            command += ["--client", str(client)]
        command += ["--listen", "127.0.0.1:0", "--db", str(self.db)]
        if self.replica is not None:
            command += ["--replica", str(self.replica)]
        if self.data is not None:
            command += ["--data", str(self.data)]
        return command + list(self.extra)

    def start(self, timeout_s: float = STARTUP_S) -> str:
        """Start it and wait for its `listening` line; its base URL."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for record in self.records():
                if record.get("gateway") and record.get("event") == "listening":
                    self.url = str(record["url"])
                    return self.url
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the gateway exited with {code}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"the gateway did not listen within {timeout_s:g} s:\n{self.log_tail()}")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines of the current start."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def kill(self) -> None:
        """SIGKILL: the gateway gets no chance to finish anything."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_S)
            self.process = None

    def terminate(self) -> None:
        """SIGTERM, without waiting."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = STOP_S) -> int:
        assert self.process is not None
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_S)
            raise RuntimeError(f"the gateway ignored SIGTERM:\n{self.log_tail()}") from None
        self.process = None
        return code

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait()


def run_cli(*arguments: str, timeout_s: float = STARTUP_S) -> subprocess.CompletedProcess[str]:
    """`pbft ARGUMENTS` as a separate process (stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


class GatewayHarness:
    """A 4-replica cluster and one gateway for clients `clients` (all by default)."""

    def __init__(self, root: Path, local: LocalCluster, gateway: GatewayProcess) -> None:
        self.root = root
        self.local = local
        self.gateway = gateway

    @classmethod
    @contextmanager
    def start(
        cls,
        root: Path,
        *,
        clients: int = 2,
        gateway_clients: list[int] | None = None,
        replica: int | None = None,
        extra: tuple[str, ...] = (),
        protocol: dict[str, int] | None = None,
    ) -> Iterator[GatewayHarness]:
        """Start the replicas (all but `replica`, which the gateway hosts) and the gateway;
        stop everything on the way out."""
        local = LocalCluster.create(root, replicas=4, clients=clients, protocol=protocol)
        for replica_id in local.replica_ids:
            if replica_id != replica:
                local.start(replica_id)
        served = list(range(clients)) if gateway_clients is None else gateway_clients
        gateway = GatewayProcess(root, local.path, served, replica=replica, extra=extra)
        harness = cls(root, local, gateway)
        try:
            trio.run(local.wait_listening, STARTUP_S)
            gateway.start()
            harness.wait_connected()
            yield harness
        finally:
            problems = []
            try:
                gateway.stop()
            except RuntimeError as error:
                problems.append(str(error))
            for replica_id, code in sorted(local.exited().items()):
                print(local.exit_report(replica_id, code), file=sys.stderr)
            problems += local.stop_all()
            if problems:
                print("\n".join(problems), file=sys.stderr)

    def wait_connected(self, timeout_s: float = STARTUP_S) -> None:
        """Until /healthz says the gateway's clients reach enough replicas."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.gateway.url, timeout=HTTP_TIMEOUT_S) as http:
            while time.monotonic() < deadline:
                if http.get("/healthz").status_code == 200:
                    return
                time.sleep(0.1)
        raise RuntimeError(f"the gateway is not healthy after {timeout_s:g} s")

    def create_key(self, client: int, db: Path | None = None) -> str:
        """A new API key for `client`, made as an operator makes it:
        `pbft gateway-key create --db PATH --client I` (the token alone on stdout)."""
        database = str(db or self.gateway.db)
        ran = run_cli("gateway-key", "create", "--db", database, "--client", str(client))
        if ran.returncode != 0:
            raise RuntimeError(f"gateway-key create failed ({ran.returncode}): {ran.stderr}")
        return token_of(ran.stdout)

    def revoke_key(self, key_id: int) -> None:
        ran = run_cli("gateway-key", "revoke", "--db", str(self.gateway.db), "--id", str(key_id))
        if ran.returncode != 0:
            raise RuntimeError(f"gateway-key revoke failed ({ran.returncode}): {ran.stderr}")

    def key_ids(self) -> list[int]:
        ran = run_cli("gateway-key", "list", "--db", str(self.gateway.db))
        return [int(json.loads(line)["id"]) for line in ran.stdout.splitlines()]

    def http(self, token: str | None = None, **options: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(options.pop("headers", {}))
        return httpx.Client(
            base_url=self.gateway.url,
            headers=headers,
            timeout=options.pop("timeout", HTTP_TIMEOUT_S),
            **options,
        )

    def balances(self, accounts: list[str], client: int = 0) -> dict[str, int]:
        """Each account's available balance, read from the cluster directly (f + 1 agree)."""

        async def read() -> dict[str, int]:
            async with PaymentClient(self.local.cluster, client, timeout_s=30.0) as payments:
                return {account: (await payments.balance(account)).balance for account in accounts}

        return trio.run(read)


def token_of(stdout: str) -> str:
    """The token `pbft gateway-key create` prints, alone on stdout."""
    token = stdout.strip()
    if not token.startswith("gk_") or len(token.split()) != 1:
        raise RuntimeError(f"no token in {stdout!r}")
    return token
