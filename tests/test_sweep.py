"""`pbft sweep`: seeds parse strictly, results come back in seed order and replay exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from sim.scenario import load_scenario
from sim.simulator import run_scenario
from sim.sweep import SeedRangeError, parse_seeds, sweep

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


@pytest.fixture
def scenario_path(tmp_path: Path) -> str:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return str(path)


def test_seed_ranges_are_inclusive_and_keep_their_order() -> None:
    assert parse_seeds("0..3") == [0, 1, 2, 3]
    assert parse_seeds("7") == [7]
    assert parse_seeds("9, 1..2, 9") == [9, 1, 2]


@pytest.mark.parametrize("text", ["", "a", "3..1", "1..x", "-1", "0..2000000"])
def test_bad_seed_ranges_are_rejected(text: str) -> None:
    with pytest.raises(SeedRangeError):
        parse_seeds(text)


def test_parallel_sweep_reports_in_seed_order_and_matches_single_runs(scenario_path: str) -> None:
    seeds = [4, 0, 2]
    outcomes = sweep(scenario_path, seeds, jobs=2)
    assert [outcome.seed for outcome in outcomes] == seeds
    scenario = load_scenario(scenario_path)
    for outcome in outcomes:
        assert outcome.verdict == "ok", outcome.problems
        assert outcome.trace_hash == run_scenario(scenario, outcome.seed).trace_hash


def test_sweep_exit_code_and_replay_lines_for_failing_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "unmet.toml"
    path.write_text(
        SMALL.replace('behavior = "equivocate"', 'behavior = "silent"')
        + "[expect]\nsafety = false\n"
    )
    assert main(["sweep", str(path), "--seeds", "0..1", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert f"pbft run {path} --seed 0" in out
    assert f"pbft run {path} --seed 1" in out
    assert "violated   2" in out


def test_sweep_rejects_bad_arguments(scenario_path: str) -> None:
    assert main(["sweep", scenario_path, "--seeds", "9..1"]) == 2
    assert main(["sweep", scenario_path, "--jobs", "0"]) == 2
    assert main(["sweep", "/no/such/file.toml"]) == 2
