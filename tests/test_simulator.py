"""Tests for sim.simulator: shipped scenarios, determinism, the trace sink, and safety under
random fault schedules (with a negative control showing the checkers can catch a violation)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pbft.config import fault_tolerance_of
from sim.checkers import SAFETY_CHECKS
from sim.scenario import load_scenario, parse_scenario, to_toml
from sim.simulator import SimulationResult, run_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS_DIRECTORY = ROOT / "scenarios"
SHIPPED_SCENARIOS = sorted(SCENARIOS_DIRECTORY.glob("*.toml"))

# A small run that still exercises most sources of nondeterminism: an equivocating primary
# (forks kept in dicts keyed by digests), message loss and duplication, exponential latency,
# a partition that heals, and a crash with a restart from the durable log.
BUSY_SCENARIO = """
name = "busy"
seed = 3

[cluster]
replicas = 4
checkpoint_interval = 4
view_change_timeout_ms = 200

[network]
latency_ms = { dist = "exponential", mean = 4, min = 1 }
drop = 0.05
duplicate = 0.05

[workload]
payments = 60
rate_per_s = 200

[[faults]]
at_ms = 100
until_ms = 400
action = "partition"
groups = [[0, 1], [2, 3]]

[[faults]]
at_ms = 150
action = "crash"
replica = 0

[[faults]]
at_ms = 600
action = "restart"
replica = 0

[[byzantine]]
replica = 0
behavior = "equivocate"

[expect]
safety = true
liveness = false
"""

SMALL_SCENARIO = """
name = "small"
seed = 5

[workload]
payments = 30
rate_per_s = 200
"""


def _safety_states(result: SimulationResult) -> dict[str, bool]:
    return {name: result.checks[name].ok for name in SAFETY_CHECKS}


# --- shipped scenarios ----------------------------------------------------------------------


def test_scenarios_folder_is_not_empty() -> None:
    assert SHIPPED_SCENARIOS, f"no scenario files in {SCENARIOS_DIRECTORY}"


@pytest.mark.parametrize("path", SHIPPED_SCENARIOS, ids=lambda path: path.stem)
def test_shipped_scenario_meets_its_expectation(path: Path) -> None:
    scenario = load_scenario(path)
    result = run_scenario(scenario)
    summary = result.summary()
    assert result.verdict == "ok", summary["expectation_failures"]
    assert set(result.checks) >= set(SAFETY_CHECKS)
    safety = _safety_states(result)
    if scenario.expect.safety:
        assert all(safety.values()), summary["check_details"]
    else:
        assert not all(safety.values()), "the negative control found no safety violation"
    byzantine_clients = any(entry.replica is None for entry in scenario.byzantine)
    if scenario.expect.liveness:
        assert result.checks["liveness"].ok, summary["check_details"]
        if not byzantine_clients:  # only correct clients are promised a decision
            assert result.undecided == 0
            assert result.confirmed + sum(result.rejected.values()) == result.submitted


# --- determinism ----------------------------------------------------------------------------


def test_same_scenario_and_seed_give_the_same_trace_and_summary() -> None:
    scenario = parse_scenario(BUSY_SCENARIO)
    first = run_scenario(scenario)
    second = run_scenario(scenario)
    assert first.trace_hash == second.trace_hash
    assert first.trace_events == second.trace_events
    assert first.summary() == second.summary()


_HASH_PROGRAM = """
import sys
from sim.scenario import load_scenario
from sim.simulator import run_scenario
for path in sys.argv[1:]:
    print(run_scenario(load_scenario(path)).trace_hash)
"""


def _hashes_in_subprocess(paths: list[Path], hash_seed: str) -> list[str]:
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed)
    completed = subprocess.run(
        [sys.executable, "-c", _HASH_PROGRAM, *map(str, paths)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.split()


def test_trace_hash_does_not_depend_on_the_python_hash_seed(tmp_path: Path) -> None:
    busy = tmp_path / "busy.toml"
    busy.write_text(BUSY_SCENARIO, encoding="utf-8")
    paths = [busy, SCENARIOS_DIRECTORY / "negative-control-equivocators.toml"]
    under_zero = _hashes_in_subprocess(paths, "0")
    under_other = _hashes_in_subprocess(paths, "12345")
    assert len(under_zero) == len(paths)
    assert under_zero == under_other
    # And the same as in this process, whatever its hash seed.
    assert under_zero[0] == run_scenario(load_scenario(busy)).trace_hash


def test_a_different_seed_gives_a_different_trace_hash() -> None:
    scenario = parse_scenario(SMALL_SCENARIO)
    base = run_scenario(scenario)
    other = run_scenario(scenario, seed=scenario.seed + 1)
    assert other.seed == scenario.seed + 1
    assert base.trace_hash != other.trace_hash
    # The seed argument and a scenario carrying that seed are the same run.
    assert run_scenario(scenario.with_seed(scenario.seed + 1)).trace_hash == other.trace_hash


# --- the trace sink -------------------------------------------------------------------------


def test_trace_sink_gets_one_json_object_per_event() -> None:
    scenario = parse_scenario(SMALL_SCENARIO)
    sink = io.StringIO()
    result = run_scenario(scenario, trace_sink=sink)
    lines = sink.getvalue().splitlines()
    assert result.trace_events > 0
    # Annotations for `pbft explain` are outside the hash and the count.
    hashed = [line for line in lines if json.loads(line).get("hashed", True)]
    assert len(hashed) == result.trace_events < len(lines)
    times = []
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict)
        assert {"time_ms", "kind", "node", "detail"} <= set(event)
        assert isinstance(event["time_ms"], int | float)
        assert isinstance(event["kind"], str) and event["kind"]
        assert isinstance(event["node"], str) and event["node"]
        assert isinstance(event["detail"], str)
        times.append(event["time_ms"])
    assert times == sorted(times), "trace events are not in simulated-time order"
    kinds = {json.loads(line)["kind"] for line in lines}
    assert {"submit", "deliver", "decided"} <= kinds
    # Writing the trace out does not change the run.
    assert run_scenario(scenario).trace_hash == result.trace_hash


# --- safety under random fault schedules ----------------------------------------------------


@st.composite
def fault_schedules(draw: st.DrawFn, replicas: int) -> str:
    """Scenario TOML: n replicas (every n in 4..10 is tested, not only n = 3f + 1: the
    quorum must hold for every size), a small workload, a lossy network, at most f faulty
    replicas (crashed and restarted, or Byzantine: equivocating, silent or twinned) and
    partitions, both ways or one-way, that heal."""
    f = fault_tolerance_of(replicas)
    seed = draw(st.integers(0, 2**32 - 1))
    payments = draw(st.integers(20, 40))
    rate = draw(st.integers(100, 300))
    drop = draw(st.floats(0.0, 0.2, allow_nan=False))
    duplicate = draw(st.floats(0.0, 0.1, allow_nan=False))
    latency_min = draw(st.integers(0, 5))
    latency_max = draw(st.integers(latency_min, 20))
    faults: list[dict[str, Any]] = []
    byzantine_entries: list[dict[str, Any]] = []
    document: dict[str, Any] = {
        "name": "random-faults",
        "seed": seed,
        "cluster": {
            "replicas": replicas,
            "checkpoint_interval": draw(st.sampled_from([4, 8, 16])),
            "view_change_timeout_ms": 200,
        },
        "network": {
            "latency_ms": {"dist": "uniform", "min": latency_min, "max": latency_max},
            "drop": drop,
            "duplicate": duplicate,
        },
        "workload": {"payments": payments, "rate_per_s": rate},
        "faults": faults,
        "byzantine": byzantine_entries,
        "expect": {"safety": True, "liveness": False},
    }
    # At most f faulty replicas in all: the Byzantine ones and the crashed ones together.
    faulty = draw(st.lists(st.integers(0, replicas - 1), min_size=0, max_size=f, unique=True))
    byzantine = [replica for replica in faulty if draw(st.booleans())]
    for crashable in faulty:
        if crashable in byzantine and not draw(st.booleans()):
            continue
        for _ in range(draw(st.integers(0, 2))):
            crash_at = draw(st.integers(0, 800))
            restart_at = crash_at + draw(st.integers(1, 1200))
            faults.append({"at_ms": crash_at, "action": "crash", "replica": crashable})
            faults.append({"at_ms": restart_at, "action": "restart", "replica": crashable})
    for _ in range(draw(st.integers(0, 2))):
        labels = draw(st.lists(st.integers(0, 3), min_size=replicas, max_size=replicas))
        groups = [
            [replica for replica in range(replicas) if labels[replica] == label]
            for label in sorted(set(labels))
        ]
        if len(groups) < 2:
            alone = draw(st.integers(0, replicas - 1))
            groups = [[alone], [replica for replica in range(replicas) if replica != alone]]
        if len(groups) > 2 and draw(st.booleans()):
            # Replicas listed in no group form one more group of their own.
            groups = groups[:-1]
        at_ms = draw(st.integers(0, 800))
        until_ms = at_ms + draw(st.integers(1, 1500))
        fault: dict[str, Any] = {
            "at_ms": at_ms,
            "until_ms": until_ms,
            "action": "partition",
            "groups": groups,
        }
        direction = draw(st.sampled_from([None, "both", "one-way"]))
        if direction is not None:
            fault["direction"] = direction
        faults.append(fault)
    correct = [replica for replica in range(replicas) if replica not in byzantine]
    for replica in byzantine:
        behavior = draw(st.sampled_from(["equivocate", "silent", "twin"]))
        entry: dict[str, Any] = {"replica": replica, "behavior": behavior}
        if behavior == "twin":
            # The two copies each talk with one part of the correct replicas.
            cut = draw(st.integers(1, len(correct) - 1))
            entry["groups"] = [correct[:cut], correct[cut:]]
        byzantine_entries.append(entry)
    return to_toml(document)


@pytest.mark.parametrize("replicas", range(4, 11))
def test_at_most_f_faults_never_break_safety(replicas: int) -> None:
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(text=fault_schedules(replicas))
    def check(text: str) -> None:
        _check_safety(text)

    check()


def _check_safety(text: str) -> None:
    note(f"scenario (save as a .toml file and replay with `pbft run`):\n{text}")
    scenario = parse_scenario(text, "<random-faults>")
    faulty = {entry.replica for entry in scenario.byzantine} | {
        fault.replica for fault in scenario.faults if fault.action == "crash"
    }
    assert len(faulty) <= scenario.fault_tolerance
    result = run_scenario(scenario)
    summary = result.summary()
    note(f"check details: {summary['check_details']}")
    safety = _safety_states(result)
    assert all(safety.values()), f"safety broken: {safety}, {summary['check_details']}"
    assert result.verdict == "ok", summary["expectation_failures"]


# --- negative control -----------------------------------------------------------------------

TWO_EQUIVOCATORS = """
name = "two-equivocators"
seed = 0

[workload]
payments = 40
rate_per_s = 200

[[byzantine]]
replica = 0
behavior = "equivocate"

[[byzantine]]
replica = 1
behavior = "equivocate"

[expect]
safety = false
liveness = false
"""


def test_f_plus_one_colluding_equivocators_break_agreement() -> None:
    scenario = parse_scenario(TWO_EQUIVOCATORS)
    assert len(scenario.byzantine) == scenario.fault_tolerance + 1
    broken_at = []
    for seed in range(5):
        result = run_scenario(scenario, seed=seed)
        if not result.checks["agreement"].ok:
            assert result.verdict == "ok"
            assert result.checks["agreement"].details
            broken_at.append(seed)
            break
    assert broken_at, "two colluding equivocators never broke agreement in seeds 0..4"
