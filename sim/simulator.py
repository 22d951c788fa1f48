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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO, cast

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.chain import entry_digest
from pbft.client import (
    BalanceRead,
    ClientAction,
    ClientCore,
    Decided,
    LookupResult,
    ReplicaStatus,
)
from pbft.config import ClusterConfig
from pbft.events import Event, Executed, MessageReceived, Note, Persist, Tick
from pbft.genesis import compute_cluster_id
from pbft.history import MemoryHistoryStore
from pbft.host import Outgoing, carry_out, carry_out_client, peers_of, step, write_records
from pbft.ledger import Ledger, genesis_total
from pbft.messages import (
    MessageType,
    NewView,
    Prepare,
    PrePrepare,
)
from pbft.operations import Operation
from pbft.replica import Replica
from pbft.signed import peek, type_code_of
from pbft.stats import nearest_rank
from pbft.trace_events import (
    certificate_events,
    execute_fields,
    message_fields,
    new_view_fields,
    proposal_event,
    settings_fields,
)
from sim.adversary import (
    Adversary,
    Behavior,
    ClientBehavior,
    Twins,
    build_behavior,
    build_client_behavior,
)
from sim.checkers import SAFETY_CHECKS, CheckResult, Observations, run_checks
from sim.cpu import Core, MeteredCache, MeteredKey
from sim.network import Latency, LinkRule, Network
from sim.scenario import LINK_FAULTS, FaultSpec, Scenario
from sim.topology import Topology
from sim.trace import Trace
from sim.workload import PlannedPayment, genesis_accounts, plan_payments

TICK_US = 5_000
SIGNATURE_CACHE_ENTRIES = 1 << 18
MINIMUM_DRAIN_US = 30_000_000
CONVERGENCE_CHECK_US = 50_000
FRAME_LABELS_KEPT = 4096

# Messages a paused replica's host buffers for it (as a kernel's socket buffers would).
PAUSED_INBOX_LIMIT = 100_000
# Observations of a replica after a wiped restart are kept apart from its earlier life.
INCARNATION_STRIDE = 1000
# Views whose NEW-VIEW plan is kept per replica life for check_new_view_kept.
NEW_VIEW_PLANS_KEPT = 8
# Each replica's history keeps this many seqs (far more than a shipped scenario executes).
SIM_HISTORY_RETENTION_SEQS = 100_000
# CPU model: messages waiting for one node's core; beyond it they are dropped and counted
# (as a full socket buffer would drop them).
CORE_QUEUE_LIMIT = 100_000

# --- what the event queue holds -----------------------------------------------------------
# The queue orders entries by (time, order scheduled); the event itself is never compared.
# NamedTuples: immutable and as cheap to build as the loose tuples they replace.


class Deliver(NamedTuple):
    """A message arrives; `copy` 1 delivers to the second copy of a twinned replica."""

    source: Principal
    destination: Principal
    data: bytes
    copy: int = 0


class TickDue(NamedTuple):
    node: Principal


class SubmitPayment(NamedTuple):
    payment: PlannedPayment


class StartFault(NamedTuple):
    fault: FaultSpec
    index: int  # in the scenario's fault list; names the link rule it adds


class HealPartition(NamedTuple):
    """A partition with an `until_ms` ends."""


class EndLinkRule(NamedTuple):
    rule_id: int


class EndPause(NamedTuple):
    replica: int


class EndClockSkew(NamedTuple):
    replica: int


class HealAll(NamedTuple):
    """The liveness phase begins."""


class CoreDone(NamedTuple):
    """CPU model: the message at the head of a node's queue has been handled."""

    core: tuple[str, int, int]  # role, id, copy


class EndCut(NamedTuple):
    """A cut with an `until_ms` ends: its links carry messages again."""

    index: int


SimEvent = (
    Deliver
    | TickDue
    | CoreDone
    | EndCut
    | SubmitPayment
    | StartFault
    | HealPartition
    | EndLinkRule
    | EndPause
    | EndClockSkew
    | HealAll
)


@dataclass
class ReplicaNode:
    replica_id: int
    key: SigningKey
    storage: dict[tuple[str | int, ...], bytes]
    behavior: Behavior | None
    core: Replica | None = None
    retired_drops: Counter[str] = field(default_factory=Counter)
    paused: bool = False
    inbox: list[tuple[Principal, bytes]] = field(default_factory=list)
    # The replica's clock: clock_anchor_ms at clock_anchor_us, running clock_factor times
    # as fast as simulated time since then (clock skew).
    clock_factor: float = 1.0
    clock_anchor_us: int = 0
    clock_anchor_ms: int = 0
    incarnation: int = 0
    # 0, or 1 for the second copy of a twinned replica (same id, same key, own state).
    copy: int = 0
    # Where its broadcasts go (pbft.host.peers_of), and the simulation as its host; both
    # set when it joins a simulation.
    peers: tuple[Principal, ...] = ()
    host: _ReplicaHost | None = None
    # What lookups read: in memory, kept across a crash like `storage` (the runtime's is
    # a file), fed from every Executed (pbft/history.py).
    history: MemoryHistoryStore = field(
        default_factory=lambda: MemoryHistoryStore(SIM_HISTORY_RETENTION_SEQS)
    )

    @property
    def name(self) -> str:
        return f"r{self.replica_id}" + ("'" if self.copy else "")

    def clock_ms(self, now_us: int) -> int:
        elapsed_us = now_us - self.clock_anchor_us
        if self.clock_factor == 1.0:
            return self.clock_anchor_ms + elapsed_us // 1000
        return self.clock_anchor_ms + int(elapsed_us * self.clock_factor / 1000)

    def set_clock_factor(self, now_us: int, factor: float) -> None:
        self.clock_anchor_ms = self.clock_ms(now_us)
        self.clock_anchor_us = now_us
        self.clock_factor = factor

    @property
    def observer_id(self) -> int:
        return self.replica_id + INCARNATION_STRIDE * self.incarnation


class _ReplicaHost:
    """The simulation as one replica's host: its disk is a dict, its network the simulated
    one (pbft.host.SyncHost)."""

    __slots__ = ("node", "simulation")

    def __init__(self, simulation: Simulation, node: ReplicaNode) -> None:
        self.simulation = simulation
        self.node = node

    def persist(self, records: Sequence[Persist]) -> None:
        write_records(self.node.storage, records)
        cores = self.simulation.cores
        if cores is not None:
            # One durable write per step, as the runtime's store commits them (one fsync).
            cores[("replica", self.node.replica_id, self.node.copy)].persists += 1
        if self.simulation.trace.writing:
            self.simulation._annotate_records(self.node, records)

    def send(self, message: Outgoing) -> None:
        self.simulation._send_from(self.node, message)

    def executed(self, executed: Executed) -> None:
        self.simulation._executed(self.node, executed)

    def note(self, note: Note) -> None:
        self.simulation._note(self.node, note)


class _ClientHost:
    """The simulation as one client's host (pbft.host.ClientHost)."""

    __slots__ = ("client", "simulation")

    def __init__(self, simulation: Simulation, client: int) -> None:
        self.simulation = simulation
        self.client = client

    def send(self, message: Outgoing) -> None:
        for destination in message.to:
            self.simulation._transmit(("client", self.client), destination, message.data)

    def decided(self, decided: Decided) -> None:
        self.simulation._decided(self.client, decided)

    def balance_read(self, read: BalanceRead) -> None:
        # The simulated workload reads no balances; a read that comes anyway is kept.
        self.simulation.balance_reads[(self.client, read.query_id)] = read

    def looked_up(self, result: LookupResult) -> None:
        # Kept like balance reads: the shipped workloads issue no lookups.
        self.simulation.lookups[(self.client, result.query_id)] = result

    def replica_status(self, status: ReplicaStatus) -> None:
        pass  # the simulated clients ask no replica for its status


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
    # Where each correct replica that is up ended: "r0" -> (last executed, ledger digest hex)
    final_states: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """Every correct replica that is up ended at the same sequence with the same state."""
        return len(dict.fromkeys(self.final_states.values())) <= 1

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
            "replicas": {
                "converged": self.converged,
                "final": {
                    name: {"last_executed": seq, "ledger_digest": digest[:16]}
                    for name, (seq, digest) in self.final_states.items()
                },
            },
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
        max_clock_skew_ms=cluster.max_clock_skew_ms,
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
        # frame -> "TYPE hash" as the trace names it in deliveries (bounded: cleared when full)
        self._frame_labels: dict[bytes, str] = {}
        self._queue: list[tuple[int, int, SimEvent]] = []
        self._order = 0
        network = scenario.network
        latency = network.latency
        self.network = Network(
            self.rng,
            Latency(latency.distribution, latency.min_ms, latency.max_ms, latency.mean_ms),
            network.drop,
            network.duplicate,
            Topology(network.topology) if network.topology is not None else None,
        )
        # CPU model: (role, id, copy) -> that node's core; None without the model.
        self.cpu = scenario.cluster.cpu
        self.cores: dict[tuple[str, int, int], Core] | None = {} if self.cpu is not None else None
        self.per_message_us = int(round(self.cpu.per_message_us)) if self.cpu else 0
        self.machine: list[int] | None = (
            [0] * self.cpu.cores if self.cpu is not None and self.cpu.cores else None
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
        byzantine = {
            entry.replica: entry for entry in scenario.byzantine if entry.replica is not None
        }
        self.adversary = Adversary.for_cluster(self.config.replica_count, frozenset(byzantine))
        # Every replica knows the genesis ledger; a Byzantine one may cite it (view changes).
        genesis_ledger_digest = Ledger(
            self.accounts, self.config.dedup_window, self.config.ledger_limits()
        ).digest()
        self.replicas: list[ReplicaNode] = []
        # Twins: a second copy of a replica (same key) in another part of the network.
        self.twin_nodes: dict[int, ReplicaNode] = {}
        twin_groups: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        for replica, key in enumerate(replica_keys):
            entry = byzantine.get(replica)
            behavior = (
                build_behavior(
                    entry.behavior,
                    replica,
                    key,
                    self.adversary,
                    config=self.config,
                    params=entry.params,
                    at_ms=entry.at_ms,
                    until_ms=entry.until_ms,
                    genesis_ledger_digest=genesis_ledger_digest,
                    keyring=self.keyring,
                )
                if entry is not None and entry.behavior != "twin"
                else None
            )
            node = ReplicaNode(replica, self._metered(("replica", replica, 0), key), {}, behavior)
            node.peers = peers_of(replica, self.config.replica_ids())
            node.host = _ReplicaHost(self, node)
            node.core = self._boot(node)
            self.replicas.append(node)
            if entry is not None and entry.behavior == "twin" and entry.groups is not None:
                first, second = entry.groups
                twin_groups[replica] = (frozenset(first), frozenset(second))
        for replica in twin_groups:
            twin = ReplicaNode(
                replica,
                self._metered(("replica", replica, 1), replica_keys[replica]),
                {},
                None,
                copy=1,
            )
            twin.peers = peers_of(replica, self.config.replica_ids())
            twin.host = _ReplicaHost(self, twin)
            twin.core = self._boot(twin)
            self.twin_nodes[replica] = twin
        self.twins = Twins(twin_groups) if twin_groups else None
        # The genesis hash every correct replica names in its replies; receipts carry it.
        self.cluster_id = compute_cluster_id(self.config, self.keyring, self.accounts)
        self.clients = [
            ClientCore(
                client,
                self.config,
                self._metered(("client", client, 0), key),
                self.keyring,
                cache=self._cache_of(("client", client, 0)),
                cluster_id=self.cluster_id,
            )
            for client, key in enumerate(client_keys)
        ]
        self.client_hosts = [_ClientHost(self, client) for client in range(len(self.clients))]
        # Byzantine clients: the same client core, its actions rewritten.
        self.client_behaviors: dict[int, ClientBehavior] = {
            entry.client: build_client_behavior(
                entry.behavior,
                entry.client,
                client_keys[entry.client],
                config=self.config,
                accounts=self.accounts,
                params=entry.params,
                at_ms=entry.at_ms,
                until_ms=entry.until_ms,
            )
            for entry in scenario.byzantine
            if entry.is_client and entry.client is not None
        }
        self.observed = Observations(
            correct=frozenset(
                replica for replica in self.config.replica_ids() if replica not in byzantine
            ),
            initial_total=genesis_total(self.accounts),
            byzantine_clients=frozenset(self.client_behaviors),
        )
        self.decided_at_us: dict[tuple[int, int], int] = {}
        # The message a replica is handling, so a drop it notes can say which (trace file).
        self._handling: tuple[Principal, bytes] | None = None
        # (client, query id) -> the balance it read (the workload asks none today)
        self.balance_reads: dict[tuple[int, int], BalanceRead] = {}
        self.lookups: dict[tuple[int, int], LookupResult] = {}
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
            mix=workload.mix,
            expires_in_ms=workload.expires_in_ms,
            wrong_ref=workload.wrong_ref,
        )

    def _metered(self, name: tuple[str, int, int], key: SigningKey) -> SigningKey:
        """With the CPU model: the node's core, and the key that counts its signatures."""
        if self.cores is None or self.cpu is None:
            return key
        metered = MeteredKey(key)
        self.cores[name] = Core(
            metered,
            MeteredCache(self.signature_cache),
            self.cpu.sign_us,
            self.cpu.verify_us,
            self.machine,
            self.cpu.fsync_us,
            self.cpu.per_request_us,
        )
        return metered

    def _cache_of(self, name: tuple[str, int, int]) -> VerificationCache:
        if self.cores is None:
            return self.signature_cache
        return self.cores[name].cache

    def _boot(self, node: ReplicaNode) -> Replica:
        replica = Replica(
            node.replica_id,
            self.config,
            node.key,
            self.keyring,
            self.accounts,
            records=dict(node.storage) if node.storage else None,
            cache=self._cache_of(("replica", node.replica_id, node.copy)),
            history=node.history,
        )
        # Recovery re-executed from the checkpoint: those rows again (idempotent).
        for executed in replica.recovered_executions:
            node.history.record(executed)
        return replica

    # --- the event loop -----------------------------------------------------------------

    def _schedule(self, at_us: int, event: SimEvent) -> None:
        self._order += 1
        heapq.heappush(self._queue, (at_us, self._order, event))

    def run(self) -> SimulationResult:
        replica_count = self.config.replica_count
        for index in range(replica_count):
            self._schedule(TICK_US * index // replica_count, TickDue(("replica", index)))
        for index in range(len(self.clients)):
            self._schedule(TICK_US * index // max(1, len(self.clients)), TickDue(("client", index)))
        for payment in self.payments:
            self._schedule(payment.at_us, SubmitPayment(payment))
        for index, fault in enumerate(self.scenario.faults):
            self._schedule(fault.at_ms * 1000, StartFault(fault, index))
        liveness = self.scenario.liveness
        if liveness is not None:
            self._schedule(liveness.heal_all_at_ms * 1000, HealAll())
        last_submit_us = self.payments[-1].at_us if self.payments else 0
        if self.trace.writing:
            self._annotate_settings()
        last_fault_us = max(
            (
                max(fault.at_ms, fault.until_ms or 0) * 1000
                for fault in self.scenario.faults
                if liveness is None or fault.at_ms < liveness.heal_all_at_ms
            ),
            default=0,
        )
        timeout_us = self.config.view_change_timeout_ms * 1000
        if self.scenario.expect.deadline_ms:
            deadline_us = self.scenario.expect.deadline_ms * 1000
        elif liveness is not None:
            deadline_us = (
                max(last_submit_us, liveness.heal_all_at_ms * 1000) + liveness.within_ms * 1000
            )
        else:
            deadline_us = max(last_submit_us, last_fault_us) + max(
                MINIMUM_DRAIN_US, 40 * timeout_us
            )
        settle_us = 2 * timeout_us + 500_000
        stop_us: int | None = None
        next_convergence_check_us = 0
        total = len(self.payments)
        while self._queue:
            at_us, _, event = heapq.heappop(self._queue)
            if at_us > deadline_us:
                break
            if stop_us is not None and at_us > stop_us:
                if self._converged():
                    break
                # Work still in flight at the stop (a late view change, a Byzantine client's
                # requests): a replica caught mid-execution is not left behind. Run on in
                # small steps until they agree; one that never catches up meets the deadline.
                stop_us = at_us + CONVERGENCE_CHECK_US
            self.now_us = at_us
            self._dispatch(event)
            if (
                stop_us is None
                and at_us >= next_convergence_check_us
                and len(self.decided_at_us) == total
                and at_us >= max(last_submit_us, last_fault_us)
            ):
                # Everything is decided and the faults are over: run on until the correct
                # replicas converge (or the deadline), then a little longer.
                next_convergence_check_us = at_us + CONVERGENCE_CHECK_US
                if self._converged():
                    stop_us = at_us + settle_us
        return self._result()

    def _dispatch(self, event: SimEvent) -> None:
        # The two events nearly every step is (checked by type before the general match).
        kind = type(event)
        if kind is Deliver:
            if self.cores is None:
                self._deliver(*cast(Deliver, event))
            else:
                self._arrive(cast(Deliver, event))
            return
        if kind is TickDue:
            self._tick(cast(TickDue, event).node)
            return
        if kind is CoreDone:
            self._core_done(cast(CoreDone, event).core)
            return
        match event:
            case Deliver(source, destination, data, copy):
                self._deliver(source, destination, data, copy)
            case TickDue(node):
                self._tick(node)
            case SubmitPayment(payment):
                self._submit(payment)
            case StartFault(fault, index):
                self._fault(fault, index)
            case HealPartition():
                self.network.heal()
                self.trace.record(self.now_us, "heal", "network")
            case EndLinkRule(rule_id):
                self.network.remove_rule(rule_id)
                self.trace.record(self.now_us, "fault_end", "network", f"rule {rule_id}")
            case EndPause(replica):
                self._resume(self.replicas[replica])
                if replica in self.twin_nodes:
                    self._resume(self.twin_nodes[replica])
            case EndClockSkew(replica):
                self.replicas[replica].set_clock_factor(self.now_us, 1.0)
                if replica in self.twin_nodes:
                    self.twin_nodes[replica].set_clock_factor(self.now_us, 1.0)
                self.trace.record(self.now_us, "fault_end", f"r{replica}", "clock_skew")
            case HealAll():
                self._heal_all()
            case EndCut(index):
                links = self.scenario.faults[index].links
                if self.network.topology is not None and links is not None:
                    self.network.topology.restore(links)
                self.trace.record(self.now_us, "fault_end", "network", f"cut {index}")

    # --- the CPU model (sim/cpu.py) -----------------------------------------------------

    def _arrive(self, event: Deliver) -> None:
        """A message reaches a node's host: it waits for the node's core."""
        source, destination, data, copy = event
        name = (destination[0], destination[1], copy)
        assert self.cores is not None
        core = self.cores[name]
        if len(core.queue) >= CORE_QUEUE_LIMIT:
            self.network.dropped["core_queue_overflow"] += 1
            self._trace_lost(source, destination, data, "core_queue_overflow")
            return
        core.queue.append(event)
        if not core.serving:
            core.serving = True
            self._serve_next(name, core)

    def _serve_next(self, name: tuple[str, int, int], core: Core) -> None:
        core.charge(self.now_us)
        core.occupy(self.now_us, self.per_message_us)
        self._schedule(core.free_at_us, CoreDone(name))

    def _core_done(self, name: tuple[str, int, int]) -> None:
        assert self.cores is not None
        core = self.cores[name]
        if core.queue:
            core.messages += 1
            self._deliver(*core.queue.popleft())
            core.charge(self.now_us)
        if core.queue:
            self._serve_next(name, core)
        else:
            core.serving = False

    def _charge(self, name: tuple[str, int, int]) -> int:
        """When what the node sends now can leave: after the work it has done so far."""
        assert self.cores is not None
        return self.cores[name].charge(self.now_us)

    def _converged(self) -> bool:
        ends = {
            node.core.last_executed: None
            for node in self.replicas
            if node.core is not None
            and not node.paused
            and node.replica_id in self.observed.correct
        }
        return len(ends) <= 1

    def _deliver(
        self, source: Principal, destination: Principal, data: bytes, copy: int = 0
    ) -> None:
        role, index = destination
        # A broadcast's frame arrives at every replica: name and hash it once.
        label = self._frame_labels.get(data) if type(data) is bytes else None
        if label is None:
            label = f"{_message_type_name(data)} {hashlib.sha256(data).hexdigest()[:16]}"
            if type(data) is bytes:
                if len(self._frame_labels) >= FRAME_LABELS_KEPT:
                    self._frame_labels.clear()
                self._frame_labels[data] = label
        self.trace.record(
            self.now_us,
            "deliver",
            _node_name(destination) + ("'" if copy else ""),
            f"{_node_name(source)} {label}",
            _message_fields(source, data) if self.trace.writing else None,
        )
        if role == "replica":
            node = self.replicas[index] if copy == 0 else self.twin_nodes[index]
            if node.core is None:
                self.network.dropped["destination_down"] += 1
                self._trace_lost(source, destination, data, "destination_down")
                return
            if node.paused:
                if len(node.inbox) >= PAUSED_INBOX_LIMIT:
                    self.network.dropped["destination_paused_overflow"] += 1
                    self._trace_lost(source, destination, data, "destination_paused_overflow")
                else:
                    node.inbox.append((source, data))
                return
            self._step_message(node, source, data)
        else:
            self._client_actions(index, self.clients[index].handle(MessageReceived(data)))

    def _tick(self, node: Principal) -> None:
        role, index = node
        now_ms = self.now_us // 1000
        if role == "replica":
            replica = self.replicas[index]
            if replica.core is not None and not replica.paused:
                self._step(replica, Tick(replica.clock_ms(self.now_us)))
            twin = self.twin_nodes.get(index)
            if twin is not None and twin.core is not None and not twin.paused:
                self._step(twin, Tick(twin.clock_ms(self.now_us)))
                if self.cores is not None:
                    self._charge((role, index, 1))
        else:
            self._client_actions(index, self.clients[index].handle(Tick(now_ms)))
        if self.cores is not None:
            # A timer's work (retransmissions, a proposal) keeps the core busy too.
            self._charge((role, index, 0))
        self._schedule(self.now_us + TICK_US, TickDue(node))

    def _submit(self, payment: PlannedPayment) -> None:
        client = self.clients[payment.client_id]
        identity = (payment.client_id, payment.request_id)
        operation = Operation(
            payment.op,
            payment.payer,
            payment.payee,
            payment.amount,
            payment.ref_client,
            payment.ref_request,
            payment.expires_in_ms,
        )
        actions = client.submit_operation(payment.request_id, operation)
        self.observed.submitted[identity] = client.outstanding[payment.request_id].digest
        self.submitted_at_us[identity] = self.now_us
        detail = f"{payment.request_id} {payment.payer}>{payment.payee} {payment.amount}"
        if payment.op != "transfer":
            # A transfer's line is as it always was (the trace hashes of transfer-only runs).
            detail = (
                f"{detail} {payment.op} ref {payment.ref_client}:{payment.ref_request} "
                f"expires {payment.expires_in_ms}"
            )
        self.trace.record(
            self.now_us,
            "submit",
            f"c{payment.client_id}",
            detail,
            {"payment": f"{payment.client_id}:{payment.request_id}"},
        )
        self._client_actions(payment.client_id, actions)
        if self.cores is not None:
            self._charge(("client", payment.client_id, 0))

    def _fault(self, fault: FaultSpec, index: int) -> None:
        liveness = self.scenario.liveness
        if liveness is not None and fault.at_ms >= liveness.heal_all_at_ms:
            # The liveness phase has begun: no fault starts any more.
            self.trace.record(self.now_us, "fault_skipped", "network", fault.action)
            return
        twin = self.twin_nodes.get(fault.replica) if fault.replica is not None else None
        if twin is not None:
            self._twin_fault(twin, fault)
        detail = fault.action
        node = self.replicas[fault.replica] if fault.replica is not None else None
        if fault.action == "crash" and node is not None:
            self._crash(node)
            detail = f"crash r{node.replica_id}"
        elif fault.action == "restart" and node is not None:
            if fault.wipe:
                # Lost disk: it comes back with nothing and must rejoin by catch-up alone.
                self._crash(node)
                node.storage.clear()
                node.history = MemoryHistoryStore(SIM_HISTORY_RETENTION_SEQS)
                node.incarnation += 1
            if node.core is None:
                node.core = self._boot(node)
            detail = f"restart r{node.replica_id}{' wiped' if fault.wipe else ''}"
        elif fault.action == "partition" and fault.groups is not None:
            one_way = fault.direction == "one-way"
            self.network.partition(fault.groups, self.config.replica_count, one_way)
            detail = f"partition {[list(group) for group in fault.groups]} {fault.direction}"
            if fault.until_ms is not None:
                self._schedule(fault.until_ms * 1000, HealPartition())
        elif fault.action == "heal":
            self.network.heal()
        elif fault.action in LINK_FAULTS:
            latency = fault.latency
            rule = LinkRule(
                rule_id=index,
                action=fault.action,
                sources=fault.sources,
                destinations=fault.destinations,
                messages=fault.messages,
                probability=fault.probability if fault.probability is not None else 1.0,
                add_ms=fault.add_ms or 0.0,
                latency=(
                    Latency(latency.distribution, latency.min_ms, latency.max_ms, latency.mean_ms)
                    if latency is not None
                    else None
                ),
                window_ms=fault.window_ms or 0.0,
            )
            self.network.add_rule(rule)
            detail = f"{fault.action} rule {index}"
            if fault.until_ms is not None:
                self._schedule(fault.until_ms * 1000, EndLinkRule(index))
        elif fault.action == "pause" and node is not None:
            node.paused = True
            detail = f"pause r{node.replica_id}"
            if fault.until_ms is not None:
                self._schedule(fault.until_ms * 1000, EndPause(node.replica_id))
        elif fault.action == "resume" and node is not None:
            self._resume(node)
            return
        elif fault.action == "cut" and fault.links is not None:
            if self.network.topology is not None:
                self.network.topology.cut(fault.links)
            detail = f"cut {index} {' '.join(f'{a}-{b}' for a, b in fault.links)}"
            if fault.until_ms is not None:
                self._schedule(fault.until_ms * 1000, EndCut(index))
        elif fault.action == "clock_skew" and node is not None and fault.factor is not None:
            node.set_clock_factor(self.now_us, fault.factor)
            detail = f"clock_skew r{node.replica_id} x{fault.factor}"
            if fault.until_ms is not None:
                self._schedule(fault.until_ms * 1000, EndClockSkew(node.replica_id))
        self.trace.record(self.now_us, "fault", "network", detail)

    def _twin_fault(self, twin: ReplicaNode, fault: FaultSpec) -> None:
        """A fault that names a twinned replica strikes its second copy as well."""
        if fault.action == "crash":
            self._crash(twin)
        elif fault.action == "restart":
            if fault.wipe:
                self._crash(twin)
                twin.storage.clear()
                twin.history = MemoryHistoryStore(SIM_HISTORY_RETENTION_SEQS)
                twin.incarnation += 1
            if twin.core is None:
                twin.core = self._boot(twin)
        elif fault.action == "pause":
            twin.paused = True
        elif fault.action == "resume":
            self._resume(twin)
        elif fault.action == "clock_skew" and fault.factor is not None:
            twin.set_clock_factor(self.now_us, fault.factor)

    def _crash(self, node: ReplicaNode) -> None:
        if node.core is not None:
            node.retired_drops.update(node.core.drops)
            self.retired_view = max(self.retired_view, node.core.view)
            node.core = None
        # What its host had buffered dies with it.
        node.inbox.clear()
        node.paused = False
        if self.cores is not None:
            self.cores[("replica", node.replica_id, node.copy)].queue.clear()

    def _resume(self, node: ReplicaNode) -> None:
        if not node.paused:
            return
        node.paused = False
        self.trace.record(self.now_us, "resume", node.name, f"{len(node.inbox)}")
        inbox, node.inbox = node.inbox, []
        for source, data in inbox:
            if node.core is None or node.paused:
                break
            self._step_message(node, source, data)

    def _heal_all(self) -> None:
        """The liveness phase: every fault stops and the network becomes synchronous."""
        self.network.make_synchronous()
        for node in [*self.replicas, *self.twin_nodes.values()]:
            node.set_clock_factor(self.now_us, 1.0)
            self._resume(node)
            if node.core is None:
                node.core = self._boot(node)
        self.trace.record(self.now_us, "heal_all", "network")

    # --- carrying out actions -----------------------------------------------------------

    def _transmit(
        self, source: Principal, destination: Principal, data: bytes, copy: int = 0
    ) -> None:
        if self.twins is None and (
            source[0] != "replica" or self.replicas[source[1]].behavior is None
        ):
            # The common case, one payload to one receiver: what the general path below
            # does then, without its lists and loops.
            delays_us = self.network.route(source, destination, _message_type_name(data))
            if not delays_us:
                self._trace_lost(source, destination, data, self.network.last_drop_reason)
            # With the CPU model a message leaves when the work that made it is done.
            sent_us = self.now_us if self.cores is None else self._charge((*source, copy))
            for delay_us in delays_us:
                self._schedule(sent_us + delay_us, Deliver(source, destination, data, 0))
            return
        payloads = [data]
        if source[0] == "replica":
            behavior = self.replicas[source[1]].behavior
            if behavior is not None:
                payloads = behavior.outgoing(destination, data, self.now_us // 1000)
                if not payloads:
                    self.withheld += 1
                    self._trace_lost(source, destination, data, "byzantine_withheld")
        receivers = (0,) if self.twins is None else self.twins.receivers(source, copy, destination)
        if not receivers:
            # A copy of a twin and a replica on the other side of its split.
            self.network.dropped["twin_split"] += len(payloads)
            for payload in payloads:
                self._trace_lost(source, destination, payload, "twin_split")
            return
        sent_us = self.now_us if self.cores is None else self._charge((*source, copy))
        for payload in payloads:
            message_type = _message_type_name(payload)
            for receiver in receivers:
                delays_us = self.network.route(source, destination, message_type)
                if not delays_us:
                    self._trace_lost(source, destination, payload, self.network.last_drop_reason)
                for delay_us in delays_us:
                    self._schedule(
                        sent_us + delay_us, Deliver(source, destination, payload, receiver)
                    )

    def _transmit_from(self, node: ReplicaNode, destination: Principal, data: bytes) -> None:
        source: Principal = ("replica", node.replica_id)
        if node.copy:
            self._transmit(source, destination, data, copy=node.copy)
        else:
            self._transmit(source, destination, data)

    def _trace_lost(self, source: Principal, destination: Principal, data: bytes, why: str) -> None:
        self.trace.record(
            self.now_us,
            "lost",
            _node_name(destination),
            f"{_node_name(source)} {_message_type_name(data)} {why}",
            {**_message_fields(source, data), "reason": why} if self.trace.writing else None,
        )

    def _step(self, node: ReplicaNode, event: Event) -> None:
        """One event through the host loop (pbft/host.py); a crashed replica takes none."""
        if node.core is not None and node.host is not None:
            carry_out(step(node.core, (event,), node.peers), node.host)

    def _step_message(self, node: ReplicaNode, source: Principal, data: bytes) -> None:
        if not self.trace.writing:
            self._step(node, MessageReceived(data, source))
            return
        self._handling = (source, data)
        try:
            self._step(node, MessageReceived(data, source))
        finally:
            self._handling = None

    def _send_from(self, node: ReplicaNode, message: Outgoing) -> None:
        # Only broadcasts carry PREPAREs today; each frame is checked once, not per peer.
        code = type_code_of(message.data)
        if code == MessageType.PREPARE:
            self._check_prepare_against_new_view(node, message.data)
        elif code == MessageType.PRE_PREPARE and self.trace.writing:
            self._annotate_proposal(node, message.data)
        for destination in message.to:
            self._transmit_from(node, destination, message.data)

    def _executed(self, node: ReplicaNode, executed: Executed) -> None:
        if self.cores is not None:
            self.cores[("replica", node.replica_id, node.copy)].requests += len(executed.requests)
        self._record_execution(node.observer_id, executed)
        node.history.record(executed)
        self.trace.record(
            self.now_us,
            "execute",
            node.name,
            f"{executed.seq} {executed.entry_digest.hex()[:16]} {len(executed.requests)}",
            execute_fields(executed) if self.trace.writing else None,
        )

    def _note(self, node: ReplicaNode, note: Note) -> None:
        if note.kind == "new_view":
            self._record_new_view_plan(node)
        self.trace.record(
            self.now_us,
            note.kind,
            node.name,
            note.detail,
            self._note_fields(node, note) if self.trace.writing else None,
        )

    # --- what only the trace file shows (for `pbft explain`; never hashed) ---------------

    def _note_fields(self, node: ReplicaNode, note: Note) -> dict[str, object]:
        fields: dict[str, object] = {}
        core = node.core
        if core is not None:
            fields["view_now"] = core.view
            fields["primary_now"] = self.config.primary_of(core.view)
        if note.reason:
            fields["reason"] = note.reason
        if note.kind == "drop" and self._handling is not None:
            source, data = self._handling
            fields["message"] = _message_fields(source, data)
        elif note.kind == "new_view" and core is not None and core.new_view_message is not None:
            fields.update(new_view_fields(core.new_view_message))
        return fields

    def _annotate_settings(self) -> None:
        self.trace.annotate(
            0,
            "settings",
            "sim",
            self.scenario.name,
            {
                "scenario": self.scenario.name,
                "seed": self.seed,
                **settings_fields(self.config),
                "byzantine": sorted(
                    f"r{entry.replica}" if entry.replica is not None else f"c{entry.client}"
                    for entry in self.scenario.byzantine
                ),
            },
        )

    def _annotate_proposal(self, node: ReplicaNode, data: bytes) -> None:
        event = proposal_event(data)
        if event is not None:
            self.trace.annotate(self.now_us, "propose", node.name, *event)

    def _annotate_records(self, node: ReplicaNode, records: Sequence[Persist]) -> None:
        for kind, detail, fields in certificate_events(records):
            self.trace.annotate(self.now_us, kind, node.name, detail, fields)

    def _record_new_view_plan(self, node: ReplicaNode) -> None:
        """What the NEW-VIEW this replica just installed assigned (for check_new_view_kept)."""
        if node.core is None or node.core.new_view_message is None:
            return
        message = peek(node.core.new_view_message)[1]
        if not isinstance(message, NewView):
            return
        plan: dict[int, bytes] = {}
        for raw in message.pre_prepares:
            proposal = peek(raw)[1]
            if isinstance(proposal, PrePrepare):
                plan[proposal.seq] = entry_digest(
                    proposal.seq, proposal.prev_hash, proposal.batch_digest, proposal.timestamp_ms
                )
        plans = self.observed.new_view_plans.setdefault(node.observer_id, {})
        plans[message.view] = plan
        # Bounded: only recent views can still see PREPAREs.
        for view in [view for view in plans if view < message.view - NEW_VIEW_PLANS_KEPT]:
            del plans[view]

    def _check_prepare_against_new_view(self, node: ReplicaNode, data: bytes) -> None:
        plans = self.observed.new_view_plans.get(node.observer_id)
        if not plans:
            return
        prepare = peek(data)[1]
        if not isinstance(prepare, Prepare):
            return
        assigned = plans.get(prepare.view, {}).get(prepare.seq)
        if assigned is not None and assigned != prepare.entry_digest:
            self.observed.new_view_breaches.append(
                (node.observer_id, prepare.view, prepare.seq, assigned, prepare.entry_digest)
            )

    def _record_execution(self, replica: int, executed: Executed) -> None:
        entries = self.observed.executed_entries.setdefault(replica, {})
        earlier = entries.get(executed.seq)
        if earlier is not None and earlier != executed.entry_digest:
            self.observed.self_conflicts.append(
                (replica, executed.seq, earlier, executed.entry_digest)
            )
        entries[executed.seq] = executed.entry_digest
        self.observed.executed_batches.setdefault(replica, {}).setdefault(executed.seq, executed)
        requests = self.observed.executed_requests.setdefault(replica, {})
        for record in executed.requests:
            requests.setdefault((record.client_id, record.request_id), []).append(
                (executed.seq, record)
            )

    def _client_actions(self, client: int, actions: list[ClientAction]) -> None:
        behavior = self.client_behaviors.get(client)
        if behavior is not None:
            actions = behavior.actions(actions, self.now_us // 1000)
        carry_out_client(actions, self.client_hosts[client])

    def _decided(self, client: int, decided: Decided) -> None:
        identity = (decided.client_id, decided.request_id)
        self.observed.decided[identity] = decided
        self.decided_at_us[identity] = self.now_us
        self.trace.record(
            self.now_us,
            "decided",
            f"c{client}",
            f"{decided.request_id} {decided.outcome} {decided.reason} seq {decided.seq}",
            {
                "payment": f"{decided.client_id}:{decided.request_id}",
                "seq": decided.seq,
                "outcome": decided.outcome,
                "reason": decided.reason,
            },
        )

    # --- the result ---------------------------------------------------------------------

    def _result(self) -> SimulationResult:
        byzantine = {
            entry.replica: None for entry in self.scenario.byzantine if entry.replica is not None
        }
        # Every life of a correct replica is checked; a wiped restart starts a new one.
        self.observed.correct = frozenset(
            node.replica_id + INCARNATION_STRIDE * incarnation
            for node in self.replicas
            if node.replica_id not in byzantine
            for incarnation in range(node.incarnation + 1)
        )
        for node in self.replicas:
            if node.core is not None and node.replica_id not in byzantine:
                ledger = node.core.ledger
                self.observed.final_ledgers[node.observer_id] = (
                    ledger.total_balance(),
                    ledger.recount_total(),
                    ledger.min_balance(),
                )
        checks = dict(
            run_checks(self.observed, self.keyring, self.cluster_id, self.signature_cache)
        )
        liveness = self.scenario.liveness
        if liveness is not None:
            # After the heal, every payment must be decided within the bound.
            heal_us = liveness.heal_all_at_ms * 1000
            for identity in sorted(self.submitted_at_us):
                limit_us = max(heal_us, self.submitted_at_us[identity]) + liveness.within_ms * 1000
                decided_us = self.decided_at_us.get(identity)
                if decided_us is not None and decided_us > limit_us:
                    late_ms = (decided_us - limit_us) / 1000
                    checks["liveness"].fail(
                        f"payment {identity} decided {late_ms:.1f} ms after the liveness bound"
                    )
        rejected: Counter[str] = Counter()
        confirmed = 0
        for decided in self.observed.decided.values():
            if decided.outcome == "confirmed":
                confirmed += 1
            elif decided.receipt is not None:
                rejected[decided.reason] += 1
        dropped: Counter[str] = Counter(self.network.dropped)
        if self.withheld:
            dropped["byzantine_withheld"] += self.withheld
        views = [self.retired_view]
        for node in [*self.replicas, *self.twin_nodes.values()]:
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
        final_states = {
            f"r{node.replica_id}": (node.core.last_executed, node.core.ledger.digest().hex())
            for node in self.replicas
            if node.core is not None and not node.paused and node.replica_id not in byzantine
        }
        if len(dict.fromkeys(final_states.values())) > 1:
            # TigerBeetle's rule: after the run, the correct replicas that are up must have
            # converged on one state; a replica left behind has not confirmed "together".
            ends = ", ".join(f"{name} at {seq}" for name, (seq, _) in final_states.items())
            checks["liveness"].fail(f"correct replicas did not converge: {ends}")
        if expect.liveness and not checks["liveness"].ok:
            undecided = len(self.payments) - len(self.decided_at_us)
            failures.append(
                f"liveness: {undecided} payments undecided"
                if undecided
                else f"liveness: {checks['liveness'].details[0]}"
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
            undecided=len(self.payments) - confirmed - sum(rejected.values()),
            checks=checks,
            view_changes=max(views),
            messages_sent=self.network.sent,
            messages_dropped=dict(sorted(dropped.items())),
            latency_ms={
                f"p{percent}": nearest_rank(latencies_us, percent) / 1000 if latencies_us else None
                for percent in (50, 95, 99)
            },
            expectation_failures=failures,
            evidence=dict(sorted(evidence.items())),
            final_states=final_states,
        )


def _message_fields(source: Principal, data: bytes) -> dict[str, object]:
    return message_fields(_node_name(source), data)


_NODE_NAMES: dict[Principal, str] = {}


def _node_name(node: Principal) -> str:
    name = _NODE_NAMES.get(node)
    if name is None:
        name = f"{'r' if node[0] == 'replica' else 'c'}{node[1]}"
        # Plain ints only (True == 1 would share r1's entry). A run has few principals; the
        # bound is there all the same.
        if type(node[1]) is int and len(_NODE_NAMES) < 4096:
            _NODE_NAMES[node] = name
    return name


def _message_type_name(data: bytes) -> str:
    """The name of a frame's message type, as the trace and the link rules see it."""
    code = type_code_of(data)
    if code is None:
        # Not a canonical envelope (a Byzantine replica's garbage). The trace has always
        # named whatever byte sits where the type would; keeping that keeps trace hashes.
        code = data[2] if len(data) > 2 else -1
    return _type_name(code)


# No simulated node sends a replica status query or answer (a dashboard's read), so in a
# simulation those codes are only ever the third byte of a Byzantine replica's garbage: they
# keep the name UNKNOWN the trace gave them before the types existed (and the trace hashes
# of the shipped scenarios with them: byzantine-garbage has such frames).
_NOT_SIMULATED = (MessageType.STATUS_QUERY, MessageType.STATUS_ANSWER)
_TYPE_NAMES: dict[int, str] = {
    int(message_type): message_type.name
    for message_type in MessageType
    if message_type not in _NOT_SIMULATED
}


def _type_name(code: int) -> str:
    return _TYPE_NAMES.get(code, "UNKNOWN")


def run_scenario(
    scenario: Scenario, seed: int | None = None, trace_sink: TextIO | None = None
) -> SimulationResult:
    return Simulation(scenario, seed, trace_sink).run()
