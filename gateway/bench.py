"""`python -m gateway.bench`: what HTTP costs. The same closed-loop load (`concurrency`
tasks that each pay, wait for the decision and pay again) through PaymentClient directly
and through a `pbft gateway` process over HTTP, against one local cluster of four replica
processes, in one run; payments/s and p50/p99 latency of both side by side, and the ratio.

Rounds alternate (direct, HTTP, direct, HTTP, ...) so a machine that gets busier or quieter
during the run weighs on both alike; each phase's figures are over all its rounds.

The HTTP path does more than carry bytes: per payment the gateway checks the API key
(a SQLite read), writes the Idempotency-Key and request id before sending (an fsync) and
the decision, the payment and its event after (another), then answers JSON. So the ratio
is the gateway's whole price, not the price of HTTP alone. The gateway runs as its own
process (as in production), the HTTP client here; the direct client runs here too. Each
phase also reports the CPU milliseconds per payment of this process (the client side), the
gateway process and the replicas (/proc): on a machine busy with other work, latencies say
more about the neighbours than about the gateway, CPU per payment does not. Figures only:
nothing asserts a speed (target: HTTP at most 1.5x the direct latency).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.store import Database
from pbft.stats import nearest_rank
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster, cpu_seconds

PAYER, PAYEE = "acct-00000", "acct-00002"  # client 0 pays client 1 (write_cluster's layout)
STARTUP_S = 60.0
REQUEST_TIMEOUT_S = 60.0
MAX_PAYMENTS = 1_000_000
MAX_CONCURRENCY = 128  # the cluster's client_pending_limit by default


@dataclass
class Phase:
    name: str
    payments: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] | None = None
    # CPU seconds spent meanwhile: this process (the client side), the gateway process
    # (HTTP only), the replicas. Per payment, they show what each path costs the machine,
    # which a busy machine's latencies hide.
    client_cpu_s: float = 0.0
    gateway_cpu_s: float = 0.0
    replicas_cpu_s: float = 0.0

    def add(self, seconds: float, latencies_ms: list[float]) -> None:
        self.payments += len(latencies_ms)
        self.seconds += seconds
        self.latencies_ms = (self.latencies_ms or []) + latencies_ms

    def add_cpu(self, client_s: float, gateway_s: float, replicas_s: float) -> None:
        self.client_cpu_s += client_s
        self.gateway_cpu_s += gateway_s
        self.replicas_cpu_s += replicas_s

    def figures(self) -> dict[str, float]:
        latencies = sorted(self.latencies_ms or [0.0])
        return {
            "payments": self.payments,
            "seconds": round(self.seconds, 3),
            "per_s": round(self.payments / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(nearest_rank(latencies, 50), 2),
            "p99_ms": round(nearest_rank(latencies, 99), 2),
            "client_cpu_ms_per_payment": _per(self.client_cpu_s, self.payments),
            "gateway_cpu_ms_per_payment": _per(self.gateway_cpu_s, self.payments),
            "replicas_cpu_ms_per_payment": _per(self.replicas_cpu_s, self.payments),
        }


def _per(cpu_s: float, payments: int) -> float:
    return round(cpu_s * 1000 / payments, 2) if payments else 0.0


async def closed_loop(
    payments: int, concurrency: int, pay_one: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float]]:
    """`payments` calls of `pay_one(i)` by `concurrency` tasks; wall seconds and each
    call's latency in ms."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < payments:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await pay_one(index)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - started, latencies


async def direct_round(client: PaymentClient, payments: int, concurrency: int) -> Any:
    async def pay_one(_index: int) -> None:
        decided = await client.pay(PAYER, PAYEE, 1)
        if decided.outcome != "confirmed":
            raise RuntimeError(f"direct payment {decided.outcome}: {decided.reason}")

    return await closed_loop(payments, concurrency, pay_one)


async def http_round(http: httpx.AsyncClient, payments: int, concurrency: int) -> Any:
    body = {"from": PAYER, "to": PAYEE, "amount": 1}

    async def pay_one(_index: int) -> None:
        response = await http.post(
            "/v1/payments", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
        )
        if response.status_code != 200 or response.json()["status"] != "confirmed":
            raise RuntimeError(f"HTTP payment answered {response.status_code}: {response.text}")

    return await closed_loop(payments, concurrency, pay_one)


def start_gateway(root: Path, cluster_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`pbft gateway` for client 0 on a free port; the process, its URL and its log."""
    log_path = root / "gateway.log"
    command = [sys.executable, "-m", "cli", "gateway", "--cluster", str(cluster_path)]
    command += ["--client", "0", "--listen", "127.0.0.1:0", "--db", str(root / "gateway.sqlite")]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"listening"' in line and '"gateway"' in line:
                return process, str(json.loads(line)["url"]), log_path
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode} (see {log_path})")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the gateway did not listen within {STARTUP_S:g} s (see {log_path})")


def run(payments: int, concurrency: int, rounds: int, root: Path) -> dict[str, Any]:
    local = LocalCluster.create(root, replicas=4, clients=2)
    local.start_all()
    gateway: subprocess.Popen[bytes] | None = None
    try:
        trio.run(local.wait_listening, STARTUP_S)
        gateway, url, _log = start_gateway(root, local.path)
        database = Database(root / "gateway.sqlite")
        try:
            _key, token = database.create_key(0)
        finally:
            database.close()
        direct, http = Phase("direct"), Phase("http")
        gateway_pid = gateway.pid

        def cpu_now() -> tuple[float, float, float]:
            replicas = sum(cpu_seconds(local.pid(replica)) for replica in local.replica_ids)
            return time.process_time(), cpu_seconds(gateway_pid), replicas

        async def measure() -> None:
            async with (
                PaymentClient(local.cluster, 0, timeout_s=REQUEST_TIMEOUT_S) as client,
                httpx.AsyncClient(
                    base_url=url,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=REQUEST_TIMEOUT_S,
                    limits=httpx.Limits(max_connections=concurrency),
                ) as session,
            ):
                await client.wait_connected(timeout_s=STARTUP_S)
                await _until_healthy(session)
                # Warm both paths (connections, first-request costs) outside the figures.
                await direct_round(client, concurrency, concurrency)
                await http_round(session, concurrency, concurrency)
                for _ in range(rounds):
                    for phase, one_round in (
                        (direct, lambda: direct_round(client, payments, concurrency)),
                        (http, lambda: http_round(session, payments, concurrency)),
                    ):
                        before = cpu_now()
                        phase.add(*await one_round())
                        phase.add_cpu(
                            *(after - first for after, first in zip(cpu_now(), before, strict=True))
                        )

        trio.run(measure)
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        local.stop_all()
    direct_figures, http_figures = direct.figures(), http.figures()
    return {
        "payments_per_round": payments,
        "concurrency": concurrency,
        "rounds": rounds,
        "direct": direct_figures,
        "http": http_figures,
        "ratio": {
            "p50": _ratio(http_figures["p50_ms"], direct_figures["p50_ms"]),
            "p99": _ratio(http_figures["p99_ms"], direct_figures["p99_ms"]),
            "throughput": _ratio(direct_figures["per_s"], http_figures["per_s"]),
        },
    }


async def _until_healthy(session: httpx.AsyncClient) -> None:
    with trio.fail_after(STARTUP_S):
        while (await session.get("/healthz")).status_code != 200:
            await trio.sleep(0.1)


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2) if denominator else 0.0


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['rounds']} round(s) of {result['payments_per_round']} payments each way, "
        f"{result['concurrency']} at a time, 4 replicas on this machine",
        f"{'':24} {'payments/s':>11} {'p50 ms':>9} {'p99 ms':>9}   CPU ms per payment: "
        "client, gateway, replicas",
    ]
    for name, label in (("direct", "PaymentClient (direct)"), ("http", "HTTP (pbft gateway)")):
        figures = result[name]
        lines.append(
            f"{label:24} {figures['per_s']:>11} {figures['p50_ms']:>9} {figures['p99_ms']:>9}"
            f"   {figures['client_cpu_ms_per_payment']:>6} "
            f"{figures['gateway_cpu_ms_per_payment']:>7} "
            f"{figures['replicas_cpu_ms_per_payment']:>8}"
        )
    ratio = result["ratio"]
    lines.append(
        f"HTTP / direct: latency p50 {ratio['p50']}x, p99 {ratio['p99']}x; "
        f"throughput {ratio['throughput']}x lower (target: at most 1.5x)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench", description=__doc__)
    parser.add_argument("--payments", type=int, default=300, help="per round and path")
    parser.add_argument("--concurrency", type=int, default=8, help="payments in flight")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    arguments = parser.parse_args(argv)
    for option, value, most in (
        ("--payments", arguments.payments, MAX_PAYMENTS),
        ("--concurrency", arguments.concurrency, MAX_CONCURRENCY),
        ("--rounds", arguments.rounds, 100),
    ):
        if not 1 <= value <= most:
            print(f"gateway.bench: {option}: {value} is not in 1..{most}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as root:
        result = run(arguments.payments, arguments.concurrency, arguments.rounds, Path(root))
    print(json.dumps(result) if arguments.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
