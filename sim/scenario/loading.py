"""Loading scenario files: strict parsing and validation.

Validation is strict on purpose: an unknown key, a wrong type or a value out of range raises
ScenarioError naming the field by its dotted path (``cluster.replica``, ``faults[1].until_ms``),
so a typo in a scenario never silently turns it into a different, weaker test.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Final

from pbft.checkpoint_size import checkpoint_size_problem
from pbft.config import (
    MAX_BATCH_SIZE,
    MAX_BATCH_TIMEOUT_MS,
    MAX_CHECKPOINT_INTERVAL,
    MAX_CLOCK_SKEW_MS,
    MAX_REPLICAS,
    MAX_WATERMARK_WINDOW,
    MIN_REPLICAS,
    ClusterConfig,
    ConfigError,
)
from sim.scenario.adversaries import AdversaryReader
from sim.scenario.spec import (
    DEFAULT_LATENCY,
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
    ClusterSpec,
    ExpectSpec,
    FaultSpec,
    LatencySpec,
    LivenessSpec,
    NetworkSpec,
    Scenario,
    WorkloadSpec,
)
from sim.scenario.values import ScenarioError, describe, is_integer, key_path, show
from sim.workload import OPERATIONS, genesis_accounts

# Genesis is a rule (sim.workload.genesis_accounts): the ledger stores only the accounts
# payments touch, so a million accounts cost a scenario one genesis build, not per payment.
MAX_ACCOUNTS: Final = 1_000_000

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
    "max_clock_skew_ms",
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
    "mix",
    "expires_in_ms",
    "wrong_ref",
)
_EXPIRES_KEYS: Final = ("min", "max")
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

_EXPECT_KEYS: Final = ("safety", "liveness", "deadline_ms")


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


class _Reader(AdversaryReader):
    """Checks one parsed document; every method raises ScenarioError at the first problem."""

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
            max_clock_skew_ms=integer("max_clock_skew_ms", 1, MAX_CLOCK_SKEW_MS),
        )

    def network(self, table: dict[str, Any]) -> NetworkSpec:
        self.known_keys(table, _NETWORK_KEYS, "network")
        latency = (
            self.latency(self.table(table["latency_ms"], "network.latency_ms"))
            if "latency_ms" in table
            else DEFAULT_LATENCY
        )
        return NetworkSpec(
            latency=latency,
            drop=self.probability(table.get("drop", 0.0), "network.drop"),
            duplicate=self.probability(table.get("duplicate", 0.0), "network.duplicate"),
        )

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

        accounts = integer("accounts", 2, MAX_ACCOUNTS)
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
        wrong_ref = self.number(table.get("wrong_ref", defaults.wrong_ref), "workload.wrong_ref")
        self.check(0 <= wrong_ref <= 1, "workload.wrong_ref", f"must be in [0, 1], got {wrong_ref}")
        mix = defaults.mix
        if "mix" in table:
            mix = self.mix(self.table(table["mix"], "workload.mix"))
        expires_in_ms = defaults.expires_in_ms
        if "expires_in_ms" in table:
            expires_in_ms = self.expires(
                self.table(table["expires_in_ms"], "workload.expires_in_ms")
            )
        return WorkloadSpec(
            clients=integer("clients", 1, 1000),
            accounts=accounts,
            initial_balance=initial_balance,
            payments=integer("payments", 0, 1_000_000),
            rate_per_s=rate_per_s,
            overdraw=overdraw,
            mix=mix,
            expires_in_ms=expires_in_ms,
            wrong_ref=wrong_ref,
        )

    def mix(self, table: dict[str, Any]) -> tuple[tuple[str, float], ...]:
        """Operation -> weight: known operations, weights >= 0, some weight > 0. Kept in
        OPERATIONS order (not the file's), without the zero weights."""
        weights: dict[str, float] = {}
        for op, value in table.items():
            path = key_path("workload.mix", op)
            self.check(
                op in OPERATIONS, path, f"unknown operation; expected {', '.join(OPERATIONS)}"
            )
            weight = self.number(value, path)
            self.check(weight >= 0, path, f"weight must be at least 0, got {weight}")
            weights[op] = weight
        self.check(
            sum(weights.values()) > 0, "workload.mix", "needs some operation with a weight above 0"
        )
        return tuple((op, weights[op]) for op in OPERATIONS if weights.get(op, 0) > 0)

    def expires(self, table: dict[str, Any]) -> tuple[int, int]:
        path = "workload.expires_in_ms"
        self.known_keys(table, _EXPIRES_KEYS, path)
        low = self.integer(self.required(table, "min", path), f"{path}.min", 1, MAX_DURATION_MS)
        high = self.integer(self.required(table, "max", path), f"{path}.max", 1, MAX_DURATION_MS)
        self.check(low <= high, f"{path}.max", f"must be at least min ({low}), got {high}")
        return low, high

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
                f"must be after at_ms ({show(at_ms)}), got {show(until_ms)}",
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
            elif is_integer(item):
                endpoints[self.replica_id(item, item_path, replicas)] = None
            else:
                raise self.error(
                    item_path,
                    f'expected a replica id, "clients", "replicas" or "*", got {describe(item)}',
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

    def expect(self, table: dict[str, Any]) -> ExpectSpec:
        self.known_keys(table, _EXPECT_KEYS, "expect")
        return ExpectSpec(
            safety=self.boolean(table.get("safety", True), "expect.safety"),
            liveness=self.boolean(table.get("liveness", True), "expect.liveness"),
            deadline_ms=self.integer(table.get("deadline_ms", 0), "expect.deadline_ms", 0, None),
        )
