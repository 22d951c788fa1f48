"""`pbft bench`: a brief real run (n = 4 replica processes on 127.0.0.1) whose JSON holds
every figure with a sane value, and the answers to mistakes (one line, exit 2, nothing
started). No timing assertions: how fast the cluster is depends on the machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cli.main import EXIT_OK, EXIT_USAGE, main
from runtime.bench import Ceiling

REQUIRED = (
    "replicas",
    "throughput_per_s",
    "ceiling_per_s",
    "ratio_to_ceiling",
    "lone_p50_ms",
    "lone_p99_ms",
    "load_p50_ms",
    "load_p99_ms",
    "fsyncs_per_payment",
    "cpu_s_per_payment",
)


def test_bench_json_has_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            "--replicas",
            "4",
            "--clients",
            "2",
            "--concurrency",
            "4",
            "--seconds",
            "2",
            "--rate",
            "40",
            "--json",
            "-",
        ]
    )
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    result = json.loads(captured.out)  # stdout is the JSON and nothing else
    assert result["cores"] >= 1
    assert "share" in captured.err  # the table (on stderr) says the cores are shared
    (run,) = result["runs"]
    for key in REQUIRED:
        assert isinstance(run[key], int | float) and math.isfinite(run[key]), key
    assert run["replicas"] == 4
    for key in REQUIRED[1:]:
        assert run[key] > 0, key
    assert 0 < run["ratio_to_ceiling"] <= 1
    assert run["ratio_to_ceiling"] == pytest.approx(
        run["throughput_per_s"] / run["ceiling_per_s"], rel=0.01
    )
    assert run["lone_p99_ms"] >= run["lone_p50_ms"]
    assert run["load_p999_ms"] >= run["load_p99_ms"] >= run["load_p50_ms"]
    assert run["load_timeouts"] == 0 and run["load_rejected"] == 0
    # One payment at a time: at least 2f + 1 = 3 replicas persist its batch before voting.
    assert run["lone_fsyncs_per_payment"] >= 3
    assert run["messages_per_payment"] > 0
    opened = run["open_loop"]
    assert opened["offered_per_s"] == 40
    assert opened["payments"] > 0 and opened["timeouts"] == 0
    assert opened["p99_ms"] >= opened["p50_ms"] > 0


def test_bench_takes_the_genesis_as_a_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--accounts N: the cluster file holds a rule, not N accounts; payments still decide."""
    code = main(
        ["bench", "--replicas", "4", "--clients", "2", "--concurrency", "2", "--seconds", "1"]
        + ["--accounts", "50000", "--json", str(tmp_path / "out.json")]
    )
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    (run,) = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert run["accounts"] == 50_000 and run["start_s"] > 0
    assert run["load_payments"] > 0 and run["load_timeouts"] == 0 and run["load_rejected"] == 0
    assert "50,000 genesis accounts" in captured.out


def test_ceiling_formula() -> None:
    # cores / (sign + n x verify): 2 cores, 40 us + 4 x 100 us = 440 us a payment.
    assert Ceiling(sign_us=40.0, verify_us=100.0, cores=2).per_s(4) == pytest.approx(4545.45, 1e-4)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--replicas", "3"], "--replicas: 3"),
        (["--replicas", "4", "--replicas", "1000"], "--replicas: 1000"),
        (["--seconds", "0"], "--seconds: 0"),
        (["--seconds", "nan"], "--seconds"),
        (["--rate", "-1"], "--rate: -1"),
        (["--rate", "inf"], "--rate"),
        (["--clients", "0"], "--clients: 0"),
        (["--concurrency", "0"], "--concurrency: 0"),
        (["--json", "/nonexistent-dir/out.json"], "--json"),
        (["--accounts", "1"], "--accounts: 1"),
        (["--clients", "4", "--accounts", "7"], "--accounts: 7"),
        (["--accounts", "10000001"], "--accounts: 10000001"),
    ],
)
def test_bench_mistakes(
    arguments: list[str], named: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["bench", *arguments]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pbft: ") and named in lines[0], lines
    assert "Traceback" not in captured.err
