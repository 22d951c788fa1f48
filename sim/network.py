"""The simulated network: latency, loss, duplication and partitions, all drawn from one RNG.

Time is integer microseconds so that the schedule, and hence the trace, is exactly
reproducible. Clients sit outside the replicas' network: partitions cut links
between replicas only.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from crypto.keys import Principal
from sim.topology import Topology

MAX_LATENCY_US = 600_000_000


@dataclass(frozen=True)
class Latency:
    distribution: str  # "uniform" | "exponential"
    min_ms: float
    max_ms: float | None = None
    mean_ms: float | None = None

    def sample_us(self, rng: random.Random) -> int:
        if self.distribution == "uniform":
            high = self.max_ms if self.max_ms is not None else self.min_ms
            value_ms = rng.uniform(self.min_ms, high)
        elif self.distribution == "exponential":
            mean = self.mean_ms if self.mean_ms is not None else 1.0
            value_ms = self.min_ms + rng.expovariate(1.0 / mean)
        else:
            raise ValueError(f"unknown latency distribution {self.distribution!r}")
        return min(MAX_LATENCY_US, max(1, int(value_ms * 1000)))


@dataclass(frozen=True)
class LinkRule:
    """A network fault on the messages that match its filters, while it is installed."""

    rule_id: int
    action: str  # "delay" | "drop" | "duplicate" | "reorder"
    sources: tuple[int | str, ...] | None = None  # replica ids and/or "clients"; None: any
    destinations: tuple[int | str, ...] | None = None
    messages: tuple[str, ...] | None = None  # message type names; None: any
    probability: float = 1.0
    add_ms: float = 0.0
    latency: Latency | None = None
    window_ms: float = 0.0

    def matches(self, source: Principal, destination: Principal, message_type: str) -> bool:
        return (
            _endpoint_matches(self.sources, source)
            and _endpoint_matches(self.destinations, destination)
            and (self.messages is None or message_type in self.messages)
        )


def _endpoint_matches(endpoints: tuple[int | str, ...] | None, node: Principal) -> bool:
    if endpoints is None:
        return True
    if node[0] == "client":
        return "clients" in endpoints
    return node[1] in endpoints


class Network:
    def __init__(
        self,
        rng: random.Random,
        latency: Latency,
        drop: float,
        duplicate: float,
        topology: Topology | None = None,
    ) -> None:
        if not (0.0 <= drop < 1.0 and 0.0 <= duplicate < 1.0):
            raise ValueError("drop and duplicate are probabilities in [0, 1)")
        self.rng = rng
        self.latency = latency
        self.drop = drop
        self.duplicate = duplicate
        # replica -> group number while a partition holds; None when the network is whole.
        self.groups: dict[int, int] | None = None
        # One-way: only messages from a lower-numbered group to a higher one are cut.
        self.one_way = False
        self.sent = 0
        self.delivered = 0
        self.dropped: Counter[str] = Counter()
        self.last_drop_reason = ""
        # Installed link faults, in installation order (the order their dice are rolled).
        self.rules: dict[int, LinkRule] = {}
        # Regions and links: a path's latency comes on top of `latency` (sim/topology.py).
        self.topology = topology

    def add_rule(self, rule: LinkRule) -> None:
        self.rules[rule.rule_id] = rule

    def remove_rule(self, rule_id: int) -> None:
        self.rules.pop(rule_id, None)

    def make_synchronous(self) -> None:
        """The liveness phase: no partition, no fault, no loss, no duplication."""
        self.heal()
        self.rules.clear()
        if self.topology is not None:
            self.topology.restore_all()
        self.drop = 0.0
        self.duplicate = 0.0

    def partition(
        self, groups: Sequence[Iterable[int]], replica_count: int, one_way: bool = False
    ) -> None:
        """Cut the replicas into groups; replicas listed nowhere form one more group."""
        assignment: dict[int, int] = {}
        for number, group in enumerate(groups):
            for replica in group:
                assignment[replica] = number
        rest = len(groups)
        for replica in range(replica_count):
            assignment.setdefault(replica, rest)
        self.groups = assignment
        self.one_way = one_way

    def heal(self) -> None:
        self.groups = None
        self.one_way = False

    def _cut(self, source: Principal, destination: Principal) -> bool:
        if self.groups is None or source[0] != "replica" or destination[0] != "replica":
            return False
        source_group = self.groups[source[1]]
        destination_group = self.groups[destination[1]]
        if self.one_way:
            return source_group < destination_group
        return source_group != destination_group

    def route(self, source: Principal, destination: Principal, message_type: str = "") -> list[int]:
        """Delays (us) of the copies that will arrive; empty when the message is lost."""
        self.sent += 1
        if self._cut(source, destination):
            self.dropped["partition"] += 1
            self.last_drop_reason = "partition"
            return []
        if self.drop and self.rng.random() < self.drop:
            self.dropped["loss"] += 1
            self.last_drop_reason = "loss"
            return []
        path_us = 0
        if self.topology is not None:
            path = self.topology.between(source, destination)
            if path is None:
                self.dropped["cut"] += 1
                self.last_drop_reason = "cut"
                return []
            path_us, loss = path
            if loss and self.rng.random() < loss:
                self.dropped["link_loss"] += 1
                self.last_drop_reason = "link_loss"
                return []
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        delays = [self.latency.sample_us(self.rng) for _ in range(copies)]
        if path_us:
            delays = [min(MAX_LATENCY_US, delay + path_us) for delay in delays]
        if self.rules:
            return self._apply_rules(source, destination, message_type, delays, path_us)
        return delays

    def _apply_rules(
        self,
        source: Principal,
        destination: Principal,
        message_type: str,
        delays: list[int],
        path_us: int = 0,
    ) -> list[int]:
        extra_us = 0
        for rule in self.rules.values():
            if not rule.matches(source, destination, message_type):
                continue
            if rule.action == "drop":
                if self.rng.random() < rule.probability:
                    self.dropped["fault_drop"] += 1
                    self.last_drop_reason = "fault_drop"
                    return []
            elif rule.action == "duplicate":
                if self.rng.random() < rule.probability:
                    delays.append(path_us + self.latency.sample_us(self.rng))
            elif rule.action == "delay":
                if rule.latency is not None:
                    extra_us += rule.latency.sample_us(self.rng)
                else:
                    extra_us += int(rule.add_ms * 1000)
            elif rule.action == "reorder":
                # Each copy is held back by its own random amount, so matching messages
                # overtake one another.
                delays = [
                    delay + int(self.rng.uniform(0, rule.window_ms) * 1000) for delay in delays
                ]
        return [min(MAX_LATENCY_US, delay + extra_us) for delay in delays]
