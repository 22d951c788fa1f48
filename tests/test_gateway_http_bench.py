"""`python -m gateway.bench` runs, tiny: both paths pay through one real cluster and the
report carries both sets of figures and their ratios. Figures only: no speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.bench import main


def test_the_benchmark_runs_both_paths_and_reports_them() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "gateway.bench", "--payments", "4", "--concurrency", "2"]
        + ["--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    for path in ("direct", "http"):
        figures = result[path]
        assert figures["payments"] == 4, figures
        assert figures["per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"], figures
    assert set(result["ratio"]) == {"p50", "p99", "throughput"}
    assert all(value > 0 for value in result["ratio"].values())


def test_bad_options_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--payments", "0"], ["--concurrency", "1000"], ["--rounds", "-1"]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gateway.bench: {argv[0]}: "), lines
