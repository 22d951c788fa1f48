"""Tests for the `pbft` command line: `pbft run FILE [--seed N] [--json PATH|-] [--trace PATH]`
and its exit codes (0 ok, 1 expectation unmet, 2 bad scenario or arguments), and the
other commands' answers to obviously wrong arguments (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.main import EXIT_OK, EXIT_USAGE, EXIT_VIOLATED, main

ROOT = Path(__file__).resolve().parent.parent
FAULT_FREE = ROOT / "scenarios" / "fault-free.toml"
CHECK_NAMES = (
    "agreement",
    "validity",
    "integrity",
    "conservation",
    "holds",
    "refunds",
    "hold_fates",
    "receipts",
    "new_view_kept",
    "liveness",
)
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


def _json_document(stdout: str) -> dict[str, Any]:
    """`--json -` writes the JSON document alone to stdout (the text summary to stderr)."""
    document = json.loads(stdout)
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
    captured = capsys.readouterr()
    out = captured.err
    summary = _json_document(captured.out)
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
    from_stdout = _json_document(capsys.readouterr().out)
    from_file.pop("wall_s", None)
    from_stdout.pop("wall_s", None)
    assert from_file == from_stdout


def test_seed_option_overrides_the_scenario_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "small.toml", SMALL)
    assert main(["run", str(scenario), "--json", "-"]) == EXIT_OK
    default = _json_document(capsys.readouterr().out)
    assert main(["run", str(scenario), "--seed", "7", "--json", "-"]) == EXIT_OK
    captured = capsys.readouterr()
    out = captured.err
    seeded = _json_document(captured.out)
    assert default["seed"] == 4
    assert seeded["seed"] == 7
    assert re.search(r"^seed +7$", out, re.M)
    assert seeded["trace_hash"] != default["trace_hash"]


def test_trace_option_writes_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = _write(tmp_path, "small.toml", SMALL)
    trace = tmp_path / "trace.jsonl"
    assert main(["run", str(scenario), "--trace", str(trace), "--json", "-"]) == EXIT_OK
    summary = _json_document(capsys.readouterr().out)
    lines = trace.read_text(encoding="utf-8").splitlines()
    # Annotations for `pbft explain` ("hashed": false) are outside the count.
    hashed = [line for line in lines if json.loads(line).get("hashed", True)]
    assert len(hashed) == summary["trace_events"] > 0
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
    summary = _json_document(completed.stdout)
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
    captured = capsys.readouterr()
    out = captured.err
    summary = _json_document(captured.out)
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
    captured = capsys.readouterr()
    out = captured.err
    summary = _json_document(captured.out)
    assert summary["payments"] == {"submitted": 0, "confirmed": 0, "rejected": 0, "undecided": 0}
    assert summary["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert re.search(r"^latency \(ms\) +p50 - +p95 - +p99 -", out, re.M)


def test_json_to_stdout_pipes_into_json_tool(tmp_path: Path) -> None:
    """`pbft run X --json - | python -m json.tool` works: stdout is the document alone."""
    scenario = _write(tmp_path, "small.toml", SMALL)
    run = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", str(scenario), "--json", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tool = subprocess.run(
        [sys.executable, "-m", "json.tool"],
        stdin=run.stdout,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.stdout is not None and run.stderr is not None
    run.stdout.close()
    summary_text = run.stderr.read().decode()
    run.stderr.close()
    assert run.wait(timeout=60) == EXIT_OK
    assert tool.returncode == 0, tool.stderr
    assert json.loads(tool.stdout)["scenario"] == "small"
    assert re.search(r"^verdict +ok$", summary_text, re.M)


OVER_THE_BOUND = """
name = "two-crashed"
seed = 3

[workload]
payments = 10
rate_per_s = 100

[[faults]]
at_ms = 0
action = "crash"
replica = 1

[[faults]]
at_ms = 0
action = "crash"
replica = 2

[expect]
liveness = false
"""


def test_faults_beyond_f_are_named_in_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = _write(tmp_path, "over.toml", OVER_THE_BOUND)
    main(["run", str(scenario), "--json", "-"])
    captured = capsys.readouterr()
    summary = _json_document(captured.out)
    assert summary["fault_bound"] == {
        "replicas": 4,
        "f": 1,
        "max_faulty_at_once": 2,
        "exceeded": True,
    }
    assert re.search(
        r"^faults +up to 2 replicas faulty at once, more than f = 1", captured.err, re.M
    )
    assert main(["run", str(FAULT_FREE)]) == EXIT_OK
    within = capsys.readouterr().out
    assert "faults " not in within


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["keygen", "--out", "{tmp}/a", "--replicas", "3"], "--replicas: 3 is not in 4..256"),
        (["keygen", "--out", "{tmp}/a", "--clients", "0"], "--clients: 0 is not in"),
        (["keygen", "--out", "{tmp}/a", "--accounts-per-client", "-1"], "--accounts-per-client"),
        (["keygen", "--out", "{tmp}/a", "--accounts-per-client", "100000000"], "1000000"),
        (["keygen", "--out", "{tmp}/a", "--base-port", "-1"], "--base-port"),
        (["keygen", "--out", "{tmp}/a", "--host", ""], "--host"),
        (["keygen", "--out", "{tmp}/file"], "is not a directory"),
        (["keygen", "--out", "{tmp}/file/below"], "--out: cannot write in"),
        (["replica", "--cluster", "{tmp}/none.toml", "--id", "0"], "cannot read"),
        (["replica", "--cluster", "{tmp}", "--id", "0"], "cannot read"),
        (["sweep", "{tmp}", "--seeds", "0..3"], "cannot read"),
        (["sweep", str(FAULT_FREE), "--seeds", "5..3"], "empty"),
        (["sweep", str(FAULT_FREE), "--jobs", "0"], "--jobs: 0"),
        (["fuzz", "--replicas", "3"], "--replicas: 3"),
        (["fuzz", "--budget", "-1"], "--budget"),
        (["fuzz", "--budget", "nan"], "--budget"),
        (["fuzz", "--seed", "-1"], "--seed"),
        (["fuzz", "--out", "{tmp}/file", "--budget", "1"], "--out: cannot create"),
        (["run", "{tmp}"], "cannot read"),
        (["run", str(FAULT_FREE), "--trace", "{tmp}"], "cannot write"),
    ],
)
def test_wrong_arguments_get_one_line_and_exit_2(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory")
    filled = [argument.replace("{tmp}", str(tmp_path)) for argument in argv]
    assert main(filled) == EXIT_USAGE
    error = capsys.readouterr().err
    assert says in error
    assert "Traceback" not in error and "internal error" not in error
