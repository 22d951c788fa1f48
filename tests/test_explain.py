"""`pbft explain` over shipped scenarios' traces: a payment's life, why a view began, one
replica's run; the error cases; `--json -` is JSON alone."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from cli.main import EXIT_OK, EXIT_USAGE, main
from sim.explain import (
    ExplainError,
    explain_payment,
    explain_replica,
    explain_view,
    parse_payment_id,
)
from sim.scenario import load_scenario
from sim.simulator import run_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def _trace(tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    path = tmp_path_factory.mktemp("traces") / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as sink:
        result = run_scenario(scenario, trace_sink=sink)
    assert result.verdict == "ok"
    # Writing the trace (annotations and all) leaves the run's fingerprint alone.
    assert run_scenario(scenario).trace_hash == result.trace_hash
    return str(path)


@pytest.fixture(scope="module")
def crash_trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _trace(tmp_path_factory, "primary-crash")


@pytest.fixture(scope="module")
def bad_chain_trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _trace(tmp_path_factory, "byzantine-bad-chain")


def _events(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _slowest(path: str) -> str:
    submitted: dict[str, float] = {}
    latency: dict[str, float] = {}
    for event in _events(path):
        if event["kind"] == "submit":
            submitted[event["payment"]] = event["time_ms"]
        elif event["kind"] == "decided":
            latency[event["payment"]] = event["time_ms"] - submitted[event["payment"]]
    return max(latency, key=lambda payment: latency[payment])


def test_payment_ids_in_both_spellings() -> None:
    assert parse_payment_id("3:15") == "3:15"
    assert parse_payment_id("pay_3_15") == "3:15"
    assert parse_payment_id(" 03:015 ") == "3:15"
    for wrong in ("3", "3:", "pay_3", "a:b", "3:15:1", "pay-3-15", ""):
        with pytest.raises(ExplainError):
            parse_payment_id(wrong)


def test_a_quick_payment_with_its_certificates(crash_trace: str) -> None:
    story = explain_payment([crash_trace], "0:1")
    assert story["outcome"] == "confirmed" and story["reason"] == "none"
    assert not story["slow"] and story["waited_on"] == []
    assert story["batches"] == [
        {"view": 0, "seq": 1, "primary": "r0", "time_ms": story["batches"][0]["time_ms"]}
    ]
    # Each replica prepared on 2f + 1 = 3 signers (the primary's PRE-PREPARE and two
    # PREPAREs) and committed on 3 COMMITs, then executed the same outcome.
    assert sorted(story["replicas"]) == ["r0", "r1", "r2", "r3"]
    for replica in story["replicas"].values():
        assert 0 in replica["prepared"]["signers"] and len(replica["prepared"]["signers"]) == 3
        assert len(replica["committed"]["signers"]) == 3
        assert replica["executed"]["outcome"] == "confirmed"
        assert replica["prepared"]["time_ms"] <= replica["committed"]["time_ms"]
    kinds = [item["kind"] for item in story["timeline"]]
    assert kinds[0] == "submit" and kinds[-1] == "decided"
    assert kinds.index("propose") < kinds.index("prepared") < kinds.index("execute")
    assert story["replies"] and story["decided_ms"] >= story["replies"][0]["time_ms"]


def test_a_slow_payment_says_it_waited_on_the_view_change(crash_trace: str) -> None:
    payment = _slowest(crash_trace)
    story = explain_payment([crash_trace], payment)
    assert story["slow"] and story["latency_ms"] > 2 * story["typical_latency_ms"]
    causes = " | ".join(story["waited_on"])
    assert "a view change" in causes and "r0" in " ".join(
        item["where"] for item in story["lost"]["items"]
    )
    assert "lost messages" in causes and "destination_down" in causes
    # It was ordered by the new primary, in the new view.
    assert story["batches"][-1]["view"] == 1 and story["batches"][-1]["primary"] == "r1"
    text = _cli([crash_trace, "--payment", f"pay_{payment.replace(':', '_')}"])
    assert f"payment {payment}" in text and "slow: it waited on" in text


def test_the_view_change_after_a_primary_crash(crash_trace: str) -> None:
    story = explain_view([crash_trace], 1)
    assert story["suspected"] == ["r0"]
    assert [item["detail"] for item in story["faults"]] == ["crash r0"]
    assert {item["reason"] for item in story["suspicions"]} == {"no heartbeat"}
    assert "heartbeat timer" in story["suspicions"][0]["timer"]
    plan = story["new_view_plan"]
    assert plan["new_primary"] == 1 and plan["view_changes_from"] == [1, 2, 3]
    assert plan["entries"], "the crashed primary left prepared entries to carry over"
    assert all(entry["carried_from"] for entry in plan["entries"])
    assert {"r1", "r2", "r3"} <= set(story["view_change_messages"])
    text = _cli([crash_trace, "--view", "1"])
    assert "r2 suspected primary r0: no heartbeat" in text
    assert "NEW-VIEW by r1 on VIEW-CHANGEs from r1, r2, r3" in text


def test_the_view_change_a_bad_chain_starved_into_being(bad_chain_trace: str) -> None:
    story = explain_view([bad_chain_trace], 1)
    assert story["suspected"] == ["r0"]
    assert {item["reason"] for item in story["suspicions"]} == {"work not completed"}
    # The root cause: the correct replicas refused r0's PRE-PREPAREs (bad_chain).
    for node in ("r1", "r2", "r3"):
        first = story["drops_before"][node]["bad_chain"]["first"]
        assert first["message_type"] == "PRE_PREPARE" and first["from"] == "r0"


def test_a_replica_with_drops(bad_chain_trace: str) -> None:
    story = explain_replica([bad_chain_trace], 1)
    assert story["drops"]["bad_chain"]["count"] > 0
    first = story["drops"]["bad_chain"]["first"]
    assert (first["message_type"], first["from"], first["seq"]) == ("PRE_PREPARE", "r0", 1)
    assert story["final_view"] >= 1 and story["checkpoints"]["count"] > 0
    assert story["executed_batches"] > 0
    text = _cli([bad_chain_trace, "--replica", "1"])
    assert "bad_chain" in text and "PRE_PREPARE seq 1 from r0" in text


def test_per_replica_logs_merge_into_the_same_story(crash_trace: str, tmp_path: Path) -> None:
    """Real replicas each write their own log; split by node, the story is the same."""
    files: dict[str, io.StringIO] = {}
    for event in _events(crash_trace):
        files.setdefault(event["node"], io.StringIO()).write(json.dumps(event) + "\n")
    paths = []
    for node, text in files.items():
        path = tmp_path / f"trace-{node}.jsonl"
        path.write_text(text.getvalue(), encoding="utf-8")
        paths.append(str(path))
    assert len(paths) > 4
    assert explain_replica(paths, 2) == explain_replica([crash_trace], 2)
    assert (
        explain_view(paths, 1)["new_view_plan"] == explain_view([crash_trace], 1)["new_view_plan"]
    )
    merged = explain_payment(paths, "0:1")
    single = explain_payment([crash_trace], "0:1")
    assert merged["replicas"] == single["replicas"] and merged["outcome"] == single["outcome"]


def _cli(argv: list[str]) -> str:
    stdout = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(stdout):
        assert main(["explain", *argv]) == EXIT_OK
    return stdout.getvalue()


@pytest.mark.parametrize("target", [["--payment", "0:1"], ["--view", "1"], ["--replica", "2"]])
def test_json_to_stdout_is_json_alone(
    crash_trace: str, target: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", crash_trace, *target, "--json", "-"]) == EXIT_OK
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert isinstance(document, dict) and err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--payment", "9:999"], "payment 9:999 does not appear in the trace"),
        (["--payment", "nine"], "expected CLIENT:REQUEST"),
        (["--view", "7"], "view 7 never began in this trace (views: 0, 1)"),
        (["--view", "0"], "view 0 is the first view"),
        (["--view", "-1"], "a view is 0 or more"),
        (["--replica", "9"], "replica 9 is not in this trace (replicas 0..3)"),
    ],
)
def test_unknown_targets_are_one_line_and_exit_2(
    crash_trace: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", crash_trace, *argv]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1


def test_unreadable_traces_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello\n", encoding="utf-8")
    not_event = tmp_path / "list.jsonl"
    not_event.write_text('{"time_ms": 1, "kind": "submit"}\n', encoding="utf-8")
    cases = [
        (str(tmp_path / "missing.jsonl"), "No such file"),
        (str(not_json), "notes.txt:1: not a JSON trace event"),
        (str(not_event), "list.jsonl:1: not a trace event"),
        (str(tmp_path), "Is a directory"),
    ]
    for path, message in cases:
        assert main(["explain", path, "--view", "1"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    # Exactly one question per run.
    with pytest.raises(SystemExit) as raised:
        main(["explain", str(not_json), "--view", "1", "--replica", "1"])
    assert raised.value.code == EXIT_USAGE
