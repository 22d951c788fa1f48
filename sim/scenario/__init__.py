"""Adversarial scenario files: a cluster, its network, a payment workload, the faults to
inject, the Byzantine replicas and clients, and what the run must show, written in TOML.

spec.py holds what a scenario is (frozen dataclasses) and the names and limits it is
checked against; values.py checks single values (ScenarioError names the field by its
dotted path); loading.py reads and validates whole files; writing.py writes documents back
as TOML (fuzz cases, shrunk reproducers).
"""

from sim.scenario.loading import load_scenario, parse_scenario
from sim.scenario.spec import (
    BEHAVIOR_KINDS,
    BEHAVIOR_PARAMETERS,
    BEHAVIORS,
    CLIENT_BEHAVIOR_KINDS,
    CLIENT_BEHAVIOR_PARAMETERS,
    CLIENT_BEHAVIORS,
    FAULT_ACTIONS,
    LATENCY_DISTRIBUTIONS,
    LINK_FAULTS,
    MAX_CLOCK_SKEW_FACTOR,
    MAX_DURATION_MS,
    MAX_NAME_LENGTH,
    MAX_SEED,
    MAX_TOTAL_BALANCE,
    MESSAGE_TYPE_NAMES,
    PARTITION_DIRECTIONS,
    ByzantineSpec,
    ClusterSpec,
    CpuSpec,
    ExpectSpec,
    FaultSpec,
    LatencySpec,
    LinkSpec,
    LivenessSpec,
    NetworkSpec,
    Scenario,
    TopologySpec,
    WorkloadSpec,
)
from sim.scenario.values import ScenarioError
from sim.scenario.writing import ScenarioTomlError, to_toml

__all__ = [
    "BEHAVIORS",
    "BEHAVIOR_KINDS",
    "BEHAVIOR_PARAMETERS",
    "CLIENT_BEHAVIORS",
    "CLIENT_BEHAVIOR_KINDS",
    "CLIENT_BEHAVIOR_PARAMETERS",
    "FAULT_ACTIONS",
    "LATENCY_DISTRIBUTIONS",
    "LINK_FAULTS",
    "MAX_CLOCK_SKEW_FACTOR",
    "MAX_DURATION_MS",
    "MAX_NAME_LENGTH",
    "MAX_SEED",
    "MAX_TOTAL_BALANCE",
    "MESSAGE_TYPE_NAMES",
    "PARTITION_DIRECTIONS",
    "ByzantineSpec",
    "ClusterSpec",
    "CpuSpec",
    "ExpectSpec",
    "FaultSpec",
    "LatencySpec",
    "LinkSpec",
    "LivenessSpec",
    "NetworkSpec",
    "Scenario",
    "ScenarioError",
    "ScenarioTomlError",
    "TopologySpec",
    "WorkloadSpec",
    "load_scenario",
    "parse_scenario",
    "to_toml",
]
