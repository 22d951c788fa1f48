"""`--scheduler` (seeds as tasks on a dask.distributed cluster), `pbft sweep --json -`, and
progress output that stays off redirected stderr."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

import sim.dask_pool
from cli.main import main
from sim.dask_pool import SchedulerError, connect, executor
from sim.fuzz import fuzz, run_case
from sim.progress import TerminalProgress
from sim.sweep import sweep

SMALL = """
name = "sweep-small"
seed = 3
[workload]
payments = 15
rate_per_s = 200
[[byzantine]]
replica = 0
behavior = "equivocate"
"""

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scenario_path(tmp_path: Path) -> str:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return str(path)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # In-process workers on loopback only, no dashboard; closed when the module ends.
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address=None,
    ) as local:
        yield local


def test_a_sweep_on_dask_gives_the_local_verdicts_and_trace_hashes(
    cluster: LocalCluster, scenario_path: str
) -> None:
    seeds = [0, 1, 2, 3]
    local = sweep(scenario_path, seeds, 1)
    with Client(cluster, set_as_default=False) as client:
        remote = sweep(scenario_path, seeds, 2, executor=executor(client))
    assert [o.seed for o in remote] == seeds
    assert [(o.verdict, o.trace_hash, o.view_changes) for o in remote] == [
        (o.verdict, o.trace_hash, o.view_changes) for o in local
    ]
    assert all(o.trace_hash for o in remote)


def test_a_fuzz_on_dask_runs_the_same_cases_as_a_local_fuzz(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    local = fuzz(11, 4, 120.0, 1, tmp_path / "local", max_runs=3)
    with Client(cluster, set_as_default=False) as client:
        remote = fuzz(11, 4, 120.0, 2, tmp_path / "remote", max_runs=3, executor=executor(client))
    assert remote.runs == local.runs == 3
    assert [(f.seed, f.signature) for f in remote.failures] == [
        (f.seed, f.signature) for f in local.failures
    ]
    # Case by case, a worker's outcome is the local one (fuzz keeps only the failures).
    with Client(cluster, set_as_default=False) as client:
        pool = executor(client)
        remote_cases = [pool.submit(run_case, seed, 4).result(timeout=60) for seed in (11, 12)]
    for case in remote_cases:
        here = run_case(case.seed, 4)
        assert (case.verdict, case.signature, case.problems) == (
            here.verdict,
            here.signature,
            here.problems,
        )


def test_pbft_sweep_and_fuzz_accept_a_scheduler_address(
    cluster: LocalCluster, scenario_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = cluster.scheduler_address
    assert address.startswith("tcp://127.0.0.1:")
    code = main(["sweep", scenario_path, "--seeds", "0..2", "--scheduler", address, "--json", "-"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["verdicts"]["ok"] == 3
    code = main(
        ["fuzz", "--seed", "5", "--budget", "1", "--out", str(tmp_path), "--scheduler", address]
    )
    assert code in (0, 1)
    assert f"on {address}" in capsys.readouterr().err


def test_an_unreachable_scheduler_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, scenario_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sim.dask_pool, "CONNECT_TIMEOUT_S", 0.5)
    # Port 9 (discard) on loopback: nothing listens there in a test environment.
    for command in (
        ["sweep", scenario_path, "--seeds", "0", "--scheduler", "tcp://127.0.0.1:9"],
        ["fuzz", "--budget", "1", "--scheduler", "tcp://127.0.0.1:9"],
        ["sweep", scenario_path, "--scheduler", "localhost"],
        ["sweep", scenario_path, "--scheduler", "tls://127.0.0.1:9"],
    ):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert lines[-1].startswith("pbft: --scheduler: ")
        assert "Traceback" not in captured.err
    with pytest.raises(SchedulerError):
        connect("tcp://127.0.0.1:9", timeout_s=0.2)


def test_sweep_json_dash_is_pure_json_with_per_seed_figures_and_spread(
    scenario_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", scenario_path, "--seeds", "0..2", "--jobs", "1", "--json", "-"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # nothing but the document on stdout
    assert "verdict" in captured.err  # the text report moved to stderr
    assert [entry["seed"] for entry in document["per_seed"]] == [0, 1, 2]
    for entry in document["per_seed"]:
        assert entry["verdict"] == "ok"
        assert 0 < entry["latency_p50_ms"] <= entry["latency_p99_ms"]
        assert entry["view_changes"] >= 1  # replica 0, the first primary, equivocates
        assert len(entry["trace_hash"]) == 64
    p50 = sorted(entry["latency_p50_ms"] for entry in document["per_seed"])
    assert document["spread"]["latency_p50_ms"] == {
        "min": p50[0],
        "median": p50[1],
        "max": p50[2],
    }
    assert document["verdicts"] == {"ok": 3, "violated": 0, "error": 0}


def test_sweep_json_to_a_file_keeps_the_text_report_on_stdout(
    scenario_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.json"
    assert main(["sweep", scenario_path, "--seeds", "4", "--jobs", "1", "--json", str(out)]) == 0
    assert "verdict" in capsys.readouterr().out
    assert json.loads(out.read_text())["seeds"] == 1
    assert main(["sweep", scenario_path, "--json", str(tmp_path / "no" / "x.json")]) == 2


def test_redirected_stderr_gets_no_progress_bar(scenario_path: str, tmp_path: Path) -> None:
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        finished = subprocess.run(
            [sys.executable, "-m", "cli", "sweep", scenario_path, "--seeds", "0..1", "--jobs", "1"],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    assert finished.returncode == 0
    assert err_path.read_text() == ""
    assert b"\x1b" not in finished.stdout and b"seeds      2" in finished.stdout


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal() -> None:
    terminal, redirected = _Terminal(), io.StringIO()
    for stream in (terminal, redirected):
        with TerminalProgress("sweep", 4, stream) as progress:
            progress.sweep_step(4, 4, 1)
    assert "4/4" in terminal.getvalue() and "failing 1" in terminal.getvalue()
    assert redirected.getvalue() == ""
