"""The deterministic simulator: a discrete-event loop driving the real replica and client cores.

One clock (integer microseconds) and one seeded RNG own every choice: message
latency, loss, duplication, the workload. Events at the same instant run in the
order they were scheduled. Nothing here runs on trio or reads the wall clock, so
the same scenario and seed always produce the same trace and trace hash.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.client import ClientCore, Decided
from pbft.config import ClusterConfig
from pbft.events import (
    Action,
    Broadcast,
    Executed,
    MessageReceived,
    Note,
    Persist,
    Send,
    Tick,
)
from pbft.messages import MessageType
from pbft.replica import Replica
from sim.byzantine import BEHAVIORS, Adversary, Behavior
from sim.checkers import SAFETY_CHECKS, CheckResult, Observations, run_checks
from sim.network import Latency, Network
from sim.scenario import FaultSpec, Scenario
from sim.trace import Trace
from sim.workload import PlannedPayment, genesis_accounts, plan_payments

TICK_US = 5_000
SIGNATURE_CACHE_ENTRIES = 1 << 18
MINIMUM_DRAIN_US = 30_000_000

_DELIVER, _TICK, _SUBMIT, _FAULT, _HEAL = range(5)


@dataclass
class ReplicaNode:
    replica_id: int
    key: SigningKey
    storage: dict[tuple[str | int, ...], bytes]
    behavior: Behavior | None
    core: Replica | None = None
    retired_drops: Counter[str] = field(default_factory=Counter)


@dataclass
class SimulationResult:
    scenario: Scenario
    seed: int
    trace_hash: str
    trace_events: int
    simulated_ms: float
    submitted: int
    confirmed: int
    rejected: dict[str, int]
    undecided: int
    checks: dict[str, CheckResult]
    view_changes: int
    messages_sent: int
    messages_dropped: dict[str, int]
    latency_ms: dict[str, float | None]
    expectation_failures: list[str]
    # "replica N" -> how many pieces of equivocation evidence correct replicas hold against it
    evidence: dict[str, int] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "violated" if self.expectation_failures else "ok"

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "source": self.scenario.source,
            "seed": self.seed,
            "trace_hash": self.trace_hash,
            "trace_events": self.trace_events,
            "simulated_ms": self.simulated_ms,
            "payments": {
                "submitted": self.submitted,
                "confirmed": self.confirmed,
                "rejected": sum(self.rejected.values()),
                "undecided": self.undecided,
            },
            "rejections": dict(sorted(self.rejected.items())),
            "checks": {
                name: ("ok" if result.ok else "violated") for name, result in self.checks.items()
            },
            "check_details": {
                name: result.details for name, result in self.checks.items() if result.details
            },
            "view_changes": self.view_changes,
            "messages": {"sent": self.messages_sent, "dropped": self.messages_dropped},
            "latency_ms": self.latency_ms,
            "evidence": self.evidence,
            "expect": {
                "safety": self.scenario.expect.safety,
                "liveness": self.scenario.expect.liveness,
            },
            "expectation_failures": self.expectation_failures,
            "verdict": self.verdict,
        }


def cluster_config(scenario: Scenario) -> ClusterConfig:
    cluster = scenario.cluster
    return ClusterConfig(
        replica_count=cluster.replicas,
        batch_size=cluster.batch_size,
        batch_timeout_ms=cluster.batch_timeout_ms,
        checkpoint_interval=cluster.checkpoint_interval,
        watermark_window=cluster.watermark_window,
        view_change_timeout_ms=cluster.view_change_timeout_ms,
        heartbeat_interval_ms=cluster.heartbeat_interval_ms,
        retransmit_interval_ms=cluster.retransmit_interval_ms,
        client_timeout_ms=cluster.client_timeout_ms,
    )


class Simulation:
    def __init__(
        self, scenario: Scenario, seed: int | None = None, trace_sink: TextIO | None = None
    ) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.rng = random.Random(self.seed)
        self.config = cluster_config(scenario)
        self.trace = Trace(trace_sink)
        # One signature cache for every simulated node. Verification is a pure function of
        # (key, domain, payload, signature), so sharing changes no node's decision, only how
        # often the simulator pays for the same check; failures are never cached.
        self.signature_cache = VerificationCache(max_entries=SIGNATURE_CACHE_ENTRIES)
        self.now_us = 0
        self._queue: list[tuple[int, int, int, Any, Any, Any]] = []
        self._order = 0
        network = scenario.network
        latency = network.latency
        self.network = Network(
            self.rng,
            Latency(latency.distribution, latency.min_ms, latency.max_ms, latency.mean_ms),
            network.drop,
            network.duplicate,
        )
        workload = scenario.workload
        self.keyring = KeyRing()
        replica_keys = [
            SigningKey.derive(self.seed, f"replica/{replica}")
            for replica in self.config.replica_ids()
        ]
        client_keys = [
            SigningKey.derive(self.seed, f"client/{client}") for client in range(workload.clients)
        ]
        for replica, key in enumerate(replica_keys):
            self.keyring.add(("replica", replica), key.verify_key)
        for client, key in enumerate(client_keys):
            self.keyring.add(("client", client), key.verify_key)
        self.accounts = genesis_accounts(
            workload.accounts, workload.clients, workload.initial_balance
        )
        byzantine = {entry.replica: entry.behavior for entry in scenario.byzantine}
        self.adversary = Adversary.for_cluster(self.config.replica_count, frozenset(byzantine))
        self.replicas: list[ReplicaNode] = []
        for replica, key in enumerate(replica_keys):
            behavior_name = byzantine.get(replica)
            behavior = (
                BEHAVIORS[behavior_name](replica, key, self.adversary)
                if behavior_name is not None
                else None
            )
            node = ReplicaNode(replica, key, {}, behavior)
            node.core = self._boot(node)
            self.replicas.append(node)
        self.clients = [
            ClientCore(client, self.config, key, self.keyring, cache=self.signature_cache)
            for client, key in enumerate(client_keys)
        ]
        self.observed = Observations(
            correct=frozenset(
                replica for replica in self.config.replica_ids() if replica not in byzantine
            ),
            initial_total=sum(account.balance for account in self.accounts.values()),
        )
        self.decided_at_us: dict[tuple[int, int], int] = {}
        self.submitted_at_us: dict[tuple[int, int], int] = {}
        self.withheld = 0
        self.retired_view = 0
        self.payments: list[PlannedPayment] = plan_payments(
            self.rng,
            payments=workload.payments,
            rate_per_s=workload.rate_per_s,
            clients=workload.clients,
            accounts=workload.accounts,
            initial_balance=workload.initial_balance,
            overdraw=workload.overdraw,
        )

    def _boot(self, node: ReplicaNode) -> Replica:
        return Replica(
            node.replica_id,
            self.config,
            node.key,
            self.keyring,
            self.accounts,
            records=dict(node.storage) if node.storage else None,
            cache=self.signature_cache,
        )

    # --- the event loop -----------------------------------------------------------------

    def _schedule(self, at_us: int, kind: int, a: Any = None, b: Any = None, c: Any = None) -> None:
        self._order += 1
        heapq.heappush(self._queue, (at_us, self._order, kind, a, b, c))

    def run(self) -> SimulationResult:
        replica_count = self.config.replica_count
        for index in range(replica_count):
            self._schedule(TICK_US * index // replica_count, _TICK, ("replica", index))
        for index in range(len(self.clients)):
            self._schedule(TICK_US * index // max(1, len(self.clients)), _TICK, ("client", index))
        for payment in self.payments:
            self._schedule(payment.at_us, _SUBMIT, payment)
        for fault in self.scenario.faults:
            self._schedule(fault.at_ms * 1000, _FAULT, fault)
            if fault.action == "partition" and fault.until_ms is not None:
                self._schedule(fault.until_ms * 1000, _HEAL)
        last_submit_us = self.payments[-1].at_us if self.payments else 0
        last_fault_us = max((fault.at_ms * 1000 for fault in self.scenario.faults), default=0)
        timeout_us = self.config.view_change_timeout_ms * 1000
        if self.scenario.expect.deadline_ms:
            deadline_us = self.scenario.expect.deadline_ms * 1000
        else:
            deadline_us = max(last_submit_us, last_fault_us) + max(
                MINIMUM_DRAIN_US, 40 * timeout_us
            )
        settle_us = 2 * timeout_us + 500_000
        stop_us: int | None = None
        total = len(self.payments)
        while self._queue:
            at_us, _, kind, a, b, c = heapq.heappop(self._queue)
            if at_us > deadline_us or (stop_us is not None and at_us > stop_us):
                break
            self.now_us = at_us
            if kind == _DELIVER:
                self._deliver(a, b, c)
            elif kind == _TICK:
                self._tick(a)
            elif kind == _SUBMIT:
                self._submit(a)
            elif kind == _FAULT:
                self._fault(a)
            elif kind == _HEAL:
                self.network.heal()
                self.trace.record(self.now_us, "heal", "network")
            if stop_us is None and len(self.decided_at_us) == total and at_us >= last_submit_us:
                stop_us = max(at_us, last_fault_us) + settle_us
        return self._result()

    def _deliver(self, source: Principal, destination: Principal, data: bytes) -> None:
        role, index = destination
        message_type = data[2] if len(data) > 2 else -1
        self.trace.record(
            self.now_us,
            "deliver",
            _node_name(destination),
            f"{_node_name(source)} {_type_name(message_type)} "
            f"{hashlib.sha256(data).hexdigest()[:16]}",
        )
        if role == "replica":
            node = self.replicas[index]
            if node.core is None:
                self.network.dropped["destination_down"] += 1
                self._trace_lost(source, destination, data, "destination_down")
                return
            self._replica_actions(node, node.core.handle(MessageReceived(data)))
        else:
            self._client_actions(index, self.clients[index].handle(MessageReceived(data)))

    def _tick(self, node: Principal) -> None:
        role, index = node
        now_ms = self.now_us // 1000
        if role == "replica":
            replica = self.replicas[index]
            if replica.core is not None:
                self._replica_actions(replica, replica.core.handle(Tick(now_ms)))
        else:
            self._client_actions(index, self.clients[index].handle(Tick(now_ms)))
        self._schedule(self.now_us + TICK_US, _TICK, node)

    def _submit(self, payment: PlannedPayment) -> None:
        client = self.clients[payment.client_id]
        identity = (payment.client_id, payment.request_id)
        actions = client.submit(payment.request_id, payment.payer, payment.payee, payment.amount)
        self.observed.submitted[identity] = client.outstanding[payment.request_id].digest
        self.submitted_at_us[identity] = self.now_us
        self.trace.record(
            self.now_us,
            "submit",
            f"c{payment.client_id}",
            f"{payment.request_id} {payment.payer}>{payment.payee} {payment.amount}",
        )
        self._client_actions(payment.client_id, actions)

    def _fault(self, fault: FaultSpec) -> None:
        detail = fault.action
        if fault.action == "crash" and fault.replica is not None:
            node = self.replicas[fault.replica]
            if node.core is not None:
                node.retired_drops.update(node.core.drops)
                self.retired_view = max(self.retired_view, node.core.view)
                node.core = None
            detail = f"crash r{fault.replica}"
        elif fault.action == "restart" and fault.replica is not None:
            node = self.replicas[fault.replica]
            if node.core is None:
                node.core = self._boot(node)
            detail = f"restart r{fault.replica}"
        elif fault.action == "partition" and fault.groups is not None:
            one_way = fault.direction == "one-way"
            self.network.partition(fault.groups, self.config.replica_count, one_way)
            detail = f"partition {[list(group) for group in fault.groups]} {fault.direction}"
        elif fault.action == "heal":
            self.network.heal()
        self.trace.record(self.now_us, "fault", "network", detail)

    # --- carrying out actions -----------------------------------------------------------

    def _transmit(self, source: Principal, destination: Principal, data: bytes) -> None:
        payloads = [data]
        if source[0] == "replica":
            behavior = self.replicas[source[1]].behavior
            if behavior is not None:
                payloads = behavior.outgoing(destination, data, self.now_us // 1000)
                if not payloads:
                    self.withheld += 1
                    self._trace_lost(source, destination, data, "byzantine_withheld")
        for payload in payloads:
            delays_us = self.network.route(source, destination)
            if not delays_us:
                self._trace_lost(source, destination, payload, self.network.last_drop_reason)
            for delay_us in delays_us:
                self._schedule(self.now_us + delay_us, _DELIVER, source, destination, payload)

    def _trace_lost(self, source: Principal, destination: Principal, data: bytes, why: str) -> None:
        message_type = data[2] if len(data) > 2 else -1
        self.trace.record(
            self.now_us,
            "lost",
            _node_name(destination),
            f"{_node_name(source)} {_type_name(message_type)} {why}",
        )

    def _replica_actions(self, node: ReplicaNode, actions: list[Action]) -> None:
        source: Principal = ("replica", node.replica_id)
        name = f"r{node.replica_id}"
        for action in actions:
            if isinstance(action, Persist):
                if action.value is None:
                    node.storage.pop(action.key, None)
                else:
                    node.storage[action.key] = action.value
            elif isinstance(action, Send):
                self._transmit(source, action.to, action.data)
            elif isinstance(action, Broadcast):
                for replica in self.config.replica_ids():
                    if replica != node.replica_id:
                        self._transmit(source, ("replica", replica), action.data)
            elif isinstance(action, Executed):
                self._record_execution(node.replica_id, action)
                self.trace.record(
                    self.now_us,
                    "execute",
                    name,
                    f"{action.seq} {action.entry_digest.hex()[:16]} {len(action.requests)}",
                )
            elif isinstance(action, Note):
                self.trace.record(self.now_us, action.kind, name, action.detail)

    def _record_execution(self, replica: int, executed: Executed) -> None:
        entries = self.observed.executed_entries.setdefault(replica, {})
        earlier = entries.get(executed.seq)
        if earlier is not None and earlier != executed.entry_digest:
            self.observed.self_conflicts.append(
                (replica, executed.seq, earlier, executed.entry_digest)
            )
        entries[executed.seq] = executed.entry_digest
        requests = self.observed.executed_requests.setdefault(replica, {})
        for record in executed.requests:
            requests.setdefault((record.client_id, record.request_id), []).append(
                (executed.seq, record)
            )

    def _client_actions(self, client: int, actions: list[Send | Decided]) -> None:
        source: Principal = ("client", client)
        for action in actions:
            if isinstance(action, Send):
                self._transmit(source, action.to, action.data)
            else:
                identity = (action.client_id, action.request_id)
                self.observed.decided[identity] = action
                self.decided_at_us[identity] = self.now_us
                self.trace.record(
                    self.now_us,
                    "decided",
                    f"c{client}",
                    f"{action.request_id} {action.outcome} {action.reason} seq {action.seq}",
                )

    # --- the result ---------------------------------------------------------------------

    def _result(self) -> SimulationResult:
        for node in self.replicas:
            if node.core is not None and node.replica_id in self.observed.correct:
                ledger = node.core.ledger
                balances = [account.balance for account in ledger.accounts().values()]
                self.observed.final_ledgers[node.replica_id] = (
                    ledger.total_balance(),
                    ledger.recount_total(),
                    min(balances, default=0),
                )
        checks = dict(run_checks(self.observed, self.keyring))
        rejected: Counter[str] = Counter()
        confirmed = 0
        for decided in self.observed.decided.values():
            if decided.outcome == "confirmed":
                confirmed += 1
            else:
                rejected[decided.reason] += 1
        dropped: Counter[str] = Counter(self.network.dropped)
        if self.withheld:
            dropped["byzantine_withheld"] += self.withheld
        views = [self.retired_view]
        for node in self.replicas:
            dropped.update(
                {f"replica:{reason}": count for reason, count in node.retired_drops.items()}
            )
            if node.core is not None:
                dropped.update(
                    {f"replica:{reason}": count for reason, count in node.core.drops.items()}
                )
                if node.replica_id in self.observed.correct:
                    views.append(node.core.view)
        evidence: Counter[str] = Counter()
        for node in self.replicas:
            if node.core is not None and node.replica_id in self.observed.correct:
                for _, offender, _, _ in node.core.evidence:
                    evidence[f"replica {offender}"] += 1
        latencies_us = sorted(
            self.decided_at_us[identity] - self.submitted_at_us[identity]
            for identity in self.decided_at_us
        )
        expect = self.scenario.expect
        failures = []
        safety_ok = all(checks[name].ok for name in SAFETY_CHECKS)
        if expect.safety and not safety_ok:
            broken = [name for name in SAFETY_CHECKS if not checks[name].ok]
            failures.append(f"safety violated: {', '.join(broken)}")
        if not expect.safety and safety_ok:
            failures.append("expected a safety violation (negative control), none was found")
        if expect.liveness and not checks["liveness"].ok:
            failures.append(
                f"liveness: {len(self.payments) - len(self.decided_at_us)} payments undecided"
            )
        return SimulationResult(
            scenario=self.scenario,
            seed=self.seed,
            trace_hash=self.trace.hexdigest(),
            trace_events=self.trace.events,
            simulated_ms=self.now_us / 1000,
            submitted=len(self.payments),
            confirmed=confirmed,
            rejected=dict(rejected),
            undecided=len(self.payments) - len(self.observed.decided),
            checks=checks,
            view_changes=max(views),
            messages_sent=self.network.sent,
            messages_dropped=dict(sorted(dropped.items())),
            latency_ms={
                "p50": _percentile_ms(latencies_us, 50),
                "p95": _percentile_ms(latencies_us, 95),
                "p99": _percentile_ms(latencies_us, 99),
            },
            expectation_failures=failures,
            evidence=dict(sorted(evidence.items())),
        )


def _percentile_ms(sorted_us: list[int], percent: int) -> float | None:
    """Nearest-rank percentile: an observed value, exact and reproducible."""
    if not sorted_us:
        return None
    rank = max(1, -(-percent * len(sorted_us) // 100))
    return sorted_us[rank - 1] / 1000


def _node_name(node: Principal) -> str:
    return f"{'r' if node[0] == 'replica' else 'c'}{node[1]}"


def _type_name(code: int) -> str:
    try:
        return MessageType(code).name
    except ValueError:
        return "UNKNOWN"


def run_scenario(
    scenario: Scenario, seed: int | None = None, trace_sink: TextIO | None = None
) -> SimulationResult:
    return Simulation(scenario, seed, trace_sink).run()
