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
    MAX_CPU_CORES,
    MAX_CPU_COST_US,
    MAX_DURATION_MS,
    MAX_NAME_LENGTH,
    MAX_REGIONS,
    MAX_SEED,
    MAX_TOTAL_BALANCE,
    MESSAGE_TYPE_NAMES,
    PARTITION_DIRECTIONS,
    TOPOLOGY_FAULT_ACTIONS,
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
    "cpu",
)
_CPU_KEYS: Final = (
    "sign_us",
    "verify_us",
    "per_message_us",
    "per_request_us",
    "fsync_us",
    "cores",
)
# A calibration file (`pbft calibrate`): the model in [cpu], what was measured in [machine].
_CALIBRATION_KEYS: Final = ("cpu", "machine")
MAX_CALIBRATION_FILE_BYTES: Final = 64 * 1024
_NETWORK_KEYS: Final = ("latency_ms", "drop", "duplicate", "topology")
_TOPOLOGY_KEYS: Final = ("regions", "latency_ms", "links", "replicas", "clients")
_LINK_KEYS: Final = ("a", "b", "latency_ms", "loss")
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
    "links",
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
    "cut": ("links", "until_ms"),
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
        workload = self.workload(self.table(document.get("workload", {}), "workload"))
        network = self.network(
            self.table(document.get("network", {}), "network"), cluster.replicas, workload.clients
        )
        self.storable(cluster.replicas, workload)
        fault_tables = self.array_of_tables(document.get("faults", []), "faults")
        faults = [
            self.fault(table, f"faults[{index}]", cluster.replicas, network.topology)
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
            cpu=self.cpu(table["cpu"]) if "cpu" in table else None,
        )

    def cpu(self, value: object) -> CpuSpec:
        """Inline `{ sign_us, verify_us, per_message_us }`, or the path of a calibration
        file (`pbft calibrate`), relative to the scenario file's directory."""
        path = "cluster.cpu"
        if isinstance(value, str):
            return self.cpu_file(value)
        table = self.table(value, path)
        self.known_keys(table, _CPU_KEYS, path)

        def cost(key: str) -> float:
            cost_us = self.number(self.required(table, key, path), f"{path}.{key}")
            self.check(
                0 <= cost_us <= MAX_CPU_COST_US,
                f"{path}.{key}",
                f"must be in 0..{MAX_CPU_COST_US:g} microseconds, got {cost_us}",
            )
            return cost_us

        return CpuSpec(
            sign_us=cost("sign_us"),
            verify_us=cost("verify_us"),
            per_message_us=cost("per_message_us"),
            per_request_us=cost("per_request_us") if "per_request_us" in table else 0.0,
            fsync_us=cost("fsync_us") if "fsync_us" in table else 0.0,
            cores=self.integer(table.get("cores", 0), f"{path}.cores", 0, MAX_CPU_CORES),
        )

    def cpu_file(self, name: str) -> CpuSpec:
        path = "cluster.cpu"
        self.check(bool(name.strip()), path, "expected a table or a calibration file's path")
        base = os.path.dirname(self.source) if self.source != "<string>" else ""
        file_path = os.path.join(base, name)
        try:
            with open(file_path, "rb") as file:
                raw = file.read(MAX_CALIBRATION_FILE_BYTES + 1)
        except OSError as error:
            raise self.error(
                path, f"cannot read calibration file {file_path}: {error.strerror or error}"
            ) from error
        self.check(
            len(raw) <= MAX_CALIBRATION_FILE_BYTES,
            path,
            f"calibration file {file_path} is larger than {MAX_CALIBRATION_FILE_BYTES} bytes",
        )
        try:
            document = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise self.error(path, f"calibration file {file_path} is not TOML: {error}") from error
        unknown = [key for key in document if key not in _CALIBRATION_KEYS]
        self.check(
            not unknown,
            path,
            f"calibration file {file_path}: unknown key {unknown[0] if unknown else ''!r}; "
            f"expected {', '.join(_CALIBRATION_KEYS)}",
        )
        self.check("cpu" in document, path, f"calibration file {file_path} has no [cpu] table")
        # A table only: a calibration file naming another file could go round in a circle.
        try:
            return self.cpu(self.table(document["cpu"], path))
        except ScenarioError as error:
            raise self.error(error.field, f"{error.problem} (in {file_path})") from None

    def network(self, table: dict[str, Any], replicas: int = 4, clients: int = 4) -> NetworkSpec:
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
            topology=(
                self.topology(self.table(table["topology"], "network.topology"), replicas, clients)
                if "topology" in table
                else None
            ),
        )

    def topology(self, table: dict[str, Any], replicas: int, clients: int) -> TopologySpec:
        path = "network.topology"
        self.known_keys(table, _TOPOLOGY_KEYS, path)
        region_list = self.required(table, "regions", path)
        if not isinstance(region_list, list) or not region_list:
            raise self.error(f"{path}.regions", "expected a non-empty list of region names")
        self.check(
            len(region_list) <= MAX_REGIONS,
            f"{path}.regions",
            f"at most {MAX_REGIONS} regions, got {len(region_list)}",
        )
        regions: dict[str, None] = {}
        for index, region in enumerate(region_list):
            name = self.string(region, f"{path}.regions[{index}]")
            self.check(
                bool(name.strip()) and len(name) <= MAX_NAME_LENGTH,
                f"{path}.regions[{index}]",
                f"a region name is 1..{MAX_NAME_LENGTH} characters",
            )
            self.check(name not in regions, f"{path}.regions[{index}]", f"{name!r} twice")
            regions[name] = None
        names = tuple(regions)
        self.check(
            ("latency_ms" in table) != ("links" in table),
            path,
            "takes exactly one of latency_ms (a matrix) and links (a list of links)",
        )
        if "latency_ms" in table:
            links = self.latency_matrix(table["latency_ms"], f"{path}.latency_ms", names)
        else:
            links = self.links(table["links"], f"{path}.links", names)
        return TopologySpec(
            regions=names,
            links=links,
            replicas=self.placement(
                self.required(table, "replicas", path), f"{path}.replicas", names, replicas
            ),
            clients=self.placement(
                self.required(table, "clients", path), f"{path}.clients", names, clients
            ),
        )

    def latency_matrix(
        self, value: object, path: str, regions: tuple[str, ...]
    ) -> tuple[LinkSpec, ...]:
        """Row i, column j: latency from region i to j; symmetric, 0 on the diagonal, and a
        link wherever it is above 0 (0 off the diagonal: no direct link)."""
        size = len(regions)
        if not isinstance(value, list) or len(value) != size:
            raise self.error(path, f"expected {size} rows (one per region), got {describe(value)}")
        rows: list[list[float]] = []
        for i, row in enumerate(value):
            if not isinstance(row, list) or len(row) != size:
                raise self.error(f"{path}[{i}]", f"expected {size} numbers, got {describe(row)}")
            rows.append([self.duration(cell, f"{path}[{i}][{j}]") for j, cell in enumerate(row)])
        links = []
        for i in range(size):
            self.check(rows[i][i] == 0, f"{path}[{i}][{i}]", "a region's latency to itself is 0")
            for j in range(i + 1, size):
                self.check(
                    rows[i][j] == rows[j][i],
                    f"{path}[{j}][{i}]",
                    f"must equal {path}[{i}][{j}] ({rows[i][j]}): links are symmetric",
                )
                if rows[i][j] > 0:
                    links.append(LinkSpec(regions[i], regions[j], rows[i][j]))
        return tuple(links)

    def links(self, value: object, path: str, regions: tuple[str, ...]) -> tuple[LinkSpec, ...]:
        tables = self.array_of_tables(value, path)
        links: dict[frozenset[str], LinkSpec] = {}
        for index, table in enumerate(tables):
            link_path = f"{path}[{index}]"
            self.known_keys(table, _LINK_KEYS, link_path)
            a = self.choice(self.required(table, "a", link_path), f"{link_path}.a", regions)
            b = self.choice(self.required(table, "b", link_path), f"{link_path}.b", regions)
            self.check(a != b, f"{link_path}.b", f"a link joins two regions, got {a!r} twice")
            self.check(frozenset((a, b)) not in links, link_path, f"a second link {a!r}-{b!r}")
            latency_ms = self.duration(
                self.required(table, "latency_ms", link_path), f"{link_path}.latency_ms"
            )
            loss = self.probability(table.get("loss", 0.0), f"{link_path}.loss")
            links[frozenset((a, b))] = LinkSpec(a, b, latency_ms, loss)
        return tuple(links.values())

    def placement(
        self, value: object, path: str, regions: tuple[str, ...], count: int
    ) -> tuple[str, ...]:
        """A region name for all, or a list with one region per replica (or client)."""
        if isinstance(value, str):
            return (self.choice(value, path, regions),) * count
        if not isinstance(value, list) or len(value) != count:
            raise self.error(
                path,
                f"expected a region name or a list of {count} region names, got {describe(value)}",
            )
        return tuple(
            self.choice(item, f"{path}[{index}]", regions) for index, item in enumerate(value)
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

    def fault(
        self,
        table: dict[str, Any],
        path: str,
        replicas: int,
        topology: TopologySpec | None = None,
    ) -> FaultSpec:
        self.known_keys(table, _FAULT_KEYS, path)
        at_ms = self.integer(self.required(table, "at_ms", path), f"{path}.at_ms", 0, None)
        action = self.choice(
            self.required(table, "action", path),
            f"{path}.action",
            (*FAULT_ACTIONS, *TOPOLOGY_FAULT_ACTIONS),
        )
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
        links = None
        if action == "cut":
            if topology is None:
                raise self.error(f"{path}.action", "cut needs a [network.topology]")
            links = self.cut_links(self.required(table, "links", path), f"{path}.links", topology)
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
            links=links,
        )

    def cut_links(
        self, value: object, path: str, topology: TopologySpec
    ) -> tuple[tuple[str, str], ...]:
        """Pairs of regions, each joined by a link of the topology."""
        if not isinstance(value, list) or not value:
            raise self.error(
                path, f"expected a list of [region, region] pairs, got {describe(value)}"
            )
        known = frozenset(frozenset((link.a, link.b)) for link in topology.links)
        pairs = []
        for index, pair in enumerate(value):
            pair_path = f"{path}[{index}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise self.error(pair_path, f"expected [region, region], got {describe(pair)}")
            a = self.choice(pair[0], f"{pair_path}[0]", topology.regions)
            b = self.choice(pair[1], f"{pair_path}[1]", topology.regions)
            self.check(frozenset((a, b)) in known, pair_path, f"no link joins {a!r} and {b!r}")
            pairs.append((a, b))
        return tuple(pairs)

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
