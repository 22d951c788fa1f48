"""TOML written through tomli-w loads back to the values it was written from: fuzz cases,
shrunk reproducers (the checked-in regression-fuzz-*.toml among them) and cluster files."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from runtime.cluster import load_cluster, write_cluster
from sim.fuzz import generate, generate_document
from sim.scenario import ScenarioTomlError, load_scenario, parse_scenario, to_toml
from sim.simulator import run_scenario

ROOT = Path(__file__).resolve().parent.parent
REPRODUCERS = sorted((ROOT / "scenarios").glob("regression-fuzz-*.toml"))


@pytest.mark.parametrize("seed", range(40))
def test_a_generated_fuzz_case_loads_back_to_its_document(seed: int) -> None:
    text = generate(seed)
    assert tomllib.loads(text) == generate_document(seed)
    assert to_toml(tomllib.loads(text)) == text


def test_there_are_checked_in_reproducers() -> None:
    assert len(REPRODUCERS) >= 3, REPRODUCERS


@pytest.mark.parametrize("path", REPRODUCERS, ids=lambda path: path.name)
def test_a_checked_in_reproducer_rewritten_holds_the_same_scenario(path: Path) -> None:
    document = tomllib.loads(path.read_text())
    text = to_toml(document)
    assert tomllib.loads(text) == document
    rewritten = parse_scenario(text, str(path))
    original = load_scenario(path)
    assert rewritten == original
    assert run_scenario(rewritten).trace_hash == run_scenario(original).trace_hash


def test_the_scenario_writer_escapes_what_toml_cannot_hold_raw() -> None:
    document = {
        "name": 'a "quoted"\\ name\twith\ncontrol \x7f chars and ünïcode',
        "description": "x" * 300,
        "network": {"latency_ms": {"dist": "exponential", "mean": 2.5, "min": 0}, "drop": 0.1},
        "faults": [
            {"at_ms": 1, "action": "delay", "latency_ms": {"dist": "uniform", "min": 1, "max": 9}},
            {"at_ms": 2, "action": "partition", "groups": [[0, 1], [2, 3]]},
        ],
    }
    assert tomllib.loads(to_toml(document)) == document


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, object(), [1, math.nan], {"k": {"deep": math.inf}}]
)
def test_the_scenario_writer_refuses_values_a_scenario_cannot_hold(value: object) -> None:
    with pytest.raises(ScenarioTomlError):
        to_toml({"name": "x", "seed": 1, "value": value})


@pytest.mark.parametrize("generated", [None, 50])
def test_a_cluster_file_loads_back_to_what_was_written(
    tmp_path: Path, generated: int | None
) -> None:
    host = 'odd "host" \\ name'
    path = write_cluster(
        tmp_path,
        replicas=5,
        clients=3,
        host=host,
        base_port=9100,
        accounts_per_client=2,
        initial_balance=777,
        protocol={"batch_size": 8, "checkpoint_interval": 16},
        generated_accounts=generated,
    )
    document = tomllib.loads(path.read_text())
    cluster = load_cluster(path)
    assert document["f"] == 1
    assert document["protocol"] == {"batch_size": 8, "checkpoint_interval": 16}
    assert [(r["id"], r["host"], r["port"]) for r in document["replicas"]] == [
        (replica, host, 9100 + replica) for replica in range(5)
    ]
    assert [replica.public_key.hex() for replica in cluster.replicas] == [
        entry["public_key"] for entry in document["replicas"]
    ]
    assert [client["id"] for client in document["clients"]] == [0, 1, 2]
    if generated is None:
        assert "genesis" not in document
        assert document["accounts"] == [
            {"name": f"acct-{index:05d}", "owner": index // 2, "balance": 777} for index in range(6)
        ]
    else:
        assert "accounts" not in document
        assert document["genesis"] == {"generated_accounts": 50, "balance": 777}
    assert cluster.config.batch_size == 8
    assert all(replica.host == host for replica in cluster.replicas)
