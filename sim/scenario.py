"""Adversarial scenario files: a cluster, its network, a payment workload, the faults to
inject, the Byzantine replicas and what the run must show, written in TOML.

Validation is strict on purpose: an unknown key, a wrong type or a value out of range raises
ScenarioError naming the field by its dotted path (``cluster.replica``, ``faults[1].until_ms``),
so a typo in a scenario never silently turns it into a different, weaker test.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from pbft.checkpoint_size import checkpoint_size_problem
from pbft.config import (
    MAX_BATCH_SIZE,
    MAX_BATCH_TIMEOUT_MS,
    MAX_CHECKPOINT_INTERVAL,
    MAX_REPLICAS,
    MAX_WATERMARK_WINDOW,
    MIN_REPLICAS,
    ClusterConfig,
    ConfigError,
    fault_tolerance_of,
)
from pbft.messages import MessageType
from sim import byzantine
from sim.workload import genesis_accounts

# Byzantine behaviours, their parameters (besides replica or client, behavior, at_ms and
# until_ms) and the values of `kind` (the first the default), as sim/byzantine.py's
# registry declares them.
BEHAVIORS: Final = tuple(byzantine.BEHAVIORS)
BEHAVIOR_PARAMETERS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.PARAMETERS for name, cls in byzantine.BEHAVIORS.items() if cls.PARAMETERS
}
BEHAVIOR_KINDS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.KINDS for name, cls in byzantine.BEHAVIORS.items() if "kind" in cls.PARAMETERS
}
# Behaviours of a Byzantine client: a [[byzantine]] entry with `client = N` and no `replica`.
CLIENT_BEHAVIORS: Final = tuple(byzantine.CLIENT_BEHAVIORS)
CLIENT_BEHAVIOR_PARAMETERS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.PARAMETERS for name, cls in byzantine.CLIENT_BEHAVIORS.items() if cls.PARAMETERS
}
CLIENT_BEHAVIOR_KINDS: Final[dict[str, tuple[str, ...]]] = {
    name: cls.KINDS for name, cls in byzantine.CLIENT_BEHAVIORS.items() if "kind" in cls.PARAMETERS
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

_TOP_LEVEL_KEYS: Final = (
    "name",
    "description",
    "seed",
    "cluster",
    "network",
    "workload",
    "faults",
    "byzantine",
    "liveness",
    "expect",
)
_CLUSTER_KEYS: Final = (
    "replicas",
    "batch_size",
    "checkpoint_interval",
    "view_change_timeout_ms",
    "batch_timeout_ms",
    "heartbeat_interval_ms",
    "retransmit_interval_ms",
    "client_timeout_ms",
    "watermark_window",
)
_NETWORK_KEYS: Final = ("latency_ms", "drop", "duplicate")
_LATENCY_KEYS: Final = ("dist", "min", "max", "mean")
_WORKLOAD_KEYS: Final = (
    "clients",
    "accounts",
    "initial_balance",
    "payments",
    "rate_per_s",
    "overdraw",
)
_FAULT_KEYS: Final = (
    "at_ms",
    "action",
    "replica",
    "until_ms",
    "groups",
    "direction",
    "wipe",
    "from",
    "to",
    "messages",
    "probability",
    "add_ms",
    "latency_ms",
    "window_ms",
    "factor",
)
_LIVENESS_KEYS: Final = ("heal_all_at_ms", "within_ms")
# Which optional keys each fault action takes; anything else in its table is an error.
_FAULT_ACTION_KEYS: Final = {
    "crash": ("replica",),
    "restart": ("replica", "wipe"),
    "partition": ("groups", "until_ms", "direction"),
    "heal": (),
    "delay": ("from", "to", "messages", "until_ms", "add_ms", "latency_ms"),
    "drop": ("from", "to", "messages", "until_ms", "probability"),
    "duplicate": ("from", "to", "messages", "until_ms", "probability"),
    "reorder": ("from", "to", "messages", "until_ms", "window_ms"),
    "pause": ("replica", "until_ms"),
    "resume": ("replica",),
    "clock_skew": ("replica", "factor", "until_ms"),
}
MAX_CLOCK_SKEW_FACTOR: Final = 10.0
PARTITION_DIRECTIONS: Final = ("both", "one-way")
_BYZANTINE_PARAMETER_KEYS: Final = ("delay_ms", "client", "kind", "groups")
_BYZANTINE_KEYS: Final = ("replica", "behavior", "at_ms", "until_ms", *_BYZANTINE_PARAMETER_KEYS)
_EXPECT_KEYS: Final = ("safety", "liveness", "deadline_ms")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LONGEST_SHOWN_VALUE = 40
_LONGEST_SHOWN_INTEGER_BITS = 128
_LARGEST_FLOAT_INTEGER = int(sys.float_info.max)


class ScenarioError(ValueError):
    """A scenario file cannot be used; ``field`` is the dotted path of the offending value."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        super().__init__(f"{source}: {field}: {problem}")
        self.source = source
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[ScenarioError], tuple[str, str, str]]:
        # The default reduce would call __init__ with the formatted message only (e.g. when a
        # seed sweep sends the error back from a worker process).
        return (type(self), (self.source, self.field, self.problem))


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


_DEFAULT_LATENCY: Final = LatencySpec(distribution="uniform", min_ms=1.0, max_ms=10.0, mean_ms=None)


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


@dataclass(frozen=True)
class NetworkSpec:
    latency: LatencySpec = _DEFAULT_LATENCY
    # Per-message probabilities, applied independently to every send.
    drop: float = 0.0
    duplicate: float = 0.0


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
    (invalid_batch, bad_sequence, lie_in_view_change, bad_new_view; see BEHAVIOR_KINDS) and
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
        checked_seed = _Reader(self.source).integer(seed, "seed", 0, MAX_SEED)
        return dataclasses.replace(self, seed=checked_seed)

    @property
    def fault_tolerance(self) -> int:
        """f: how many Byzantine replicas the cluster is built to survive."""
        return fault_tolerance_of(self.cluster.replicas)


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate the scenario file at ``path``."""
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise ScenarioError(source, "file", f"cannot read: {error.strerror or error}") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ScenarioError(source, "file", f"invalid TOML: not UTF-8 ({error})") from error
    return parse_scenario(text, source)


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    """Parse and validate scenario TOML; ``source`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except ValueError as error:
        # TOMLDecodeError, or int() refusing an integer literal of more than 4300 digits.
        raise ScenarioError(source, "file", f"invalid TOML: {error}") from error
    except RecursionError as error:
        # tomllib recurses once per nesting level of arrays and inline tables.
        raise ScenarioError(source, "file", "invalid TOML: nested too deeply") from error
    return _Reader(source).scenario(document)


def _describe(value: object) -> str:
    """The TOML type of a value plus a short rendering of it, for error messages."""
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list):
        return "an array"
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, datetime.datetime):
        kind = "date-time"
    elif isinstance(value, datetime.date):
        kind = "date"
    elif isinstance(value, datetime.time):
        kind = "time"
    else:
        kind = type(value).__name__
    return f"{kind} {_show(value)}"


def _show(value: object) -> str:
    """A short rendering of a value for an error message."""
    # str() of an int beyond 4300 digits raises, and hex TOML integers can be that long.
    if _is_integer(value) and value.bit_length() > _LONGEST_SHOWN_INTEGER_BITS:
        return f"<{value.bit_length()}-bit integer>"
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    if len(shown) > _LONGEST_SHOWN_VALUE:
        shown = shown[: _LONGEST_SHOWN_VALUE - 3] + "..."
    return shown


def _key_path(parent: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else repr(key)
    return f"{parent}.{shown}" if parent else shown


def _is_integer(value: object) -> TypeGuard[int]:
    # TOML booleans are Python bools, which are ints; `true` must never pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
    """Checks one parsed document; every method raises ScenarioError at the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, problem: str) -> ScenarioError:
        return ScenarioError(self.source, path, problem)

    # Value checks.

    def known_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"expected {', '.join(allowed)}"
                raise self.error(_key_path(path, key), f"unknown key; {hint}")

    def required(self, table: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in table:
            raise self.error(_key_path(path, key), "required")
        return table[key]

    def table(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_describe(value)}")
        return value

    def array_of_tables(self, value: object, path: str) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise self.error(
                path, f"expected an array of tables ([[{path}]]), got {_describe(value)}"
            )
        return [self.table(item, f"{path}[{index}]") for index, item in enumerate(value)]

    def integer(self, value: object, path: str, low: int, high: int | None) -> int:
        if not _is_integer(value):
            raise self.error(path, f"expected an integer, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"in {low}..{high}" if high is not None else f"at least {low}"
            raise self.error(path, f"must be {bounds}, got {_show(value)}")
        return value

    def number(self, value: object, path: str) -> float:
        """A finite float; integers are accepted wherever a float is expected."""
        if isinstance(value, float):
            number = value
        elif _is_integer(value):
            # TOML integers are unbounded in tomllib; one too large for a float is infinite.
            number = float(value) if abs(value) <= _LARGEST_FLOAT_INTEGER else math.inf
        else:
            raise self.error(path, f"expected a number, got {_describe(value)}")
        if not math.isfinite(number):
            raise self.error(path, f"must be finite, got {_describe(value)}")
        return number

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {_describe(value)}")
        return value

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_describe(value)}")
        return value

    def choice(self, value: object, path: str, choices: tuple[str, ...]) -> str:
        text = self.string(value, path)
        if text not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    def storable(self, replicas: int, workload: WorkloadSpec) -> None:
        """Refuse what a real cluster file would (pbft/checkpoint_size.py): clients whose
        full dedup windows make a checkpoint no replica could store or restore."""
        try:
            config = ClusterConfig(replica_count=replicas)  # the simulator's dedup_window
        except ConfigError:
            return  # the cluster's own checks say what is wrong
        accounts = genesis_accounts(workload.accounts, workload.clients, workload.initial_balance)
        problem = checkpoint_size_problem(
            config, accounts, workload.clients, remedy="use fewer clients or accounts"
        )
        if problem is not None:
            raise self.error("workload.clients", problem)

    def check(self, condition: bool, path: str, problem: str) -> None:
        if not condition:
            raise self.error(path, problem)

    def replica_id(self, value: object, path: str, replicas: int) -> int:
        if not _is_integer(value):
            raise self.error(path, f"expected a replica id (integer), got {_describe(value)}")
        self.check(
            0 <= value < replicas,
            path,
            f"replica {_show(value)} does not exist: cluster.replicas = {replicas}, ids are "
            f"0..{replicas - 1}",
        )
        return value

    # Sections.

    def scenario(self, document: dict[str, Any]) -> Scenario:
        self.known_keys(document, _TOP_LEVEL_KEYS, "")
        name = self.string(self.required(document, "name", ""), "name")
        self.check(bool(name.strip()), "name", "must not be empty")
        self.check(
            len(name) <= MAX_NAME_LENGTH,
            "name",
            f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}",
        )
        description = self.string(document.get("description", ""), "description")
        seed = self.integer(document.get("seed", 0), "seed", 0, MAX_SEED)
        # The cluster comes first: replica ids elsewhere are checked against its size.
        cluster = self.cluster(self.table(document.get("cluster", {}), "cluster"))
        network = self.network(self.table(document.get("network", {}), "network"))
        workload = self.workload(self.table(document.get("workload", {}), "workload"))
        self.storable(cluster.replicas, workload)
        fault_tables = self.array_of_tables(document.get("faults", []), "faults")
        faults = [
            self.fault(table, f"faults[{index}]", cluster.replicas)
            for index, table in enumerate(fault_tables)
        ]
        byzantine = self.byzantine(
            self.array_of_tables(document.get("byzantine", []), "byzantine"),
            cluster.replicas,
            workload.clients,
        )
        expect = self.expect(self.table(document.get("expect", {}), "expect"))
        liveness = None
        if "liveness" in document:
            liveness = self.liveness(self.table(document["liveness"], "liveness"))
        return Scenario(
            name=name,
            description=description,
            seed=seed,
            cluster=cluster,
            network=network,
            workload=workload,
            # sorted() is stable, so simultaneous faults apply in file order.
            faults=tuple(sorted(faults, key=lambda fault: fault.at_ms)),
            byzantine=byzantine,
            expect=expect,
            source=self.source,
            liveness=liveness,
        )

    def cluster(self, table: dict[str, Any]) -> ClusterSpec:
        self.known_keys(table, _CLUSTER_KEYS, "cluster")
        defaults = ClusterSpec()

        def integer(key: str, low: int, high: int | None) -> int:
            return self.integer(table.get(key, getattr(defaults, key)), f"cluster.{key}", low, high)

        # f = (n - 1) // 3 must be at least 1, or there is nothing Byzantine to tolerate.
        replicas = integer("replicas", MIN_REPLICAS, MAX_REPLICAS)
        checkpoint_interval = integer("checkpoint_interval", 1, MAX_CHECKPOINT_INTERVAL)
        view_change_timeout_ms = integer("view_change_timeout_ms", 10, MAX_DURATION_MS)
        heartbeat_interval_ms = integer("heartbeat_interval_ms", 1, None)
        # A primary that beats less often than backups time out would be deposed while healthy.
        self.check(
            heartbeat_interval_ms < view_change_timeout_ms,
            "cluster.heartbeat_interval_ms",
            f"must be below cluster.view_change_timeout_ms ({view_change_timeout_ms}), "
            f"got {heartbeat_interval_ms}",
        )
        watermark_window = integer("watermark_window", 0, MAX_WATERMARK_WINDOW)
        self.check(
            watermark_window % checkpoint_interval == 0,
            "cluster.watermark_window",
            f"must be 0 or a multiple of cluster.checkpoint_interval ({checkpoint_interval}), "
            f"got {watermark_window}",
        )
        return ClusterSpec(
            replicas=replicas,
            batch_size=integer("batch_size", 1, MAX_BATCH_SIZE),
            checkpoint_interval=checkpoint_interval,
            view_change_timeout_ms=view_change_timeout_ms,
            batch_timeout_ms=integer("batch_timeout_ms", 0, MAX_BATCH_TIMEOUT_MS),
            heartbeat_interval_ms=heartbeat_interval_ms,
            retransmit_interval_ms=integer("retransmit_interval_ms", 1, MAX_DURATION_MS),
            client_timeout_ms=integer("client_timeout_ms", 10, MAX_DURATION_MS),
            watermark_window=watermark_window,
        )

    def network(self, table: dict[str, Any]) -> NetworkSpec:
        self.known_keys(table, _NETWORK_KEYS, "network")
        latency = (
            self.latency(self.table(table["latency_ms"], "network.latency_ms"))
            if "latency_ms" in table
            else _DEFAULT_LATENCY
        )
        return NetworkSpec(
            latency=latency,
            drop=self.probability(table.get("drop", 0.0), "network.drop"),
            duplicate=self.probability(table.get("duplicate", 0.0), "network.duplicate"),
        )

    def probability(self, value: object, path: str) -> float:
        # 1 is excluded: a link that loses or repeats every message forever is no network.
        probability = self.number(value, path)
        self.check(0 <= probability < 1, path, f"must be in [0, 1), got {probability}")
        return probability

    def latency(self, table: dict[str, Any], path: str = "network.latency_ms") -> LatencySpec:
        self.known_keys(table, _LATENCY_KEYS, path)
        distribution = self.choice(
            table.get("dist", "uniform"), f"{path}.dist", LATENCY_DISTRIBUTIONS
        )
        min_ms = self.duration(table.get("min", 0), f"{path}.min")
        if distribution == "uniform":
            self.check("mean" not in table, f"{path}.mean", 'only for dist = "exponential"')
            max_ms = self.duration(self.required(table, "max", path), f"{path}.max")
            self.check(
                max_ms >= min_ms, f"{path}.max", f"must be at least min ({min_ms}), got {max_ms}"
            )
            return LatencySpec(distribution, min_ms=min_ms, max_ms=max_ms, mean_ms=None)
        self.check("max" not in table, f"{path}.max", 'only for dist = "uniform"')
        mean_ms = self.duration(self.required(table, "mean", path), f"{path}.mean")
        self.check(mean_ms > 0, f"{path}.mean", f"must be greater than 0, got {mean_ms}")
        return LatencySpec(distribution, min_ms=min_ms, max_ms=None, mean_ms=mean_ms)

    def duration(self, value: object, path: str) -> float:
        duration_ms = self.number(value, path)
        self.check(
            0 <= duration_ms <= MAX_DURATION_MS,
            path,
            f"must be in 0..{MAX_DURATION_MS} ms, got {duration_ms}",
        )
        return duration_ms

    def workload(self, table: dict[str, Any]) -> WorkloadSpec:
        self.known_keys(table, _WORKLOAD_KEYS, "workload")
        defaults = WorkloadSpec()

        def integer(key: str, low: int, high: int) -> int:
            return self.integer(
                table.get(key, getattr(defaults, key)), f"workload.{key}", low, high
            )

        accounts = integer("accounts", 2, 100_000)
        initial_balance = integer("initial_balance", 0, 10**15)
        self.check(
            accounts * initial_balance <= MAX_TOTAL_BALANCE,
            "workload.initial_balance",
            f"accounts * initial_balance must be at most {MAX_TOTAL_BALANCE} (the ledger's "
            f"total), got {accounts} * {initial_balance}",
        )
        rate_per_s = self.number(
            table.get("rate_per_s", defaults.rate_per_s), "workload.rate_per_s"
        )
        self.check(
            rate_per_s > 0, "workload.rate_per_s", f"must be greater than 0, got {rate_per_s}"
        )
        overdraw = self.number(table.get("overdraw", defaults.overdraw), "workload.overdraw")
        self.check(0 <= overdraw <= 1, "workload.overdraw", f"must be in [0, 1], got {overdraw}")
        return WorkloadSpec(
            clients=integer("clients", 1, 1000),
            accounts=accounts,
            initial_balance=initial_balance,
            payments=integer("payments", 0, 1_000_000),
            rate_per_s=rate_per_s,
            overdraw=overdraw,
        )

    def fault(self, table: dict[str, Any], path: str, replicas: int) -> FaultSpec:
        self.known_keys(table, _FAULT_KEYS, path)
        at_ms = self.integer(self.required(table, "at_ms", path), f"{path}.at_ms", 0, None)
        action = self.choice(self.required(table, "action", path), f"{path}.action", FAULT_ACTIONS)
        # Each action takes exactly its own fields; a stray one is most likely a mistake.
        takes = _FAULT_ACTION_KEYS[action]
        for key in table:
            if key not in ("at_ms", "action"):
                self.check(key in takes, f"{path}.{key}", f"not used by action {action!r}")
        replica = None
        if "replica" in takes:
            replica_value = self.required(table, "replica", path)
            replica = self.replica_id(replica_value, f"{path}.replica", replicas)
        groups = None
        if "groups" in takes:
            groups = self.groups(self.required(table, "groups", path), f"{path}.groups", replicas)
        until_ms = None
        if "until_ms" in table:
            until_ms = self.integer(table["until_ms"], f"{path}.until_ms", 0, None)
            self.check(
                until_ms > at_ms,
                f"{path}.until_ms",
                f"must be after at_ms ({_show(at_ms)}), got {_show(until_ms)}",
            )
        direction = "both"
        if "direction" in table:
            direction = self.choice(table["direction"], f"{path}.direction", PARTITION_DIRECTIONS)
        wipe = self.boolean(table.get("wipe", False), f"{path}.wipe")
        sources = destinations = messages = None
        if action in LINK_FAULTS:
            sources = self.endpoints(table.get("from", "*"), f"{path}.from", replicas)
            destinations = self.endpoints(table.get("to", "*"), f"{path}.to", replicas)
            if "messages" in table:
                messages = self.message_types(table["messages"], f"{path}.messages")
        probability = add_ms = window_ms = factor = None
        latency = None
        if action in ("drop", "duplicate"):
            probability = self.number(
                self.required(table, "probability", path), f"{path}.probability"
            )
            self.check(
                0 <= probability <= 1,
                f"{path}.probability",
                f"must be in [0, 1], got {probability}",
            )
        if action == "delay":
            self.check(
                ("add_ms" in table) != ("latency_ms" in table),
                path,
                "a delay takes exactly one of add_ms and latency_ms",
            )
            if "add_ms" in table:
                add_ms = self.duration(table["add_ms"], f"{path}.add_ms")
            else:
                latency_path = f"{path}.latency_ms"
                latency = self.latency(self.table(table["latency_ms"], latency_path), latency_path)
        if action == "reorder":
            window_ms = self.duration(table.get("window_ms", 20), f"{path}.window_ms")
            self.check(window_ms > 0, f"{path}.window_ms", "must be greater than 0")
        if action == "clock_skew":
            factor = self.number(self.required(table, "factor", path), f"{path}.factor")
            self.check(
                1 / MAX_CLOCK_SKEW_FACTOR <= factor <= MAX_CLOCK_SKEW_FACTOR,
                f"{path}.factor",
                f"must be in {1 / MAX_CLOCK_SKEW_FACTOR}..{MAX_CLOCK_SKEW_FACTOR}, got {factor}",
            )
        return FaultSpec(
            at_ms=at_ms,
            action=action,
            replica=replica,
            until_ms=until_ms,
            groups=groups,
            direction=direction,
            wipe=wipe,
            sources=sources,
            destinations=destinations,
            messages=messages,
            probability=probability,
            add_ms=add_ms,
            latency=latency,
            window_ms=window_ms,
            factor=factor,
        )

    def endpoints(self, value: object, path: str, replicas: int) -> tuple[int | str, ...] | None:
        """`"*"` (anything), `"clients"`, `"replicas"`, a replica id, or a list of those."""
        items = value if isinstance(value, list) else [value]
        self.check(bool(items), path, "must not be empty")
        endpoints: dict[int | str, None] = {}
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]" if isinstance(value, list) else path
            if item == "*":
                return None
            if item == "clients":
                endpoints["clients"] = None
            elif item == "replicas":
                endpoints.update(dict.fromkeys(range(replicas)))
            elif _is_integer(item):
                endpoints[self.replica_id(item, item_path, replicas)] = None
            else:
                raise self.error(
                    item_path,
                    f'expected a replica id, "clients", "replicas" or "*", got {_describe(item)}',
                )
        return tuple(endpoints)

    def message_types(self, value: object, path: str) -> tuple[str, ...]:
        self.check(isinstance(value, list) and bool(value), path, "expected a list of types")
        if not isinstance(value, list):
            return ()
        return tuple(
            self.choice(item, f"{path}[{index}]", MESSAGE_TYPE_NAMES)
            for index, item in enumerate(value)
        )

    def liveness(self, table: dict[str, Any]) -> LivenessSpec:
        self.known_keys(table, _LIVENESS_KEYS, "liveness")
        heal_all_at_ms = self.integer(
            self.required(table, "heal_all_at_ms", "liveness"), "liveness.heal_all_at_ms", 0, None
        )
        within_ms = self.integer(
            self.required(table, "within_ms", "liveness"), "liveness.within_ms", 1, None
        )
        return LivenessSpec(heal_all_at_ms, within_ms)

    def groups(self, value: object, path: str, replicas: int) -> tuple[tuple[int, ...], ...]:
        if not isinstance(value, list):
            raise self.error(
                path, f"expected an array of arrays of replica ids, got {_describe(value)}"
            )
        self.check(len(value) >= 2, path, f"needs at least 2 groups, got {len(value)}")
        seen: dict[int, int] = {}
        groups: list[tuple[int, ...]] = []
        for group_index, group in enumerate(value):
            group_path = f"{path}[{group_index}]"
            if not isinstance(group, list):
                raise self.error(
                    group_path, f"expected an array of replica ids, got {_describe(group)}"
                )
            self.check(bool(group), group_path, "must not be empty")
            for member_index, member in enumerate(group):
                member_path = f"{group_path}[{member_index}]"
                replica = self.replica_id(member, member_path, replicas)
                if replica in seen:
                    raise self.error(
                        member_path, f"replica {replica} is already in {path}[{seen[replica]}]"
                    )
                seen[replica] = group_index
            groups.append(tuple(group))
        return tuple(groups)

    def byzantine(
        self, tables: list[dict[str, Any]], replicas: int, clients: int | None = None
    ) -> tuple[ByzantineSpec, ...]:
        entries: list[ByzantineSpec] = []
        listed_at: dict[int, int] = {}
        clients_listed_at: dict[int, int] = {}
        ordered: list[ByzantineSpec] = []
        for index, table in enumerate(tables):
            path = f"byzantine[{index}]"
            self.known_keys(table, _BYZANTINE_KEYS, path)
            if "client" in table:
                takes_client = [
                    name for name, takes in BEHAVIOR_PARAMETERS.items() if "client" in takes
                ]
                if "replica" not in table:
                    ordered.append(
                        self.byzantine_client(table, path, clients, clients_listed_at, index)
                    )
                    continue
                if table.get("behavior") not in takes_client:
                    raise self.error(
                        f"{path}.client",
                        "both replica and client given: an entry is one Byzantine replica "
                        "(replica = N) or one Byzantine client (client = N); only behavior "
                        f"{' or '.join(repr(name) for name in takes_client)} takes client as "
                        "its parameter",
                    )
            replica = self.replica_id(
                self.required(table, "replica", path), f"{path}.replica", replicas
            )
            if replica in listed_at:
                raise self.error(
                    f"{path}.replica",
                    f"replica {replica} is already listed in byzantine[{listed_at[replica]}]",
                )
            listed_at[replica] = index
            behavior = self.choice(
                self.required(table, "behavior", path), f"{path}.behavior", BEHAVIORS
            )
            entries.append(self.byzantine_entry(table, path, replica, behavior, clients, replicas))
            ordered.append(entries[-1])
        # With every replica Byzantine there is no correct replica left to check anything on.
        self.check(
            len(entries) <= replicas - 1,
            "byzantine",
            f"at most {replicas - 1} replica entries (cluster.replicas - 1), got {len(entries)}",
        )
        # Twin copies pair up by side with the copies of another twin, never by group.
        twins = frozenset(entry.replica for entry in entries if entry.behavior == "twin")
        for index, entry in enumerate(ordered):
            for group_index, group in enumerate(entry.groups or ()):
                for member_index, member in enumerate(group):
                    if member in twins:
                        raise self.error(
                            f"byzantine[{index}].groups[{group_index}][{member_index}]",
                            f"replica {member} is a twin too: the copies of two twins pair up "
                            "by side (first with first, second with second); list only the "
                            "other replicas",
                        )
        # In the file's order, replicas and clients alike.
        return tuple(ordered)

    def byzantine_client(
        self,
        table: dict[str, Any],
        path: str,
        clients: int | None,
        listed_at: dict[int, int],
        index: int,
    ) -> ByzantineSpec:
        """A [[byzantine]] entry naming a client (client = N) instead of a replica."""
        client_path = f"{path}.client"
        value = table["client"]
        if not _is_integer(value):
            raise self.error(client_path, f"expected a client id (integer), got {_describe(value)}")
        if clients is not None:
            self.check(
                0 <= value < clients,
                client_path,
                f"client {_show(value)} does not exist: workload.clients = {clients}, ids "
                f"are 0..{clients - 1}",
            )
        client = self.integer(value, client_path, 0, None)
        if client in listed_at:
            raise self.error(
                client_path, f"client {client} is already listed in byzantine[{listed_at[client]}]"
            )
        listed_at[client] = index
        behavior = self.choice(
            self.required(table, "behavior", path), f"{path}.behavior", CLIENT_BEHAVIORS
        )
        takes = CLIENT_BEHAVIOR_PARAMETERS.get(behavior, ())
        for key in _BYZANTINE_PARAMETER_KEYS:
            self.check(
                key == "client" or key in takes or key not in table,
                f"{path}.{key}",
                f"not used by client behavior {behavior!r}",
            )
        at_ms, until_ms = self.window(table, path)
        kind = None
        if behavior in CLIENT_BEHAVIOR_KINDS:
            kinds = CLIENT_BEHAVIOR_KINDS[behavior]
            kind = self.choice(table.get("kind", kinds[0]), f"{path}.kind", kinds)
        return ByzantineSpec(
            replica=None,
            behavior=behavior,
            at_ms=at_ms,
            until_ms=until_ms,
            client=client,
            kind=kind,
        )

    def window(self, table: dict[str, Any], path: str) -> tuple[int, int | None]:
        at_ms = self.integer(table.get("at_ms", 0), f"{path}.at_ms", 0, None)
        until_ms = None
        if "until_ms" in table:
            until_ms = self.integer(table["until_ms"], f"{path}.until_ms", 0, None)
            self.check(
                until_ms > at_ms,
                f"{path}.until_ms",
                f"must be after at_ms ({_show(at_ms)}), got {_show(until_ms)}",
            )
        return at_ms, until_ms

    def byzantine_entry(
        self,
        table: dict[str, Any],
        path: str,
        replica: int,
        behavior: str,
        clients: int | None,
        replicas: int,
    ) -> ByzantineSpec:
        takes = BEHAVIOR_PARAMETERS.get(behavior, ())
        for key in _BYZANTINE_PARAMETER_KEYS:
            self.check(
                key in takes or key not in table,
                f"{path}.{key}",
                f"not used by behavior {behavior!r}",
            )
        if behavior == "twin":
            # Both copies run from the start to the end: a twin has no window.
            for key in ("at_ms", "until_ms"):
                self.check(key not in table, f"{path}.{key}", "not used by behavior 'twin'")
        at_ms, until_ms = self.window(table, path)
        groups = None
        if "groups" in takes:
            groups_path = f"{path}.groups"
            groups = self.groups(self.required(table, "groups", path), groups_path, replicas)
            self.check(
                len(groups) == 2,
                groups_path,
                f"a twin has two copies: exactly 2 groups, got {len(groups)}",
            )
            for group_index, group in enumerate(groups):
                for member_index, member in enumerate(group):
                    self.check(
                        member != replica,
                        f"{groups_path}[{group_index}][{member_index}]",
                        f"replica {replica} is the twin itself",
                    )
        delay_ms = None
        if "delay_ms" in table:
            delay_ms = self.integer(table["delay_ms"], f"{path}.delay_ms", 0, MAX_DURATION_MS)
        client = None
        if "client" in takes:
            client_path = f"{path}.client"
            value = self.required(table, "client", path)
            if not _is_integer(value):
                raise self.error(
                    client_path, f"expected a client id (integer), got {_describe(value)}"
                )
            if clients is not None:
                self.check(
                    0 <= value < clients,
                    client_path,
                    f"client {_show(value)} does not exist: workload.clients = {clients}, ids "
                    f"are 0..{clients - 1}",
                )
            client = self.integer(value, client_path, 0, None)
        kind = None
        if behavior in BEHAVIOR_KINDS:
            kinds = BEHAVIOR_KINDS[behavior]
            kind = self.choice(table.get("kind", kinds[0]), f"{path}.kind", kinds)
        return ByzantineSpec(
            replica=replica,
            behavior=behavior,
            at_ms=at_ms,
            until_ms=until_ms,
            delay_ms=delay_ms,
            client=client,
            kind=kind,
            groups=groups,
        )

    def expect(self, table: dict[str, Any]) -> ExpectSpec:
        self.known_keys(table, _EXPECT_KEYS, "expect")
        return ExpectSpec(
            safety=self.boolean(table.get("safety", True), "expect.safety"),
            liveness=self.boolean(table.get("liveness", True), "expect.liveness"),
            deadline_ms=self.integer(table.get("deadline_ms", 0), "expect.deadline_ms", 0, None),
        )
