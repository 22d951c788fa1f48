"""Tests for sim.scenario: strict loading of adversarial scenario files."""

from __future__ import annotations

import dataclasses
import pickle
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.scenario import (
    BEHAVIORS,
    FAULT_ACTIONS,
    ByzantineSpec,
    ClusterSpec,
    ExpectSpec,
    FaultSpec,
    LatencySpec,
    NetworkSpec,
    Scenario,
    ScenarioError,
    WorkloadSpec,
    load_scenario,
    parse_scenario,
)

SCENARIOS_DIRECTORY = Path(__file__).parent.parent / "scenarios"

FULL_EXAMPLE = """
name = "primary-crash"
description = "The primary crashes mid-stream; every payment is still decided."
seed = 1

[cluster]
replicas = 7
batch_size = 64
checkpoint_interval = 8
view_change_timeout_ms = 500
batch_timeout_ms = 2
heartbeat_interval_ms = 40
retransmit_interval_ms = 70
client_timeout_ms = 900
watermark_window = 24

[network]
latency_ms = { dist = "exponential", mean = 5, min = 1 }
drop = 0.05
duplicate = 0.01

[workload]
clients = 3
accounts = 6
initial_balance = 5000
payments = 120
rate_per_s = 250
overdraw = 0.25

[[faults]]
at_ms = 500
action = "crash"
replica = 0

[[faults]]
at_ms = 100
until_ms = 900
action = "partition"
groups = [[0, 1], [2, 3]]

[[faults]]
at_ms = 700
action = "restart"
replica = 0

[[faults]]
at_ms = 1000
action = "heal"

[[byzantine]]
replica = 1
behavior = "equivocate"

[[byzantine]]
replica = 5
behavior = "silent"

[expect]
safety = false
liveness = false
deadline_ms = 20000
"""

MINIMAL = 'name = "minimal"\n'


def error_of(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text)
    return caught.value


def with_section(section: str, body: str) -> str:
    return f"{MINIMAL}\n[{section}]\n{body}\n"


def fault(body: str) -> str:
    return f"{MINIMAL}\n[[faults]]\n{body}\n"


def byzantine(*bodies: str) -> str:
    return MINIMAL + "".join(f"\n[[byzantine]]\n{body}\n" for body in bodies)


# Parsing valid files.


def test_full_example_parses_to_the_expected_dataclasses() -> None:
    scenario = parse_scenario(FULL_EXAMPLE, "examples/primary-crash.toml")

    assert scenario == Scenario(
        name="primary-crash",
        description="The primary crashes mid-stream; every payment is still decided.",
        seed=1,
        cluster=ClusterSpec(
            replicas=7,
            batch_size=64,
            checkpoint_interval=8,
            view_change_timeout_ms=500,
            batch_timeout_ms=2,
            heartbeat_interval_ms=40,
            retransmit_interval_ms=70,
            client_timeout_ms=900,
            watermark_window=24,
        ),
        network=NetworkSpec(
            latency=LatencySpec(distribution="exponential", min_ms=1.0, max_ms=None, mean_ms=5.0),
            drop=0.05,
            duplicate=0.01,
        ),
        workload=WorkloadSpec(
            clients=3,
            accounts=6,
            initial_balance=5000,
            payments=120,
            rate_per_s=250.0,
            overdraw=0.25,
        ),
        faults=(
            FaultSpec(at_ms=100, action="partition", until_ms=900, groups=((0, 1), (2, 3))),
            FaultSpec(at_ms=500, action="crash", replica=0),
            FaultSpec(at_ms=700, action="restart", replica=0),
            FaultSpec(at_ms=1000, action="heal"),
        ),
        byzantine=(
            ByzantineSpec(replica=1, behavior="equivocate"),
            ByzantineSpec(replica=5, behavior="silent"),
        ),
        expect=ExpectSpec(safety=False, liveness=False, deadline_ms=20000),
        source="examples/primary-crash.toml",
    )
    assert scenario.fault_tolerance == 2


def test_integers_become_floats_where_floats_are_expected() -> None:
    scenario = parse_scenario(FULL_EXAMPLE)

    assert type(scenario.workload.rate_per_s) is float
    assert type(scenario.network.latency.mean_ms) is float
    assert type(scenario.network.latency.min_ms) is float


def test_missing_sections_take_the_dataclass_defaults() -> None:
    scenario = parse_scenario(MINIMAL)

    assert scenario == Scenario(
        name="minimal",
        description="",
        seed=0,
        cluster=ClusterSpec(),
        network=NetworkSpec(),
        workload=WorkloadSpec(),
        faults=(),
        byzantine=(),
        expect=ExpectSpec(),
        source="<string>",
    )
    assert scenario.network.latency == LatencySpec("uniform", 1.0, 10.0, None)
    assert scenario.fault_tolerance == 1


def test_empty_sections_take_the_dataclass_defaults() -> None:
    text = MINIMAL + "[cluster]\n[network]\n[workload]\n[expect]\n"

    assert parse_scenario(text) == parse_scenario(MINIMAL)


def test_uniform_latency_is_the_default_distribution_and_min_defaults_to_zero() -> None:
    scenario = parse_scenario(with_section("network", "latency_ms = { max = 3.5 }"))

    assert scenario.network.latency == LatencySpec("uniform", 0.0, 3.5, None)


def test_constant_latency_is_allowed() -> None:
    scenario = parse_scenario(with_section("network", "latency_ms = { min = 4, max = 4 }"))

    assert scenario.network.latency == LatencySpec("uniform", 4.0, 4.0, None)


def test_faults_are_sorted_by_time_keeping_file_order_at_equal_times() -> None:
    text = (
        MINIMAL
        + '[[faults]]\nat_ms = 30\naction = "heal"\n'
        + '[[faults]]\nat_ms = 10\naction = "crash"\nreplica = 2\n'
        + '[[faults]]\nat_ms = 30\naction = "crash"\nreplica = 1\n'
        + '[[faults]]\nat_ms = 10\naction = "restart"\nreplica = 2\n'
    )

    faults = parse_scenario(text).faults

    assert faults == (
        FaultSpec(at_ms=10, action="crash", replica=2),
        FaultSpec(at_ms=10, action="restart", replica=2),
        FaultSpec(at_ms=30, action="heal"),
        FaultSpec(at_ms=30, action="crash", replica=1),
    )


def test_restart_without_an_earlier_crash_is_accepted() -> None:
    scenario = parse_scenario(fault('at_ms = 0\naction = "restart"\nreplica = 3'))

    assert scenario.faults == (FaultSpec(at_ms=0, action="restart", replica=3),)


def test_partition_may_leave_replicas_out_and_needs_no_until() -> None:
    scenario = parse_scenario(fault('at_ms = 5\naction = "partition"\ngroups = [[0], [2]]'))

    assert scenario.faults == (FaultSpec(at_ms=5, action="partition", groups=((0,), (2,))),)


def test_nonzero_watermark_window_that_is_a_multiple_of_the_checkpoint_interval_is_kept() -> None:
    scenario = parse_scenario(
        with_section("cluster", "checkpoint_interval = 100\nwatermark_window = 8100")
    )

    assert scenario.cluster.watermark_window == 8100


def test_byzantine_may_list_all_but_one_replica() -> None:
    entries = [f'replica = {replica}\nbehavior = "silent"' for replica in range(3)]

    assert len(parse_scenario(byzantine(*entries)).byzantine) == 3


def test_with_seed_changes_only_the_seed() -> None:
    scenario = parse_scenario(FULL_EXAMPLE)

    reseeded = scenario.with_seed(99)

    assert reseeded.seed == 99
    assert dataclasses.replace(reseeded, seed=scenario.seed) == scenario
    assert scenario.seed == 1


@pytest.mark.parametrize("seed", [-1, 2**63, True, 1.0])
def test_with_seed_rejects_an_invalid_seed(seed: Any) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(MINIMAL).with_seed(seed)

    assert caught.value.field == "seed"


def test_spec_dataclasses_are_frozen() -> None:
    scenario = parse_scenario(FULL_EXAMPLE)

    with pytest.raises(dataclasses.FrozenInstanceError):
        scenario.cluster.replicas = 10  # type: ignore[misc]


def test_action_and_behavior_constants_list_the_documented_values() -> None:
    assert FAULT_ACTIONS[:4] == ("crash", "restart", "partition", "heal")
    assert {"delay", "drop", "duplicate", "reorder", "pause", "resume", "clock_skew"} <= set(
        FAULT_ACTIONS
    )
    assert {"equivocate", "silent", "twin"} <= set(BEHAVIORS)


# The error type.


def test_scenario_error_message_names_source_field_and_problem() -> None:
    error = ScenarioError("a.toml", "cluster.replicas", "must be in 4..256, got 3")

    assert str(error) == "a.toml: cluster.replicas: must be in 4..256, got 3"
    assert (error.source, error.field, error.problem) == (
        "a.toml",
        "cluster.replicas",
        "must be in 4..256, got 3",
    )
    assert isinstance(error, ValueError)


def test_scenario_error_survives_pickling() -> None:
    error = ScenarioError("a.toml", "seed", "required")

    copy = pickle.loads(pickle.dumps(error))

    assert (copy.source, copy.field, copy.problem, str(copy)) == (
        "a.toml",
        "seed",
        "required",
        str(error),
    )


def test_parse_errors_carry_the_given_source() -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario("seed = 1\n", "scenarios/x.toml")

    assert caught.value.source == "scenarios/x.toml"
    assert str(caught.value).startswith("scenarios/x.toml: name: ")


# Every kind of error names the right field.


@pytest.mark.parametrize(
    ("text", "field"),
    [
        # Unknown keys, at every level.
        (MINIMAL + "sead = 1\n", "sead"),
        (with_section("cluster", "replica = 4"), "cluster.replica"),
        (with_section("network", "jitter = 1"), "network.jitter"),
        (
            with_section("network", "latency_ms = { min = 1, max = 2, avg = 1 }"),
            "network.latency_ms.avg",
        ),
        (with_section("workload", "overdraft = 0.1"), "workload.overdraft"),
        (with_section("expect", "safe = true"), "expect.safe"),
        (
            fault('at_ms = 1\naction = "heal"')
            + '[[faults]]\nat_ms = 2\naction = "crash"\nreplcia = 1\n',
            "faults[1].replcia",
        ),
        (byzantine('replica = 1\nbehavior = "silent"\nwhen_ms = 3'), "byzantine[0].when_ms"),
        (with_section("cluster.extra", "x = 1"), "cluster.extra"),
        (MINIMAL + '"odd key" = 1\n', "'odd key'"),
        # Wrong types: bool is not an int, a float is not an int, and so on.
        ("name = 7\n", "name"),
        (MINIMAL + "description = 3\n", "description"),
        (MINIMAL + "seed = true\n", "seed"),
        (MINIMAL + "seed = 1.0\n", "seed"),
        (MINIMAL + 'seed = "1"\n', "seed"),
        (MINIMAL + "cluster = 4\n", "cluster"),
        (MINIMAL + "cluster = [1]\n", "cluster"),
        (with_section("cluster", "replicas = 4.0"), "cluster.replicas"),
        (with_section("cluster", "batch_size = true"), "cluster.batch_size"),
        (with_section("network", 'drop = "none"'), "network.drop"),
        (with_section("network", "drop = false"), "network.drop"),
        (with_section("network", "latency_ms = 5"), "network.latency_ms"),
        (with_section("workload", "rate_per_s = true"), "workload.rate_per_s"),
        (with_section("workload", "initial_balance = 10.5"), "workload.initial_balance"),
        (with_section("workload", "accounts = 1979-05-27"), "workload.accounts"),
        (with_section("expect", "safety = 1"), "expect.safety"),
        (with_section("expect", 'liveness = "yes"'), "expect.liveness"),
        (with_section("expect", "deadline_ms = 1.5"), "expect.deadline_ms"),
        (MINIMAL + "[faults]\nat_ms = 1\n", "faults"),
        (MINIMAL + "faults = [1]\n", "faults[0]"),
        (MINIMAL + "byzantine = 1\n", "byzantine"),
        (fault('at_ms = 1.0\naction = "heal"'), "faults[0].at_ms"),
        (fault("at_ms = 1\naction = 1"), "faults[0].action"),
        (fault('at_ms = 1\naction = "crash"\nreplica = true'), "faults[0].replica"),
        (fault('at_ms = 1\naction = "crash"\nreplica = 1.0'), "faults[0].replica"),
        (byzantine('replica = "1"\nbehavior = "silent"'), "byzantine[0].replica"),
        # Out of range.
        (MINIMAL + "seed = -1\n", "seed"),
        (MINIMAL + "seed = 9223372036854775808\n", "seed"),
        (with_section("cluster", "replicas = 3"), "cluster.replicas"),
        (with_section("cluster", "replicas = 257"), "cluster.replicas"),
        (with_section("cluster", "batch_size = 0"), "cluster.batch_size"),
        (with_section("cluster", "batch_size = 1025"), "cluster.batch_size"),
        (with_section("cluster", "checkpoint_interval = 0"), "cluster.checkpoint_interval"),
        (with_section("cluster", "checkpoint_interval = 4097"), "cluster.checkpoint_interval"),
        (with_section("cluster", "view_change_timeout_ms = 9"), "cluster.view_change_timeout_ms"),
        (
            with_section("cluster", "view_change_timeout_ms = 600001"),
            "cluster.view_change_timeout_ms",
        ),
        (with_section("cluster", "batch_timeout_ms = -1"), "cluster.batch_timeout_ms"),
        (with_section("cluster", "batch_timeout_ms = 60001"), "cluster.batch_timeout_ms"),
        (with_section("cluster", "heartbeat_interval_ms = 0"), "cluster.heartbeat_interval_ms"),
        (with_section("cluster", "heartbeat_interval_ms = 300"), "cluster.heartbeat_interval_ms"),
        (
            with_section("cluster", "view_change_timeout_ms = 40"),
            "cluster.heartbeat_interval_ms",
        ),
        (with_section("cluster", "retransmit_interval_ms = 0"), "cluster.retransmit_interval_ms"),
        (
            with_section("cluster", "retransmit_interval_ms = 600001"),
            "cluster.retransmit_interval_ms",
        ),
        (with_section("cluster", "client_timeout_ms = 9"), "cluster.client_timeout_ms"),
        (with_section("cluster", "client_timeout_ms = 600001"), "cluster.client_timeout_ms"),
        (with_section("cluster", "watermark_window = -16"), "cluster.watermark_window"),
        (with_section("cluster", "watermark_window = 24"), "cluster.watermark_window"),
        (with_section("cluster", "watermark_window = 8208"), "cluster.watermark_window"),
        (with_section("network", "drop = 1.0"), "network.drop"),
        (with_section("network", "drop = -0.1"), "network.drop"),
        (with_section("network", "drop = nan"), "network.drop"),
        (with_section("network", "duplicate = 1"), "network.duplicate"),
        (with_section("workload", "clients = 0"), "workload.clients"),
        (with_section("workload", "clients = 1001"), "workload.clients"),
        (with_section("workload", "accounts = 1"), "workload.accounts"),
        (with_section("workload", "accounts = 1000001"), "workload.accounts"),
        (with_section("workload", "initial_balance = -1"), "workload.initial_balance"),
        (
            with_section("workload", "initial_balance = 1000000000000001"),
            "workload.initial_balance",
        ),
        (
            with_section("workload", "accounts = 100000\ninitial_balance = 1000000000000000"),
            "workload.initial_balance",
        ),
        (with_section("workload", "payments = -1"), "workload.payments"),
        (with_section("workload", "payments = 1000001"), "workload.payments"),
        (with_section("workload", "rate_per_s = 0"), "workload.rate_per_s"),
        (with_section("workload", "rate_per_s = -2.5"), "workload.rate_per_s"),
        (with_section("workload", "rate_per_s = inf"), "workload.rate_per_s"),
        (with_section("workload", "rate_per_s = 1" + "0" * 400), "workload.rate_per_s"),
        # Hex integers have no digit limit in int(), but str() of them does.
        (MINIMAL + "seed = 0x" + "f" * 4000 + "\n", "seed"),
        (
            fault(
                "at_ms = 0x"
                + "f" * 4000
                + '\naction = "partition"\ngroups = [[0], [1]]\nuntil_ms = 1'
            ),
            "faults[0].until_ms",
        ),
        (fault('at_ms = 1\naction = "crash"\nreplica = 0x' + "f" * 4000), "faults[0].replica"),
        (with_section("workload", "overdraw = 1.01"), "workload.overdraw"),
        (with_section("workload", "overdraw = -0.01"), "workload.overdraw"),
        (with_section("expect", "deadline_ms = -1"), "expect.deadline_ms"),
        (fault('at_ms = -1\naction = "heal"'), "faults[0].at_ms"),
        # The name.
        ("seed = 1\n", "name"),
        ('name = ""\n', "name"),
        ('name = "   "\n', "name"),
        (f'name = "{"x" * 101}"\n', "name"),
        # Faults.
        (fault('at_ms = 1\naction = "reboot"\nreplica = 1'), "faults[0].action"),
        (fault('action = "heal"'), "faults[0].at_ms"),
        (fault("at_ms = 1"), "faults[0].action"),
        (fault('at_ms = 1\naction = "crash"'), "faults[0].replica"),
        (fault('at_ms = 1\naction = "restart"'), "faults[0].replica"),
        (fault('at_ms = 1\naction = "crash"\nreplica = 4'), "faults[0].replica"),
        (fault('at_ms = 1\naction = "crash"\nreplica = -1'), "faults[0].replica"),
        (fault('at_ms = 1\naction = "heal"\nreplica = 1'), "faults[0].replica"),
        (fault('at_ms = 1\naction = "crash"\nreplica = 1\nuntil_ms = 5'), "faults[0].until_ms"),
        (
            fault('at_ms = 1\naction = "crash"\nreplica = 1\ngroups = [[0], [1]]'),
            "faults[0].groups",
        ),
        (fault('at_ms = 1\naction = "partition"'), "faults[0].groups"),
        (
            fault('at_ms = 1\naction = "partition"\nreplica = 0\ngroups = [[0], [1]]'),
            "faults[0].replica",
        ),
        (fault('at_ms = 1\naction = "partition"\ngroups = [[0, 1, 2, 3]]'), "faults[0].groups"),
        (fault('at_ms = 1\naction = "partition"\ngroups = []'), "faults[0].groups"),
        (fault('at_ms = 1\naction = "partition"\ngroups = [0, 1]'), "faults[0].groups[0]"),
        (fault('at_ms = 1\naction = "partition"\ngroups = [[0], []]'), "faults[0].groups[1]"),
        (
            fault('at_ms = 1\naction = "partition"\ngroups = [[0, 1], [2, 1]]'),
            "faults[0].groups[1][1]",
        ),
        (
            fault('at_ms = 1\naction = "partition"\ngroups = [[0, 0], [2]]'),
            "faults[0].groups[0][1]",
        ),
        (fault('at_ms = 1\naction = "partition"\ngroups = [[0], [4]]'), "faults[0].groups[1][0]"),
        (
            fault('at_ms = 1\naction = "partition"\ngroups = [[0], ["1"]]'),
            "faults[0].groups[1][0]",
        ),
        (
            fault('at_ms = 9\naction = "partition"\ngroups = [[0], [1]]\nuntil_ms = 9'),
            "faults[0].until_ms",
        ),
        # Byzantine replicas.
        (byzantine('replica = 4\nbehavior = "silent"'), "byzantine[0].replica"),
        (byzantine('behavior = "silent"'), "byzantine[0].replica"),
        (byzantine("replica = 1"), "byzantine[0].behavior"),
        (byzantine('replica = 1\nbehavior = "lie"'), "byzantine[0].behavior"),
        (
            byzantine(
                'replica = 1\nbehavior = "silent"',
                'replica = 2\nbehavior = "silent"',
                'replica = 1\nbehavior = "equivocate"',
            ),
            "byzantine[2].replica",
        ),
        (
            byzantine(*[f'replica = {replica}\nbehavior = "silent"' for replica in range(4)]),
            "byzantine",
        ),
        # Latency specifications.
        (
            with_section("network", 'latency_ms = { dist = "normal", max = 1 }'),
            "network.latency_ms.dist",
        ),
        (with_section("network", "latency_ms = { min = 1 }"), "network.latency_ms.max"),
        (with_section("network", "latency_ms = { min = 5, max = 4 }"), "network.latency_ms.max"),
        (with_section("network", "latency_ms = { min = -1, max = 4 }"), "network.latency_ms.min"),
        (with_section("network", "latency_ms = { max = 600001 }"), "network.latency_ms.max"),
        (with_section("network", "latency_ms = { max = 5, mean = 2 }"), "network.latency_ms.mean"),
        (
            with_section("network", 'latency_ms = { dist = "exponential", min = 1 }'),
            "network.latency_ms.mean",
        ),
        (
            with_section("network", 'latency_ms = { dist = "exponential", mean = 0 }'),
            "network.latency_ms.mean",
        ),
        (
            with_section("network", 'latency_ms = { dist = "exponential", mean = 600001 }'),
            "network.latency_ms.mean",
        ),
        (
            with_section("network", 'latency_ms = { dist = "exponential", mean = 2, max = 9 }'),
            "network.latency_ms.max",
        ),
        (
            with_section("network", 'latency_ms = { dist = "exponential", mean = "2" }'),
            "network.latency_ms.mean",
        ),
        # Invalid TOML.
        ("name = \n", "file"),
        ('name = "x"\nname = "y"\n', "file"),
        ("[cluster\n", "file"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "file"),
        # An integer literal too long for int() to convert.
        (MINIMAL + "seed = 1" + "0" * 5000 + "\n", "file"),
    ],
)
def test_each_error_names_the_offending_field(text: str, field: str) -> None:
    error = error_of(text)

    assert error.field == field, str(error)
    assert error.source == "<string>"
    assert str(error) == f"<string>: {field}: {error.problem}"
    assert error.problem
    assert len(error.problem) < 300


def test_unknown_key_suggests_the_closest_known_key() -> None:
    error = error_of(with_section("cluster", "replica = 4"))

    assert "replicas" in error.problem


def test_invalid_toml_problem_says_so() -> None:
    assert error_of("[cluster\n").problem.startswith("invalid TOML: ")


# Files.


def test_load_scenario_reads_a_file_and_records_its_path(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    path.write_text(FULL_EXAMPLE, encoding="utf-8")

    scenario = load_scenario(path)

    assert scenario == dataclasses.replace(parse_scenario(FULL_EXAMPLE), source=str(path))


def test_load_scenario_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)

    assert (caught.value.source, caught.value.field) == (str(path), "file")


def test_load_scenario_reports_a_directory_as_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(str(tmp_path))

    assert (caught.value.source, caught.value.field) == (str(tmp_path), "file")


def test_load_scenario_reports_invalid_toml_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x\n', encoding="utf-8")

    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)

    assert (caught.value.source, caught.value.field) == (str(path), "file")
    assert caught.value.problem.startswith("invalid TOML: ")


def test_load_scenario_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))

    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)

    assert (caught.value.source, caught.value.field) == (str(path), "file")


def test_every_scenario_in_the_repository_loads() -> None:
    # One looping test rather than a parametrized one: zero files must pass, not be skipped.
    for path in sorted(SCENARIOS_DIRECTORY.glob("*.toml")):
        scenario = load_scenario(path)
        assert scenario.source == str(path)


# Property tests: whatever the input, the only failure is a ScenarioError.


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text_either_parses_or_raises_scenario_error(text: str) -> None:
    try:
        parse_scenario(text)
    except ScenarioError:
        pass


def toml_document(document: dict[str, Any]) -> str:
    """Any document as TOML text, NaNs, infinities and mixed arrays included: the property
    test below feeds the loader what a careless hand could write."""
    return tomli_w.dumps(document)


KNOWN_KEYS = [
    "name", "description", "seed", "cluster", "network", "workload", "faults", "byzantine",
    "expect", "replicas", "batch_size", "checkpoint_interval", "view_change_timeout_ms",
    "batch_timeout_ms", "heartbeat_interval_ms", "retransmit_interval_ms", "client_timeout_ms",
    "watermark_window", "latency_ms", "drop", "duplicate", "dist", "min", "max", "mean",
    "clients", "accounts", "initial_balance", "payments", "rate_per_s", "overdraw", "at_ms",
    "action", "replica", "until_ms", "groups", "behavior", "safety", "liveness", "deadline_ms",
]  # fmt: skip
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-5, max_value=20),
    st.integers(),
    st.floats(),
    st.sampled_from([*FAULT_ACTIONS, *BEHAVIORS, "uniform", "exponential"]),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=20,
)


def mutate(document: Any, path: list[Any], value: Any) -> Any:
    """A copy of ``document`` with the item at ``path`` replaced, or deleted if value is None."""
    if not path or not isinstance(document, dict | list) or not document:
        return document if path else value
    position = path[0] % len(document)
    if isinstance(document, list):
        copy_list = list(document)
        if value is None and len(path) == 1:
            del copy_list[position]
        else:
            copy_list[position] = mutate(copy_list[position], path[1:], value)
        return copy_list
    copy = dict(document)
    key = list(copy)[position]
    if value is None and len(path) == 1:
        del copy[key]
    else:
        copy[key] = mutate(copy[key], path[1:], value)
    return copy


def document_of(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


@settings(max_examples=500)
@given(
    mutations=st.lists(
        st.tuples(
            st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=4),
            st.one_of(st.none(), values),
        ),
        max_size=3,
    ),
    extra=st.dictionaries(keys, values, max_size=2),
)
def test_mutated_scenarios_either_parse_or_raise_scenario_error(
    mutations: list[tuple[list[int], Any]], extra: dict[str, Any]
) -> None:
    document: Any = document_of(FULL_EXAMPLE)
    for path, value in mutations:
        document = mutate(document, path, value)
    document = {**document, **extra}

    try:
        scenario = parse_scenario(toml_document(document))
    except ScenarioError as error:
        assert error.field
        return

    at_times = [fault.at_ms for fault in scenario.faults]
    assert at_times == sorted(at_times)
    for spec in scenario.byzantine:
        assert 0 <= spec.replica < scenario.cluster.replicas


def test_the_toml_writer_used_by_the_property_test_round_trips() -> None:
    document = document_of(FULL_EXAMPLE)

    assert document_of(toml_document(document)) == document


def test_a_fault_may_name_every_message_type_the_protocol_has() -> None:
    """The names come from pbft.messages.MessageType itself, so the state-transfer messages
    (once missing from a hand-kept list) can be dropped, delayed or reordered too."""
    from pbft.messages import MessageType

    names = ", ".join(f'"{message_type.name}"' for message_type in MessageType)
    scenario = parse_scenario(
        f"""
name = "every-type"
[cluster]
replicas = 4
[workload]
payments = 1
[[faults]]
at_ms = 0
action = "drop"
messages = [{names}]
probability = 1.0
""",
        "<test>",
    )
    (fault,) = scenario.faults
    assert "STATE_CHUNK" in fault.messages and "STATE_REQUEST" in fault.messages
    assert len(fault.messages) == len(MessageType)
