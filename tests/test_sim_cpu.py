"""The simulator's CPU model (sim/cpu.py), `pbft calibrate`, and the scenario keys for both:
work queues behind a busy core, throughput saturates and latency grows with load, the
same seed gives the same run, and a wrong key is one line naming it (exit 2)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from cli.main import EXIT_OK, EXIT_USAGE, main
from sim.cpu_bench import lone_latency_ms, run_load
from sim.scenario import CpuSpec, ScenarioError, parse_scenario
from sim.simulator import Simulation, run_scenario

# Costly on purpose: the cluster saturates at a couple of hundred payments a second, so a
# run of a few hundred payments shows it.
SLOW = CpuSpec(sign_us=500, verify_us=1500, per_message_us=300)

BASE = """
name = "cpu"
seed = 3
[cluster]
replicas = 4
{cpu}
[workload]
payments = 60
rate_per_s = 200
"""


def _scenario(cpu_line: str) -> str:
    return BASE.format(cpu=cpu_line)


def test_without_the_key_there_is_no_model() -> None:
    scenario = parse_scenario(_scenario(""))
    assert scenario.cluster.cpu is None
    simulation = Simulation(scenario)
    assert simulation.cores is None


def test_inline_model_is_read() -> None:
    scenario = parse_scenario(
        _scenario("cpu = { sign_us = 50, verify_us = 120.5, per_message_us = 30, cores = 2 }")
    )
    assert scenario.cluster.cpu == CpuSpec(50.0, 120.5, 30.0, cores=2)


def test_the_model_slows_payments_down_and_is_deterministic() -> None:
    free = run_scenario(parse_scenario(_scenario("")))
    cpu_line = "cpu = { sign_us = 500, verify_us = 1500, per_message_us = 300 }"
    first = run_scenario(parse_scenario(_scenario(cpu_line)))
    second = run_scenario(parse_scenario(_scenario(cpu_line)))
    assert first.verdict == second.verdict == "ok"
    assert first.trace_hash == second.trace_hash
    assert first.trace_hash != free.trace_hash
    p50 = first.latency_ms["p50"]
    free_p50 = free.latency_ms["p50"]
    assert p50 is not None and free_p50 is not None
    # A request's path costs at least a signature and several checks at 1.5 ms each.
    assert p50 > free_p50 + 5


def test_nodes_count_their_own_signatures_and_checks() -> None:
    simulation = Simulation(
        parse_scenario(_scenario("cpu = { sign_us = 10, verify_us = 10, per_message_us = 10 }"))
    )
    simulation.run()
    assert simulation.cores is not None
    replicas = [simulation.cores[("replica", replica, 0)] for replica in range(4)]
    clients = [core for name, core in simulation.cores.items() if name[0] == "client"]
    # Every replica checks every client request itself (a shared cache does not spare it).
    assert all(core.cache.verifies >= 60 for core in replicas)
    assert all(core.key.signs > 0 and core.messages > 0 for core in replicas)
    assert sum(core.key.signs for core in clients) >= 60


def test_throughput_saturates_and_latency_grows_with_load() -> None:
    points = [run_load(SLOW, rate=rate, payments=int(rate * 0.4)) for rate in (100, 800, 1600)]
    light, heavy, heavier = points
    # Below saturation the cluster keeps up with what is offered.
    assert light.throughput_per_s > 0.7 * light.offered_per_s
    # Past it, offering twice as much gets no more through...
    assert heavy.throughput_per_s < 0.5 * heavy.offered_per_s
    assert heavier.throughput_per_s < 1.15 * heavy.throughput_per_s
    # ...and only makes the queue, hence the latency, longer.
    assert light.p50_ms < heavy.p50_ms < heavier.p50_ms


def test_durable_writes_cost_time_when_the_model_says_so() -> None:
    without = lone_latency_ms(SLOW, payments=5)
    with_fsync = lone_latency_ms(CpuSpec(500, 1500, 300, fsync_us=5000), payments=5)
    # At least the primary's proposal and each phase's vote wait for a write.
    assert with_fsync > without + 10


def test_a_shared_machine_is_slower_than_a_core_per_node() -> None:
    own = lone_latency_ms(SLOW, payments=5)
    shared = lone_latency_ms(CpuSpec(500, 1500, 300, cores=1), payments=5)
    assert shared > own


# --- errors: one line naming the key --------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu_line", "field", "words"),
    [
        ("cpu = { sign_us = 1, verify_us = 1 }", "cluster.cpu.per_message_us", "required"),
        (
            "cpu = { sign_us = -1, verify_us = 1, per_message_us = 1 }",
            "cluster.cpu.sign_us",
            "must be in",
        ),
        (
            "cpu = { sign_us = 1, verify_us = 1, per_message_us = 1, sign = 2 }",
            "cluster.cpu.sign",
            "unknown key",
        ),
        (
            'cpu = { sign_us = 1, verify_us = "fast", per_message_us = 1 }',
            "cluster.cpu.verify_us",
            "expected a number",
        ),
        (
            "cpu = { sign_us = 1, verify_us = 1, per_message_us = 1, cores = -2 }",
            "cluster.cpu.cores",
            "must be in",
        ),
        ('cpu = "no-such-calibration.toml"', "cluster.cpu", "cannot read"),
        ("cpu = 7", "cluster.cpu", "expected a table"),
    ],
)
def test_bad_cpu_keys_are_named(cpu_line: str, field: str, words: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(_scenario(cpu_line))
    assert raised.value.field == field
    assert words in str(raised.value)


def test_a_bad_calibration_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "cal.toml").write_text("[cpu]\nsign_us = 1\nverify_us = 1\n")
    scenario = tmp_path / "s.toml"
    scenario.write_text(_scenario('cpu = "cal.toml"'))
    with pytest.raises(ScenarioError) as raised:
        from sim.scenario import load_scenario

        load_scenario(scenario)
    assert raised.value.field == "cluster.cpu.per_message_us"
    assert "cal.toml" in str(raised.value)


def test_run_with_a_bad_cpu_key_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(_scenario("cpu = { sign_us = 1, verify_us = 1, per_message = 1 }"))
    assert main(["run", str(scenario)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cluster.cpu.per_message" in err


# --- pbft calibrate -------------------------------------------------------------------------


def test_calibrate_writes_a_file_a_scenario_can_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration.toml"
    assert main(["calibrate", "--seconds", "0.05", "--out", str(out)]) == EXIT_OK
    document = tomllib.loads(out.read_text())
    cpu = document["cpu"]
    assert cpu["sign_us"] > 0 and cpu["verify_us"] > 0 and cpu["per_message_us"] >= 0
    assert document["machine"]["messages_counted"] > 0
    scenario = tmp_path / "s.toml"
    scenario.write_text(_scenario('cpu = "calibration.toml"'))
    from sim.scenario import load_scenario

    loaded = load_scenario(scenario)
    assert loaded.cluster.cpu == CpuSpec(**cpu)
    assert cpu["per_request_us"] == 0
    assert cpu["fsync_us"] > 0


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["calibrate", "--seconds", "0"], "--seconds"),
        (["calibrate", "--seconds", "nan"], "--seconds"),
        (["calibrate", "--out", "/no/such/dir/c.toml"], "--out"),
    ],
)
def test_calibrate_argument_errors_are_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert words in captured.err


def test_calibrate_fits_the_per_request_cost_to_a_bench_file(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    figures = {"replicas": 4, "cpu_s_per_payment": 0.012, "throughput_per_s": 100.0}
    bench.write_text(json.dumps({"runs": [figures]}))
    out = tmp_path / "fitted.toml"
    args = ["calibrate", "--seconds", "0.05", "--bench", str(bench), "--out", str(out)]
    assert main(args) == EXIT_OK
    document = tomllib.loads(out.read_text())
    assert document["machine"]["per_message_from"].startswith("pbft bench")
    assert document["cpu"]["per_request_us"] > 0
    # Storage waits apart (the bench's figure is CPU time only), the fitted model spends
    # about what the bench measured per payment on the replicas (the fit's own load differs
    # a little from this one's: batches, hence messages).
    cpu = CpuSpec(**{**document["cpu"], "fsync_us": 0.0})
    point = run_load(cpu, rate=100, payments=40, clients=4)
    assert 8.4 < point.replica_cpu_ms < 15.6


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{", "not JSON"),
        ("[]", "not a pbft bench"),
        ('{"runs": []}', "no runs"),
        ('{"runs": [{"replicas": 4, "cpu_s_per_payment": -1}]}', "cpu_s_per_payment"),
        ('{"runs": [{"replicas": 2, "cpu_s_per_payment": 0.01}]}', "replicas"),
    ],
)
def test_calibrate_refuses_a_bad_bench_file_in_one_line(
    tmp_path: Path, content: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(content)
    assert main(["calibrate", "--seconds", "0.01", "--bench", str(bench)]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert words in captured.err
