"""Tests for the `pbft` command line: `pbft run FILE [--seed N] [--json PATH|-] [--trace PATH]`
and its exit codes (0 ok, 1 expectation unmet, 2 bad scenario or arguments)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pbft.cli import EXIT_OK, EXIT_USAGE, EXIT_VIOLATED, main

ROOT = Path(__file__).resolve().parent.parent
FAULT_FREE = ROOT / "scenarios" / "fault-free.toml"
CHECK_NAMES = ("agreement", "validity", "integrity", "conservation", "receipts", "liveness")
SUMMARY_KEYS = {
    "scenario",
    "seed",
    "trace_hash",
    "payments",
    "rejections",
    "checks",
    "view_changes",
    "latency_ms",
    "verdict",
}

SMALL = """
name = "small"
seed = 4

[workload]
payments = 20
rate_per_s = 200
"""

UNMET = """
name = "unmet"
seed = 4

[workload]
payments = 20
rate_per_s = 200

[expect]
safety = false
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _json_after_summary(stdout: str) -> dict[str, Any]:
    """`--json -` prints the text summary, then the JSON document starting at a `{` line."""
    start = stdout.index("\n{\n") + 1
    document = json.loads(stdout[start:])
    assert isinstance(document, dict)
    return document


def _assert_summary_shape(summary: dict[str, Any]) -> None:
    assert SUMMARY_KEYS <= set(summary)
    assert set(summary["payments"]) == {"submitted", "confirmed", "rejected", "undecided"}
    assert set(summary["checks"]) == set(CHECK_NAMES)
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert re.fullmatch(r"[0-9a-f]{64}", summary["trace_hash"])
    payments = summary["payments"]
    assert payments["submitted"] == (
        payments["confirmed"] + payments["rejected"] + payments["undecided"]
    )
    assert payments["rejected"] == sum(summary["rejections"].values())


# --- a good run -----------------------------------------------------------------------------


def test_run_fault_free_exits_0_and_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(FAULT_FREE)]) == EXIT_OK
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert re.search(
        r"^payments +submitted 200 +confirmed \d+ +rejected \d+ +undecided 0$", out, re.M
    )
    assert re.search(r"^latency \(ms\) +p50 [\d.]+ +p95 [\d.]+ +p99 [\d.]+", out, re.M)
    for name in CHECK_NAMES:
        assert re.search(rf"^check +{name} +ok$", out, re.M), name
    assert re.search(r"^trace hash +[0-9a-f]{64} ", out, re.M)
    assert lines[-1].split() == ["verdict", "ok"]
    assert "UNMET" not in out


def test_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(FAULT_FREE), "--json", "-"]) == EXIT_OK
    out = capsys.readouterr().out
    summary = _json_after_summary(out)
    _assert_summary_shape(summary)
    assert summary["scenario"] == "fault-free"
    assert summary["seed"] == 1
    assert summary["verdict"] == "ok"
    assert summary["payments"]["submitted"] == 200
    assert summary["payments"]["undecided"] == 0
    assert all(state == "ok" for state in summary["checks"].values())
    # The text summary and the JSON describe the same run.
    assert f"trace hash    {summary['trace_hash']}" in out


def test_json_to_a_file_matches_json_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "small.toml", SMALL)
    target = tmp_path / "summary.json"
    assert main(["run", str(scenario), "--json", str(target)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "\n{\n" not in printed  # the JSON went to the file, not to stdout
    from_file = json.loads(target.read_text(encoding="utf-8"))
    _assert_summary_shape(from_file)
    assert from_file["scenario"] == "small"
    assert main(["run", str(scenario), "--json", "-"]) == EXIT_OK
    from_stdout = _json_after_summary(capsys.readouterr().out)
    from_file.pop("wall_s", None)
    from_stdout.pop("wall_s", None)
    assert from_file == from_stdout


def test_seed_option_overrides_the_scenario_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "small.toml", SMALL)
    assert main(["run", str(scenario), "--json", "-"]) == EXIT_OK
    default = _json_after_summary(capsys.readouterr().out)
    assert main(["run", str(scenario), "--seed", "7", "--json", "-"]) == EXIT_OK
    out = capsys.readouterr().out
    seeded = _json_after_summary(out)
    assert default["seed"] == 4
    assert seeded["seed"] == 7
    assert re.search(r"^seed +7$", out, re.M)
    assert seeded["trace_hash"] != default["trace_hash"]


def test_trace_option_writes_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = _write(tmp_path, "small.toml", SMALL)
    trace = tmp_path / "trace.jsonl"
    assert main(["run", str(scenario), "--trace", str(trace), "--json", "-"]) == EXIT_OK
    summary = _json_after_summary(capsys.readouterr().out)
    lines = trace.read_text(encoding="utf-8").splitlines()
    assert len(lines) == summary["trace_events"] > 0
    for line in lines:
        assert {"time_ms", "kind", "node", "detail"} <= set(json.loads(line))


def test_console_script_runs_the_cli(tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "pbft"
    assert executable.exists(), f"no console script at {executable}"
    scenario = _write(tmp_path, "small.toml", SMALL)
    completed = subprocess.run(
        [str(executable), "run", str(scenario), "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == EXIT_OK, completed.stderr
    summary = _json_after_summary(completed.stdout)
    _assert_summary_shape(summary)
    assert summary["verdict"] == "ok"
    missing = subprocess.run(
        [str(executable), "run", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == EXIT_USAGE
    assert "missing.toml" in missing.stderr


# --- an unmet expectation -------------------------------------------------------------------


def test_unmet_expectation_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = _write(tmp_path, "unmet.toml", UNMET)
    assert main(["run", str(scenario), "--json", "-"]) == EXIT_VIOLATED
    out = capsys.readouterr().out
    summary = _json_after_summary(out)
    assert summary["verdict"] == "violated"
    assert all(state == "ok" for state in summary["checks"].values())
    assert summary["expectation_failures"]
    assert re.search(r"^UNMET +expected a safety violation", out, re.M)
    assert re.search(r"^verdict +violated$", out, re.M)


# --- bad scenario files ---------------------------------------------------------------------


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_unknown_key_exits_2_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "typo.toml", SMALL.replace("payments = 20", "paymnets = 20"))
    error = _usage_error(["run", str(scenario)], capsys)
    assert str(scenario) in error
    assert "workload.paymnets" in error
    assert "unknown key" in error


def test_missing_file_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.toml"
    error = _usage_error(["run", str(missing)], capsys)
    assert str(missing) in error
    assert "file" in error


def test_invalid_toml_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "broken.toml", 'name = "broken"\n[workload\npayments = 1\n')
    error = _usage_error(["run", str(scenario)], capsys)
    assert str(scenario) in error
    assert "file: invalid TOML" in error


def test_out_of_range_value_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "range.toml", SMALL + "\n[network]\ndrop = 1.5\n")
    error = _usage_error(["run", str(scenario)], capsys)
    assert str(scenario) in error
    assert "network.drop" in error


# --- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["run", str(FAULT_FREE), "--seed", "abc"], ["frobnicate"]],
    ids=["no-subcommand", "no-file", "seed-not-a-number", "unknown-subcommand"],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    assert "usage: pbft" in captured.err
    assert "error:" in captured.err


def test_seed_out_of_range_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    error = _usage_error(["run", str(FAULT_FREE), "--seed", "-1"], capsys)
    assert "--seed" in error


@pytest.mark.parametrize("option", ["--trace", "--json"])
def test_unwritable_output_path_is_a_usage_error_not_an_internal_error(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An output path in a directory that does not exist is a bad argument (exit 2 with a
    # message naming it), not "internal error (a bug ...)" with a traceback (exit 3).
    scenario = _write(tmp_path, "small.toml", SMALL)
    target = tmp_path / "no-such-directory" / "out.json"
    status = main(["run", str(scenario), option, str(target)])
    error = capsys.readouterr().err
    assert status == EXIT_USAGE, error
    assert str(target) in error
    assert "internal error" not in error


# --- an empty workload ----------------------------------------------------------------------


def test_empty_workload_reports_no_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "empty.toml", 'name = "empty"\n[workload]\npayments = 0\n')
    assert main(["run", str(scenario), "--json", "-"]) == EXIT_OK
    out = capsys.readouterr().out
    summary = _json_after_summary(out)
    assert summary["payments"] == {"submitted": 0, "confirmed": 0, "rejected": 0, "undecided": 0}
    assert summary["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert re.search(r"^latency \(ms\) +p50 - +p95 - +p99 -", out, re.M)
