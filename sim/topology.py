"""Regions joined by links (networkx): where each replica and client sits, and how long a
message takes from one region to another.

A message goes the lowest-latency way over the links that are up (Dijkstra over the graph),
and is lost on that path with the chance that any of its links loses it. A `cut` fault
takes links down; a pair of regions with no path left cannot talk at all. Paths are
recomputed only when links go down or come back (a handful of regions), so routing a
message is one dictionary lookup.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import networkx as nx

from crypto.keys import Principal
from sim.scenario import TopologySpec


class Topology:
    def __init__(self, spec: TopologySpec) -> None:
        self.spec = spec
        self.graph = nx.Graph()
        self.graph.add_nodes_from(spec.regions)
        for link in spec.links:
            self.graph.add_edge(
                link.a, link.b, latency_us=int(round(link.latency_ms * 1000)), loss=link.loss
            )
        # Link -> how many cut faults hold it down (overlapping cuts heal one by one).
        self.down: Counter[frozenset[str]] = Counter()
        # (from region, to region) -> (latency us, loss probability); absent: no path.
        self.paths: dict[tuple[str, str], tuple[int, float]] = {}
        self._route_all()

    def region(self, node: Principal) -> str:
        role, index = node
        placement = self.spec.replicas if role == "replica" else self.spec.clients
        return placement[index]

    def between(self, source: Principal, destination: Principal) -> tuple[int, float] | None:
        """The path's latency (us) and loss, or None when the regions are cut apart."""
        return self.paths.get((self.region(source), self.region(destination)))

    def cut(self, links: Iterable[tuple[str, str]]) -> None:
        for a, b in links:
            self.down[frozenset((a, b))] += 1
        self._route_all()

    def restore(self, links: Iterable[tuple[str, str]]) -> None:
        for a, b in links:
            key = frozenset((a, b))
            if self.down[key] > 0:
                self.down[key] -= 1
        self._route_all()

    def restore_all(self) -> None:
        self.down.clear()
        self._route_all()

    def _route_all(self) -> None:
        graph = nx.Graph()
        graph.add_nodes_from(self.graph.nodes)
        graph.add_edges_from(
            (a, b, data)
            for a, b, data in self.graph.edges(data=True)
            if not self.down[frozenset((a, b))]
        )
        paths: dict[tuple[str, str], tuple[int, float]] = {}
        for source in self.spec.regions:
            lengths, routes = nx.single_source_dijkstra(graph, source, weight="latency_us")
            for destination, length in lengths.items():
                route = routes[destination]
                delivered = math.prod(
                    1.0 - graph.edges[a, b]["loss"] for a, b in zip(route, route[1:], strict=False)
                )
                paths[(source, destination)] = (int(length), 1.0 - delivered)
        self.paths = paths
