"""`pbft gateway`'s refusals: every mistake is one line naming it and exit 2, found before
anything listens (the port taken: as soon as the bind fails). No cluster runs here: every
case is refused before one would be needed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cli.exits import EXIT_REPLICA_LOCKED, EXIT_USAGE
from cli.main import main
from gateway.server import ListenAddressError, parse_listen
from runtime.cluster import write_cluster
from runtime.localcluster import LocalCluster
from runtime.ports import consecutive_free_ports


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gateway-cli")
    return write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])


def refused(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    code = main(["gateway", *arguments])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pbft: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--listen", "0.0.0.0:8080"], "not a loopback address"),
        (["--listen", "10.1.2.3:8080"], "not a loopback address"),
        (["--listen", "localhost:8080"], "not an IP address"),
        (["--listen", "127.0.0.1"], "not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "not in 0..65535"),
        (["--listen", "127.0.0.1:http"], "not in 0..65535"),
        (["--client", "9"], "no client 9"),
        (["--client", "0"], "given twice"),
        (["--data", "somewhere"], "--data: only with --replica"),
        (["--replica", "7"], "no replica 7"),
        (["--cluster-timeout-s", "0"], "--cluster-timeout-s"),
        (["--cluster-timeout-s", "nan"], "--cluster-timeout-s"),
        (["--graceful-timeout-s", "-1"], "--graceful-timeout-s"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(
    cluster_file: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], says: str
) -> None:
    line = refused(capsys, "--cluster", str(cluster_file), "--client", "0", *arguments)
    assert says in line, line


def test_a_bad_db_path_is_one_line_and_exit_2(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--cluster", str(cluster_file), "--client", "0", "--listen", "127.0.0.1:0"]
    line = refused(capsys, *base, "--db", str(tmp_path / "missing" / "gateway.sqlite"))
    assert "does not exist" in line
    line = refused(capsys, *base, "--db", str(tmp_path))
    assert "is a directory" in line
    garbage = tmp_path / "not-a-db.sqlite"
    garbage.write_bytes(b"this is no database" * 100)
    line = refused(capsys, *base, "--db", str(garbage))
    assert "--db" in line


def test_a_missing_cluster_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(capsys, "--cluster", str(tmp_path / "none.toml"), "--client", "0")
    assert "none.toml" in line


def test_a_taken_port_is_one_line_and_exit_2(cluster_file: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = subprocess.run(
            [sys.executable, "-m", "cli", "gateway", "--cluster", str(cluster_file)]
            + ["--client", "0", "--listen", f"127.0.0.1:{port}"]
            + ["--db", str(tmp_path / "gateway.sqlite")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == EXIT_USAGE, ran.stderr
    problems = [line for line in ran.stderr.splitlines() if line.startswith("pbft: ")]
    assert problems == [
        f"pbft: --listen 127.0.0.1:{port}: address in use (another process "
        "listens there, or on the embedded replica's port)"
    ], ran.stderr
    assert "Traceback" not in ran.stderr


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["gateway", "--help"])
    out = capsys.readouterr().out
    for code in ("0  stopped", "2  bad arguments", "3  an internal error", "4  --replica"):
        assert code in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("127.0.0.1:0", ("127.0.0.1", 0)),
     ("[::1]:9000", ("::1", 9000)), ("127.5.6.7:1", ("127.5.6.7", 1))],
)  # fmt: skip
def test_loopback_addresses_are_accepted(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_an_empty_host_is_refused() -> None:
    with pytest.raises(ListenAddressError):
        parse_listen(":8080")


def test_a_replica_that_already_runs_elsewhere_is_exit_4(tmp_path: Path) -> None:
    local = LocalCluster.create(tmp_path, replicas=4, clients=1)
    local.start(0)
    try:
        trio.run(local.wait_listening, 60.0)
        ran = subprocess.run(
            [sys.executable, "-m", "cli", "gateway", "--cluster", str(local.path)]
            + ["--client", "0", "--listen", "127.0.0.1:0", "--replica", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        local.stop_all()
    assert ran.returncode == EXIT_REPLICA_LOCKED, ran.stderr
    problems = [line for line in ran.stderr.splitlines() if line.startswith("pbft: ")]
    assert len(problems) == 1 and "replica 0 is already running" in problems[0], ran.stderr
    assert "Traceback" not in ran.stderr
