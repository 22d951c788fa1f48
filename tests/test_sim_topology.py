"""`[network] topology` (sim/topology.py): regions, links, shortest paths over networkx,
`cut` faults, and the loader's one-line errors naming the key."""

from __future__ import annotations

import random

import pytest

from sim.network import Latency, Network
from sim.scenario import LinkSpec, ScenarioError, TopologySpec, parse_scenario
from sim.simulator import run_scenario
from sim.topology import Topology

SPEC = TopologySpec(
    regions=("eu", "us", "asia"),
    links=(
        LinkSpec("eu", "us", 40.0),
        LinkSpec("us", "asia", 80.0, loss=0.5),
        LinkSpec("eu", "asia", 200.0),
    ),
    replicas=("eu", "us", "asia", "asia"),
    clients=("us",),
)


def test_delay_is_the_shortest_path() -> None:
    topology = Topology(SPEC)
    assert topology.between(("replica", 0), ("replica", 1)) == (40_000, 0.0)
    # eu -> asia: through us (120 ms) beats the direct link (200 ms), and takes us-asia's loss.
    assert topology.between(("replica", 0), ("replica", 2)) == (120_000, 0.5)
    assert topology.between(("replica", 2), ("replica", 3)) == (0, 0.0)
    assert topology.between(("client", 0), ("replica", 1)) == (0, 0.0)


def test_a_cut_reroutes_or_isolates_and_heals_one_cut_at_a_time() -> None:
    topology = Topology(SPEC)
    topology.cut([("eu", "us")])
    assert topology.between(("replica", 0), ("replica", 2)) == (200_000, 0.0)
    assert topology.between(("replica", 0), ("replica", 1)) == (280_000, 0.5)
    topology.cut([("eu", "asia"), ("eu", "us")])
    assert topology.between(("replica", 0), ("replica", 1)) is None
    topology.restore([("eu", "asia"), ("eu", "us")])
    # eu-us was cut twice: one restore leaves it down.
    assert topology.between(("replica", 0), ("replica", 1)) == (280_000, 0.5)
    topology.restore_all()
    assert topology.between(("replica", 0), ("replica", 1)) == (40_000, 0.0)


def test_the_network_adds_the_path_and_counts_cut_messages() -> None:
    topology = Topology(SPEC)
    network = Network(random.Random(1), Latency("uniform", 1.0, 1.0), 0.0, 0.0, topology)
    assert network.route(("replica", 0), ("replica", 1)) == [41_000]
    topology.cut([("eu", "us"), ("eu", "asia")])
    assert network.route(("replica", 0), ("replica", 1)) == []
    assert network.dropped["cut"] == 1
    network.make_synchronous()
    assert network.route(("replica", 0), ("replica", 1)) == [41_000]
    # Half the messages over us-asia are lost.
    lost = sum(not network.route(("replica", 1), ("replica", 2)) for _ in range(400))
    assert 140 < lost < 260
    assert network.dropped["link_loss"] == lost


SCENARIO = """
name = "topology"
seed = 2
[cluster]
replicas = 4
view_change_timeout_ms = 1000
client_timeout_ms = 1000
[network.topology]
regions = ["eu", "us"]
{links}
replicas = ["eu", "eu", "us", "us"]
clients = "us"
[workload]
payments = 40
rate_per_s = 40
{faults}
"""

MATRIX = "latency_ms = [[0, 30], [30, 0]]"


def _scenario(links: str = MATRIX, faults: str = "", **replace: str) -> str:
    text = SCENARIO.format(links=links, faults=faults)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def test_a_topology_run_is_slower_than_a_lan_and_deterministic() -> None:
    first = run_scenario(parse_scenario(_scenario()))
    second = run_scenario(parse_scenario(_scenario()))
    assert first.verdict == "ok"
    assert first.trace_hash == second.trace_hash
    p50 = first.latency_ms["p50"]
    # A quorum of three always needs a replica across the 30 ms link, both ways.
    assert p50 is not None and p50 > 60


CUT = """
[[faults]]
at_ms = 300
until_ms = 1500
action = "cut"
links = [["eu", "us"]]
"""


def test_a_cut_drops_messages_and_heals() -> None:
    result = run_scenario(parse_scenario(_scenario(faults=CUT)))
    assert result.verdict == "ok"
    assert result.messages_dropped.get("cut", 0) > 0


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (
            _scenario(links="latency_ms = [[0, 30], [20, 0]]"),
            "network.topology.latency_ms[1][0]",
            "symmetric",
        ),
        (_scenario(links="latency_ms = [[0, 30]]"), "network.topology.latency_ms", "2 rows"),
        (
            _scenario(links="latency_ms = [[5, 30], [30, 0]]"),
            "network.topology.latency_ms[0][0]",
            "itself",
        ),
        (_scenario(links=""), "network.topology", "exactly one of"),
        (
            _scenario(links='links = [{ a = "eu", b = "mars", latency_ms = 3 }]'),
            "network.topology.links[0].b",
            "must be one of",
        ),
        (
            _scenario(links='links = [{ a = "eu", b = "us", latency_ms = 3, loss = 1 }]'),
            "network.topology.links[0].loss",
            "[0, 1)",
        ),
        (
            _scenario(**{'replicas = ["eu", "eu", "us", "us"]': 'replicas = ["eu", "us"]'}),
            "network.topology.replicas",
            "list of 4",
        ),
        (
            _scenario(**{'clients = "us"': 'clients = "moon"'}),
            "network.topology.clients",
            "must be one of",
        ),
        (
            _scenario(**{'regions = ["eu", "us"]': 'regions = ["eu", "eu"]'}),
            "network.topology.regions[1]",
            "twice",
        ),
        (
            _scenario(**{"[network.topology]": "[network.topology]\nzones = 1"}),
            "network.topology.zones",
            "unknown key",
        ),
        (
            _scenario(faults=CUT.replace('[["eu", "us"]]', '[["eu", "asia"]]')),
            "faults[0].links[0][1]",
            "must be one of",
        ),
        (
            _scenario(faults=CUT.replace('[["eu", "us"]]', '[["eu", "eu"]]')),
            "faults[0].links[0]",
            "no link",
        ),
        (
            _scenario(faults=CUT.replace('links = [["eu", "us"]]', "replica = 1")),
            "faults[0].replica",
            "not used by action",
        ),
    ],
)
def test_bad_topology_keys_are_named(text: str, field: str, words: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(text)
    assert raised.value.field == field, str(raised.value)
    assert words in str(raised.value)


def test_a_cut_needs_a_topology() -> None:
    text = """
name = "no-topology"
[[faults]]
at_ms = 1
action = "cut"
links = [["eu", "us"]]
"""
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(text)
    assert raised.value.field == "faults[0].action"
    assert "topology" in str(raised.value)
