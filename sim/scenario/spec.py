"""What a scenario is: the cluster, its network, the workload, the faults, the Byzantine
replicas and clients, and what the run must show (frozen dataclasses), with the names and
limits the loader checks against. Behaviour names, parameters and kinds come from the
adversary's registry (sim/adversary/registry.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from pbft.config import ClusterConfig, fault_tolerance_of
from pbft.messages import MessageType
from sim.adversary import registry
from sim.scenario.values import ValueReader
from sim.workload import TRANSFER_ONLY

# Byzantine behaviours, their parameters (besides replica or client, behavior, at_ms and
# until_ms) and the values of `kind` (the first the default), as the adversary's
# registry (sim/adversary/registry.py) declares them.
BEHAVIORS: Final = tuple(registry.BEHAVIORS)
BEHAVIOR_PARAMETERS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.PARAMETERS for name, cls in registry.BEHAVIORS.items() if cls.PARAMETERS
}
BEHAVIOR_KINDS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.KINDS for name, cls in registry.BEHAVIORS.items() if "kind" in cls.PARAMETERS
}
# Behaviours of a Byzantine client: a [[byzantine]] entry with `client = N` and no `replica`.
CLIENT_BEHAVIORS: Final = tuple(registry.CLIENT_BEHAVIORS)
CLIENT_BEHAVIOR_PARAMETERS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.PARAMETERS for name, cls in registry.CLIENT_BEHAVIORS.items() if cls.PARAMETERS
}
CLIENT_BEHAVIOR_KINDS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.KINDS for name, cls in registry.CLIENT_BEHAVIORS.items() if "kind" in cls.PARAMETERS
}
FAULT_ACTIONS: Final = (
    "crash",
    "restart",
    "partition",
    "heal",
    "delay",
    "drop",
    "duplicate",
    "reorder",
    "pause",
    "resume",
    "clock_skew",
)
# Faults that need a [network.topology] (the fuzzer writes none: it draws no topologies).
TOPOLOGY_FAULT_ACTIONS: Final = ("cut",)
# Network faults: they act on the messages that match their from/to/messages filters.
LINK_FAULTS: Final = ("delay", "drop", "duplicate", "reorder")
# Every message type, by the name pbft.messages gives it (one source).
MESSAGE_TYPE_NAMES: Final = tuple(message_type.name for message_type in MessageType)
LATENCY_DISTRIBUTIONS: Final = ("uniform", "exponential")

MAX_NAME_LENGTH: Final = 100
MAX_SEED: Final = 2**63 - 1
MAX_DURATION_MS: Final = 600_000
# Mirrors pbft.ledger.MAX_TOTAL: the genesis ledger must be able to hold every account's balance.
MAX_TOTAL_BALANCE: Final = 2**64 - 1

MAX_CLOCK_SKEW_FACTOR: Final = 10.0
PARTITION_DIRECTIONS: Final = ("both", "one-way")


@dataclass(frozen=True)
class LatencySpec:
    """One-way message delay.

    ``uniform``: drawn uniformly from [min_ms, max_ms]. ``exponential``: min_ms is a floor
    and mean_ms the mean of the exponential part. In the file ``min`` defaults to 0.
    """

    distribution: str
    min_ms: float
    max_ms: float | None
    mean_ms: float | None


DEFAULT_LATENCY: Final = LatencySpec(distribution="uniform", min_ms=1.0, max_ms=10.0, mean_ms=None)


@dataclass(frozen=True)
class CpuSpec:
    """The CPU cost model (sim/cpu.py): every simulated replica and client is one core, busy
    this long per signature made, per signature checked and per message handled."""

    sign_us: float
    verify_us: float
    per_message_us: float
    # Per request a replica executes (ledger, history row, its reply), beyond the messages
    # that carried it: a batch's requests cost each replica this much each.
    per_request_us: float = 0.0
    # Each durable write (one per step that persists: the runtime's group commit) keeps the
    # replica busy this long; 0: storage is free, as without the model.
    fsync_us: float = 0.0
    # 0: every node has a core of its own. N: the nodes share N cores (one machine, as in
    # `pbft bench`, where every replica and the clients run on this host's cores).
    cores: int = 0


# Above any real machine's figure by far; keeps a typo from stalling a run for hours.
MAX_CPU_COST_US: Final = 1_000_000.0
MAX_CPU_CORES: Final = 1024


@dataclass(frozen=True)
class ClusterSpec:
    replicas: int = 4
    batch_size: int = 32
    checkpoint_interval: int = 16
    view_change_timeout_ms: int = 300
    batch_timeout_ms: int = 5
    heartbeat_interval_ms: int = 50
    retransmit_interval_ms: int = 40
    client_timeout_ms: int = 400
    # 0 means two checkpoint intervals, as in pbft.config.ClusterConfig.
    watermark_window: int = 0
    max_clock_skew_ms: int = ClusterConfig.max_clock_skew_ms
    # None: messages cost no time to handle (the simulator as it always was).
    cpu: CpuSpec | None = None


@dataclass(frozen=True)
class LinkSpec:
    """A link between two regions: one-way latency and the chance it loses a message."""

    a: str
    b: str
    latency_ms: float
    loss: float = 0.0


@dataclass(frozen=True)
class TopologySpec:
    """Regions joined by links (sim/topology.py). A message takes the lowest-latency path
    between its sender's and its receiver's regions; `network.latency_ms` is drawn on top
    (the time inside a region). `replicas[i]` is replica i's region, `clients[c]` client
    c's."""

    regions: tuple[str, ...]
    links: tuple[LinkSpec, ...]
    replicas: tuple[str, ...]
    clients: tuple[str, ...]


MAX_REGIONS: Final = 64


@dataclass(frozen=True)
class NetworkSpec:
    latency: LatencySpec = DEFAULT_LATENCY
    # Per-message probabilities, applied independently to every send.
    drop: float = 0.0
    duplicate: float = 0.0
    topology: TopologySpec | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    clients: int = 4
    accounts: int = 8
    # Integer minor units: money is never a float.
    initial_balance: int = 1000
    payments: int = 200
    # Payments per second over all clients together.
    rate_per_s: float = 100.0
    # Share of payments that ask for more than the payer holds, to exercise rejections.
    overdraw: float = 0.1
    # Operation -> weight (sim.workload.OPERATIONS order, weights > 0 only). Transfers only
    # by default.
    mix: tuple[tuple[str, float], ...] = TRANSFER_ONLY
    # An authorize's hold expires in [min, max] ms, drawn per hold.
    expires_in_ms: tuple[int, int] = (500, 5000)
    # Share of captures, voids and refunds that name a wrong hold or payment (one already
    # closed, or an id nobody used), to exercise their refusals.
    wrong_ref: float = 0.1


@dataclass(frozen=True)
class FaultSpec:
    """One fault injected at simulated time ``at_ms``.

    ``crash``/``restart`` take ``replica``. ``partition`` takes ``groups``: replicas in
    different groups cannot reach each other, and every replica not listed in any group forms
    one more group of its own; with ``until_ms`` the partition heals at that time.
    ``direction = "one-way"`` cuts only messages from an earlier group to a later one (the
    later groups still reach the earlier ones); the default ``"both"`` cuts both ways.
    ``heal`` removes every partition. A restart of a replica that is not crashed is a no-op.
    """

    at_ms: int
    action: str
    replica: int | None = None
    until_ms: int | None = None
    groups: tuple[tuple[int, ...], ...] | None = None
    direction: str = "both"
    # restart: come back with nothing persisted, to rejoin by catch-up alone.
    wipe: bool = False
    # Link faults: which messages they touch. None matches anything. Endpoints are replica
    # ids or "clients"; message types are names such as "PREPARE".
    sources: tuple[int | str, ...] | None = None
    destinations: tuple[int | str, ...] | None = None
    messages: tuple[str, ...] | None = None
    # drop / duplicate: per matching message; reorder: always 1.
    probability: float | None = None
    # delay: a fixed extra delay, or an extra delay drawn from a distribution.
    add_ms: float | None = None
    latency: LatencySpec | None = None
    # reorder: matching messages are held back by up to this long, so they overtake.
    window_ms: float | None = None
    # clock_skew: the replica's clock runs this many times as fast as real time.
    factor: float | None = None
    # cut: the topology's links (pairs of regions) that carry nothing until until_ms.
    links: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class LivenessSpec:
    """From heal_all_at_ms every fault stops and the network is synchronous; every payment
    must then be decided within within_ms (of heal_all_at_ms, or of its submission if later)."""

    heal_all_at_ms: int
    within_ms: int


@dataclass(frozen=True)
class ByzantineSpec:
    """One Byzantine replica: ``behavior`` rewrites its outgoing messages from ``at_ms`` until
    ``until_ms`` (None: to the end); outside that window it behaves correctly.

    Parameters, each for its behaviour only: ``delay_ms`` (slow; None means 0.8 x
    cluster.view_change_timeout_ms), ``client`` (censor, required), ``kind``
    (invalid_batch, bad_sequence, bad_timestamp, lie_in_view_change, bad_new_view; see
    BEHAVIOR_KINDS) and
    ``groups`` (twin, required: the two parts of the network its two copies talk with).

    With ``replica`` None the entry is a Byzantine client: ``client`` is then the client's id
    and ``behavior`` one of CLIENT_BEHAVIORS (``kind``: see CLIENT_BEHAVIOR_KINDS).
    """

    replica: int | None
    behavior: str
    at_ms: int = 0
    until_ms: int | None = None
    delay_ms: int | None = None
    client: int | None = None
    kind: str | None = None
    groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def is_client(self) -> bool:
        """A Byzantine client rather than a Byzantine replica."""
        return self.replica is None

    @property
    def params(self) -> dict[str, int | str]:
        """The behaviour's parameters that are set, by name (groups apart: not a scalar)."""
        client = None if self.is_client else self.client
        values = {"delay_ms": self.delay_ms, "client": client, "kind": self.kind}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class ExpectSpec:
    # True: every safety checker holds. False: the run must find a violation.
    safety: bool = True
    # True: every payment is decided by the end. False: not required.
    liveness: bool = True
    # Simulated time by which everything must be decided; 0 lets the simulator choose.
    deadline_ms: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    cluster: ClusterSpec
    network: NetworkSpec
    workload: WorkloadSpec
    # Sorted by at_ms; faults at the same time keep their order in the file.
    faults: tuple[FaultSpec, ...]
    byzantine: tuple[ByzantineSpec, ...]
    expect: ExpectSpec
    # The file path, or "<string>"; error messages start with it.
    source: str
    liveness: LivenessSpec | None = None

    def with_seed(self, seed: int) -> Scenario:
        """The same scenario under another seed (e.g. from a command-line override)."""
        checked_seed = ValueReader(self.source).integer(seed, "seed", 0, MAX_SEED)
        return dataclasses.replace(self, seed=checked_seed)

    @property
    def fault_tolerance(self) -> int:
        """f: how many Byzantine replicas the cluster is built to survive."""
        return fault_tolerance_of(self.cluster.replicas)
