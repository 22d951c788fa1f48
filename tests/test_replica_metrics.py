"""`pbft replica --metrics 127.0.0.1:PORT`: Prometheus metrics from a real replica process.

Every server here is started by the test, on 127.0.0.1 only, and stopped by it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster
from runtime.metrics import (
    MAX_CONNECTIONS,
    MetricsAddressError,
    MetricsServer,
    drop_reason_label,
    open_metrics_listener,
    parse_address,
)
from runtime.ports import consecutive_free_ports
from runtime.supervisor import replica_command

STARTUP_S = 60.0  # replica processes start slowly on a loaded machine: an upper bound only


def test_parse_address_takes_loopback_only() -> None:
    assert parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_address("localhost:9100") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    for bad in (
        "0.0.0.0:9100",
        "10.0.0.1:9100",
        "example.com:80",
        "127.0.0.1",
        "9100",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "127.0.0.1:x",
        ":9100",
    ):
        with pytest.raises(MetricsAddressError):
            parse_address(bad)


def test_drop_reason_labels_are_a_closed_set() -> None:
    assert drop_reason_label("bad_signature") == "bad_signature"
    assert drop_reason_label("malformed_truncated") == "malformed_truncated"
    assert drop_reason_label("batch_request_bad_signature") == "batch_request_bad_signature"
    assert drop_reason_label("anything else") == "other"
    assert drop_reason_label("x" * 500) == "other"


def _metrics(port: int) -> dict[str, float]:
    """One scrape: every sample by name and labels, e.g. 'pbft_replica_drops_total{reason=x}'."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _wait_for_metrics(port: int, process: subprocess.Popen[bytes]) -> dict[str, float]:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the replica exited"
        try:
            return _metrics(port)
        except (httpx.HTTPError, AssertionError):
            time.sleep(0.2)
    raise AssertionError(f"no metrics on 127.0.0.1:{port} within {STARTUP_S} s")


@pytest.fixture
def metered_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, int]]:
    """Four replica processes; replica 0 (the primary of view 0) serves metrics."""
    local = LocalCluster.create(tmp_path, replicas=4, clients=2)
    (port,) = consecutive_free_ports(1)
    try:
        for replica in (1, 2, 3):
            local.start(replica)
        with local.log_path(0).open("ab") as log:
            local.processes[0] = subprocess.Popen(
                [*replica_command(local.path, 0), "--metrics", f"127.0.0.1:{port}"],
                stdout=log,
                stderr=log,
            )
        yield local, port
    finally:
        for replica, code in sorted(local.exited().items()):
            print(local.exit_report(replica, code), file=sys.stderr)
        local.stop_all()


async def _pay(local: LocalCluster, count: int) -> list[str]:
    async with PaymentClient(local.cluster, 0) as client:
        await client.wait_connected(timeout_s=STARTUP_S)
        return [
            (await client.pay("acct-00000", "acct-00002", 10 + i)).outcome for i in range(count)
        ]


def test_metrics_move_after_payments_and_survive_a_hostile_scraper(
    metered_cluster: tuple[LocalCluster, int],
) -> None:
    local, port = metered_cluster
    before = _wait_for_metrics(port, local.processes[0])
    for name in (
        "pbft_replica_events_handled_total",
        "pbft_replica_view",
        "pbft_replica_last_executed",
        "pbft_replica_stable_checkpoint",
        "pbft_replica_fsync_seconds_count",
        "pbft_replica_queue_depth{queue=inbound}",
        "pbft_replica_queue_depth{queue=writer}",
        "pbft_replica_queue_depth{queue=history}",
    ):
        assert name in before, name

    assert trio.run(_pay, local, 3) == ["confirmed"] * 3
    after = _metrics(port)
    assert (
        after["pbft_replica_batches_executed_total"]
        >= before["pbft_replica_batches_executed_total"] + 1
    )
    assert after["pbft_replica_last_executed"] >= before["pbft_replica_last_executed"] + 1
    assert after["pbft_replica_events_handled_total"] > before["pbft_replica_events_handled_total"]
    assert after["pbft_replica_fsync_seconds_count"] > before["pbft_replica_fsync_seconds_count"]
    assert (
        after["pbft_replica_fsync_seconds_bucket{le=+Inf}"]
        == after["pbft_replica_fsync_seconds_count"]
    )
    # The backups may have changed view while replica 0 started: the metric says so.
    assert after["pbft_replica_view"] >= after["pbft_replica_new_views_installed_total"]

    # A hostile scraper: many idle connections, and a request head far past the bound.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as huge:
            try:
                huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 200_000)
            except OSError:
                pass  # closed on us mid-send: refused, as it should be
            try:
                answer = huge.recv(4096)
            except OSError:
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
        # Past MAX_CONNECTIONS at once, a further one is closed without an answer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            try:
                extra.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                refused = extra.recv(4096)
            except ConnectionResetError:  # closed before our request arrived: refused too
                refused = b""
            assert refused == b""
        # The replica still orders payments meanwhile.
        assert trio.run(_pay, local, 1) == ["confirmed"]
    finally:
        for connection in idle:
            connection.close()
    assert len(idle) > MAX_CONNECTIONS
    # Once they are gone (or timed out), scraping works again.
    deadline = time.monotonic() + 10
    while True:
        try:
            final = _metrics(port)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "metrics never came back"
            time.sleep(0.2)
    assert final["pbft_replica_last_executed"] >= after["pbft_replica_last_executed"] + 1
    assert local.processes[0].poll() is None


def _run_replica(local: LocalCluster, metrics: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*replica_command(local.path, 0), "--metrics", metrics],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )


@pytest.mark.parametrize(
    ("metrics", "says"),
    [
        ("0.0.0.0:9100", "not a loopback address"),
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:0", "not in 1..65535"),
    ],
)
def test_bad_metrics_address_is_one_line_exit_2(tmp_path: Path, metrics: str, says: str) -> None:
    local = LocalCluster.create(tmp_path, replicas=4, clients=2)
    done = _run_replica(local, metrics)
    assert done.returncode == 2
    assert says in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "data-0").exists() or not any((tmp_path / "data-0").iterdir())


def test_taken_metrics_port_is_one_line_exit_2(tmp_path: Path) -> None:
    local = LocalCluster.create(tmp_path, replicas=4, clients=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = _run_replica(local, f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert "--metrics: cannot listen on 127.0.0.1:" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_cluster_up_serves_each_replicas_metrics_on_consecutive_ports(tmp_path: Path) -> None:
    base = consecutive_free_ports(4)[0]
    root = tmp_path / "cluster"
    out_path = tmp_path / "up.out"
    with out_path.open("wb") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "cluster",
                "up",
                "--dir",
                str(root),
                "--metrics-base-port",
                str(base),
            ],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        for replica in range(4):
            scraped = _wait_for_metrics(base + replica, up)
            assert "pbft_replica_view" in scraped
        assert f"metrics http://127.0.0.1:{base}/metrics" in out_path.read_text()
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=STARTUP_S) == 0


def test_cluster_up_refuses_a_metrics_base_port_out_of_range(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "cluster",
            "up",
            "--dir",
            str(tmp_path / "c"),
            "--metrics-base-port",
            "70000",
        ],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )
    assert done.returncode == 2
    assert done.stderr == "pbft: --metrics-base-port: 70000 is not in 1..65535\n"


class _Broken(Collector):
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a bug in a collector")


def test_server_answers_only_get_metrics_and_survives_a_failing_collector() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Broken())
    server = MetricsServer(registry)

    async def ask(port: int, request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            answer = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            return answer

    async def scenario() -> list[bytes]:
        listener = await open_metrics_listener("127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listener)
            answers = [
                await ask(port, b"POST /metrics HTTP/1.1\r\n\r\n"),
                await ask(port, b"GET /secrets HTTP/1.1\r\n\r\n"),
                await ask(port, b"GET /metrics HTTP/1.1\r\n\r\n"),
                await ask(port, b"nonsense\r\n\r\n"),
            ]
            nursery.cancel_scope.cancel()
        return answers

    answers = trio.run(scenario)
    assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [
        b"HTTP/1.1 405 Method Not Allowed",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 500 Internal Server Error",
        b"HTTP/1.1 405 Method Not Allowed",
    ]
    assert server.errors == 1 and server.served == 0
