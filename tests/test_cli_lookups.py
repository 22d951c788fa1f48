"""`pbft status | history | hold`: every user mistake is one line naming what is wrong and exit
2, before anything is sent; no f + 1 matching answers is exit 4. No replica runs here (the
cluster file's ports are served by nobody); tests/test_cli_operations_cluster.py asks a real
cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cli.exits import EXIT_NO_DECISION, EXIT_USAGE
from cli.main import main
from runtime.cluster import write_cluster
from runtime.ports import consecutive_free_ports


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    return write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])


GOOD = {
    "status": ["--request-id", "17"],
    "history": ["--account", "acct-00000"],
    "hold": ["0:17"],
}


def _argv(cluster_file: Path, command: str, *extra: str) -> list[str]:
    return [command, "--cluster", str(cluster_file), *GOOD[command], *extra]


MISTAKES = [
    ("status", ["--request-id", "-1"], "--request-id: -1 is not in 0..2**64-1"),
    ("status", ["--client-id", str(2**32)], "--client-id: 4294967296 is not in 0..4294967295"),
    ("status", ["--client", "7"], "--client: client 7 is unknown to the cluster"),
    ("status", ["--timeout", "-2"], "--timeout: -2 is not in (0, 86400] seconds"),
    ("status", ["--receipt", "/nonexistent-dir/r.bin"], "the directory /nonexistent-dir"),
    (
        "status",
        ["--client-id", "1", "--receipt", "r.bin"],
        "--receipt: a receipt is for the asking client's own requests; this one is client 1's",
    ),
    ("history", ["--account", ""], "--account: an account name has 1..64 characters"),
    ("history", ["--after", "5"], "--after: '5' is not SEQ:POSITION"),
    ("history", ["--after", f"{2**64}:0"], "--after: 18446744073709551616:0 is out of range"),
    ("history", ["--limit", "0"], "--limit: 0 is not in 1..256"),
    ("history", ["--limit", "257"], "--limit: 257 is not in 1..256"),
    ("hold", ["--client", "9"], "--client: client 9 is unknown to the cluster"),
]


@pytest.mark.parametrize(("command", "extra", "says"), MISTAKES)
def test_mistakes_exit_2_in_one_line_before_anything_is_sent(
    cluster_file: Path,
    command: str,
    extra: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    assert main(_argv(cluster_file, command, "--timeout", "30", *extra)) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pbft: ") and says in lines[0], captured.err
    assert captured.out == ""
    assert time.monotonic() - started < 10  # no 30 s wait for replicas that are not there


@pytest.mark.parametrize("hold", ["17", "0:x", "", "0:1:2"])
def test_a_hold_id_that_is_not_client_request_exits_2(
    cluster_file: Path, hold: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hold", "--cluster", str(cluster_file), hold]) == EXIT_USAGE
    line = capsys.readouterr().err.strip()
    assert line == f"pbft: hold: {hold!r} is not CLIENT:REQUEST (two integers, e.g. 0:17)"


@pytest.mark.parametrize("command", sorted(GOOD))
def test_no_answer_exits_4(
    cluster_file: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(cluster_file, command, "--timeout", "0.2")) == EXIT_NO_DECISION
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "pbft: no f + 1 matching answers within 0.2 s"
