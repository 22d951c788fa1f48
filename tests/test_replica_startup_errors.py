"""`pbft replica` start-up failures: each is one line naming what is wrong and its own exit
code (they were all "internal error", exit 3, with a traceback); the key is checked before
anything is created; the data directory and the log are owner-only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cli.exits import (
    EXIT_REPLICA_LOCKED,
    EXIT_STORAGE_CORRUPT,
    EXIT_STORAGE_FAILED,
)
from cli.main import main
from runtime.cluster import load_cluster, write_cluster
from runtime.node import ReplicaNode
from runtime.storage import DurableStore

REPLICA = 1


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    return write_cluster(tmp_path, replicas=4, clients=1)


def run_replica(
    cluster_file: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    code = main(
        ["replica", "--cluster", str(cluster_file), "--id", str(REPLICA), "--data", str(data)]
    )
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "internal error" not in stderr
    # Besides the node's JSON event lines, exactly one line: the error.
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("pbft: "), stderr
    return code, lines[0]


def test_a_private_key_readable_by_others_is_exit_2_and_nothing_is_created(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / f"replica-{REPLICA}.key"
    key.chmod(0o644)
    data = tmp_path / "data"
    code, error = run_replica(cluster_file, data, capsys)
    assert code == 2
    assert str(key) in error and "chmod 600" in error
    assert not data.exists()


def test_a_missing_private_key_is_exit_2(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / f"replica-{REPLICA}.key").unlink()
    code, error = run_replica(cluster_file, tmp_path / "data", capsys)
    assert code == 2 and "does not exist" in error


def test_a_replica_already_running_is_exit_4(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with DurableStore.open(data / f"replica-{REPLICA}.log"):  # the other process's lock
        code, error = run_replica(cluster_file, data, capsys)
    assert code == EXIT_REPLICA_LOCKED
    assert "already running" in error and f"replica-{REPLICA}.log" in error


def test_a_log_that_cannot_be_opened_is_exit_5(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    (data / f"replica-{REPLICA}.log").mkdir(parents=True)  # not a file: open fails
    code, error = run_replica(cluster_file, data, capsys)
    assert code == EXIT_STORAGE_FAILED
    assert "storage failed" in error and "Is a directory" in error


def test_a_damaged_log_is_exit_6_and_an_open_data_directory_is_restricted(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    log = data / f"replica-{REPLICA}.log"
    log.write_bytes(b"not a log at all, and long enough for a header")
    code, error = run_replica(cluster_file, data, capsys)
    assert code == EXIT_STORAGE_CORRUPT
    assert "damaged storage" in error and str(log) in error and "byte 0" in error
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_a_data_path_that_is_a_file_is_exit_2(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.write_text("")
    code, error = run_replica(cluster_file, data, capsys)
    assert code == 2 and str(data) in error


def test_the_data_directory_is_created_owner_only(cluster_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "deep" / "data"
    ReplicaNode(load_cluster(cluster_file), REPLICA, data)._prepare_data_dir()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_replica_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["replica", "--help"])
    out = capsys.readouterr().out
    for code in ("2", "3", "4", "5", "6", "7"):
        assert f"\n  {code}  " in out
