"""`pbft fuzz`: swarm testing in the TigerBeetle (VOPR) style.

One integer, the case seed, determines a whole scenario: the cluster's parameters, the
network's latency and loss, the workload, a random set of faults and Byzantine replicas,
and a liveness phase after them. Every case draws its own mix ("swarm testing": each run
switches whole kinds of fault on or off and draws its own rates), so a rare combination
is not drowned in the average one. The scenario is written as TOML text and read back with
`sim.scenario.parse_scenario`, so what is run is exactly what `pbft run FILE` reads.

The fault bound is kept at every instant: at most f = (n - 1) // 3 replicas are faulty at
once, counting Byzantine replicas (for the whole run, whatever their behaviour's window),
crashed and paused replicas (until they restart or resume), and replicas restarted with a
wiped disk (for the rest of the run: they forgot what they signed). Network faults
(partitions, delay, loss, duplication, reordering) and clock skew are not replica faults:
safety must hold under any of them, and liveness is only required after the liveness
phase heals them all.

A fuzz run (`fuzz`) runs case seeds S, S + 1, ... in worker processes until its time budget
is spent; the first failing case is shrunk (`sim.shrink`) and written to DIR/fuzz-<case
seed>.toml, which `pbft run` replays.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pbft.config import fault_tolerance_of
from sim import adversary
from sim import scenario as scenario_module
from sim.faultbound import max_faulty
from sim.scenario import (
    BEHAVIOR_KINDS,
    BEHAVIOR_PARAMETERS,
    MESSAGE_TYPE_NAMES,
    Scenario,
    parse_scenario,
    to_toml,
)
from sim.scenario import BEHAVIORS as SCENARIO_BEHAVIORS

# The message types a generated link fault may filter on: the first fifteen of pbft's
# MessageType. The state-transfer messages (STATE_CHUNK, STATE_REQUEST) are left out for
# now, because a longer list reshuffles every generated case and so every case seed that
# tests/test_teeth.py measured; add them with a fresh measurement (a scenario may name them).
FUZZ_MESSAGE_TYPES: tuple[str, ...] = MESSAGE_TYPE_NAMES[:15]

MAX_FUZZ_REPLICAS = 64
# A time that is later than any run: intervals that never end.
FOREVER_MS = 10**12
# Parameters the generator knows how to draw; a behaviour needing another one is skipped.
_KNOWN_BEHAVIOR_PARAMETERS = ("delay_ms", "client", "kind")
# Every behaviour the simulator implements and a scenario file may name.
FUZZ_BEHAVIORS: tuple[str, ...] = tuple(
    name
    for name in adversary.BEHAVIORS
    if name in SCENARIO_BEHAVIORS
    and all(
        parameter in _KNOWN_BEHAVIOR_PARAMETERS for parameter in BEHAVIOR_PARAMETERS.get(name, ())
    )
)
# Byzantine clients, where the simulator has them (a client entry: `client = N`).
_CLIENT_BEHAVIOR_PARAMETERS: dict[str, tuple[str, ...]] = getattr(
    scenario_module, "CLIENT_BEHAVIOR_PARAMETERS", {}
)
_CLIENT_BEHAVIOR_KINDS: dict[str, tuple[str, ...]] = getattr(
    scenario_module, "CLIENT_BEHAVIOR_KINDS", {}
)
CLIENT_FUZZ_BEHAVIORS: tuple[str, ...] = tuple(
    name
    for name in getattr(scenario_module, "CLIENT_BEHAVIORS", ())
    if name in getattr(adversary, "CLIENT_BEHAVIORS", {})
    and all(parameter == "kind" for parameter in _CLIENT_BEHAVIOR_PARAMETERS.get(name, ()))
    # The generated workloads are transfers only: such a client would do nothing there.
    and not getattr(adversary.CLIENT_BEHAVIORS[name], "OPERATIONS_ONLY", False)
)
# Kinds of fault a case may switch on (swarm testing: each case enables a random subset).
NODE_FAULT_KINDS = ("crash", "crash_restart", "crash_wipe", "wipe", "pause")
NETWORK_FAULT_KINDS = (
    "partition",
    "delay",
    "drop",
    "duplicate",
    "reorder",
    "clock_skew",
)

# Every fault action the generator writes (see sim.scenario.FAULT_ACTIONS).
GENERATED_FAULT_ACTIONS = ("crash", "restart", "pause", "resume", "heal", *NETWORK_FAULT_KINDS)


class FuzzError(RuntimeError):
    """The fuzzer itself is wrong (e.g. it generated a scenario that does not parse)."""


# --- the generator ----------------------------------------------------------------------


@dataclass
class _Intervals:
    """Replica-fault intervals [start, end] (closed, so faults never touch) under a bound."""

    bound: int
    # (replica, start, end, counted against the per-replica no-overlap rule)
    spans: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def fits(self, replica: int, start: int, end: int) -> bool:
        for other, other_start, other_end, exclusive in self.spans:
            if other == replica and exclusive and other_start <= end and start <= other_end:
                return False
        points = [start] + [s for _, s, _, _ in self.spans if start <= s <= end]
        for point in points:
            faulty = {replica: None}
            faulty.update((r, None) for r, s, e, _ in self.spans if s <= point <= e)
            if len(faulty) > self.bound:
                return False
        return True

    def add(self, replica: int, start: int, end: int, exclusive: bool = True) -> None:
        self.spans.append((replica, start, end, exclusive))


def _round(value: float, digits: int = 3) -> float:
    return round(value, digits)


def _pick_replica(rng: random.Random, replicas: int) -> int:
    """Early primaries (views 0 and 1) half of the time: faults there force view changes."""
    if rng.random() < 0.5:
        return rng.choice((0, 1))
    return rng.randrange(replicas)


def _endpoints(rng: random.Random, replicas: int) -> Any:
    """A from/to filter: anything (None), the clients, one replica or a few."""
    roll = rng.random()
    if roll < 0.4:
        return None
    if roll < 0.55:
        return "clients"
    chosen = sorted(rng.sample(range(replicas), rng.randint(1, max(1, replicas // 2))))
    if rng.random() < 0.2:
        return [*chosen, "clients"]
    return chosen


def _latency(rng: random.Random, scale_ms: int) -> dict[str, Any]:
    if rng.random() < 0.6:
        low = rng.randint(0, max(1, scale_ms // 4))
        return {"min": low, "max": low + rng.randint(0, scale_ms)}
    return {
        "dist": "exponential",
        "mean": rng.randint(1, max(1, scale_ms)),
        "min": rng.randint(0, max(1, scale_ms // 5)),
    }


def _behavior_entry(
    rng: random.Random, replica: int, behavior: str, clients: int, timeout_ms: int, horizon: int
) -> dict[str, Any]:
    entry: dict[str, Any] = {"replica": replica, "behavior": behavior}
    # Timed behaviours: correct at first, or only for a while, or lying from the start.
    if rng.random() < 0.3:
        entry["at_ms"] = rng.randint(0, horizon)
    if rng.random() < 0.3:
        entry["until_ms"] = entry.get("at_ms", 0) + rng.randint(1, horizon)
    for parameter in BEHAVIOR_PARAMETERS.get(behavior, ()):
        if parameter == "delay_ms":
            if rng.random() < 0.7:
                entry["delay_ms"] = rng.randint(0, 2 * timeout_ms)
        elif parameter == "client":
            entry["client"] = rng.randrange(clients)
        elif parameter == "kind":
            entry["kind"] = rng.choice(BEHAVIOR_KINDS[behavior])
    return entry


def generate_document(seed: int, replicas: int = 4) -> dict[str, Any]:
    """The scenario of one case seed, as a TOML-shaped document (see `generate`)."""
    if not 4 <= replicas <= MAX_FUZZ_REPLICAS:
        raise ValueError(f"replicas must be in 4..{MAX_FUZZ_REPLICAS}, got {replicas}")
    rng = random.Random(f"pbft-fuzz/{replicas}/{seed}")
    f = fault_tolerance_of(replicas)

    # Swarm: this case's mix of features.
    node_kinds = [kind for kind in NODE_FAULT_KINDS if rng.random() < 0.5]
    network_kinds = [kind for kind in NETWORK_FAULT_KINDS if rng.random() < 0.4]
    byzantine_on = rng.random() < 0.5

    timeout_ms = rng.choice((100, 150, 200, 300, 400, 600))
    cluster: dict[str, Any] = {
        "replicas": replicas,
        "batch_size": rng.choice((1, 2, 4, 8, 16, 32, 64)),
        "checkpoint_interval": rng.choice((1, 2, 4, 8, 16, 32)),
        "view_change_timeout_ms": timeout_ms,
        "batch_timeout_ms": rng.randint(0, 20),
        "heartbeat_interval_ms": rng.randint(max(1, timeout_ms // 20), timeout_ms // 2),
        "retransmit_interval_ms": rng.randint(10, 120),
        "client_timeout_ms": rng.randint(100, 1200),
    }
    if rng.random() < 0.3:
        cluster["watermark_window"] = cluster["checkpoint_interval"] * rng.choice((1, 2, 4))

    network: dict[str, Any] = {"latency_ms": _latency(rng, rng.choice((5, 10, 20, 40)))}
    if rng.random() < 0.5:
        network["drop"] = _round(rng.uniform(0, 0.2))
    if rng.random() < 0.4:
        network["duplicate"] = _round(rng.uniform(0, 0.15))

    clients = rng.randint(1, 5)
    workload = {
        "clients": clients,
        "accounts": rng.randint(2, 10),
        "initial_balance": rng.choice((2, 10, 100, 1000)),
        "payments": rng.randint(10, 120),
        "rate_per_s": rng.choice((20, 50, 100, 200, 400)),
        "overdraw": rng.choice((0.0, 0.05, 0.1, 0.3)),
    }
    # The hostile phase: every fault starts (and every replica fault ends) before this.
    horizon = rng.randint(400, 3000)
    heal_all_at_ms = horizon + rng.randint(0, 300)

    bound = _Intervals(f)
    byzantine: list[dict[str, Any]] = []
    storm_faults: list[dict[str, Any]] = []
    _restart_storm(seed, replicas, f, bound, byzantine, storm_faults, timeout_ms, horizon)
    if byzantine_on and FUZZ_BEHAVIORS:
        for _ in range(rng.randint(1, f)):
            replica = _pick_replica(rng, replicas)
            if any(entry.get("replica") == replica for entry in byzantine):
                continue
            if not bound.fits(replica, 0, FOREVER_MS):
                continue
            bound.add(replica, 0, FOREVER_MS, exclusive=False)
            behavior = rng.choice(FUZZ_BEHAVIORS)
            byzantine.append(_behavior_entry(rng, replica, behavior, clients, timeout_ms, horizon))

    # A Byzantine client (not a replica fault: clients are not counted in f).
    if CLIENT_FUZZ_BEHAVIORS and rng.random() < 0.25:
        behavior = rng.choice(CLIENT_FUZZ_BEHAVIORS)
        entry = {"client": rng.randrange(clients), "behavior": behavior}
        if rng.random() < 0.3:
            entry["at_ms"] = rng.randint(0, horizon)
        if rng.random() < 0.3:
            entry["until_ms"] = entry.get("at_ms", 0) + rng.randint(1, horizon)
        if "kind" in _CLIENT_BEHAVIOR_PARAMETERS.get(behavior, ()):
            entry["kind"] = rng.choice(_CLIENT_BEHAVIOR_KINDS[behavior])
        byzantine.append(entry)

    if any("replica" in entry for entry in byzantine):
        # A Byzantine replica may be the primary (of view 0 or 1 when _pick_replica chose
        # it, of a later view after faults): no backlog allowance (see backlog_drain_ms),
        # so the case offers only what its configuration can order. Drawn from nothing.
        workload["rate_per_s"] = rate_within_capacity(cluster, network, workload)

    faults: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 4) if node_kinds else 0):
        kind = rng.choice(node_kinds)
        roll = rng.random()
        replica = _pick_replica(rng, replicas)
        start = rng.randint(0, horizon - 50)
        end = rng.randint(start + 20, horizon)
        # What the bound counts: a wiped replica forgot what it signed, for good; a crash
        # without a restart and a pause without an end last until the liveness phase.
        open_ended = kind == "crash" or (kind == "pause" and roll >= 0.8)
        if kind in ("crash_wipe", "wipe"):
            span_end = FOREVER_MS
        elif open_ended:
            span_end = heal_all_at_ms
        else:
            span_end = end
        if not bound.fits(replica, start, span_end):
            continue
        bound.add(replica, start, span_end)
        if kind == "crash":
            # Down until the liveness phase restarts it.
            faults.append({"at_ms": start, "action": "crash", "replica": replica})
        elif kind in ("crash_restart", "crash_wipe"):
            faults.append({"at_ms": start, "action": "crash", "replica": replica})
            restart: dict[str, Any] = {"at_ms": end, "action": "restart", "replica": replica}
            if kind == "crash_wipe":
                restart["wipe"] = True
            faults.append(restart)
        elif kind == "wipe":
            faults.append({"at_ms": start, "action": "restart", "replica": replica, "wipe": True})
        else:
            pause: dict[str, Any] = {"at_ms": start, "action": "pause", "replica": replica}
            if roll < 0.5:
                pause["until_ms"] = end
                faults.append(pause)
            elif roll < 0.8:
                faults.append(pause)
                faults.append({"at_ms": end, "action": "resume", "replica": replica})
            else:
                faults.append(pause)  # paused until the liveness phase

    for _ in range(rng.randint(1, 5) if network_kinds else 0):
        kind = rng.choice(network_kinds)
        start = rng.randint(0, horizon - 50)
        fault: dict[str, Any] = {"at_ms": start, "action": kind}
        if kind == "partition":
            members = list(range(replicas))
            rng.shuffle(members)
            listed = members[: rng.randint(2, replicas)]
            cut_count = rng.randint(1, min(2, len(listed) - 1))
            cuts = sorted(rng.sample(range(1, len(listed)), cut_count))
            bounds = [0, *cuts, len(listed)]
            groups = [sorted(listed[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
            fault["groups"] = groups
            if rng.random() < 0.4:
                fault["direction"] = "one-way"
        elif kind == "clock_skew":
            fault["replica"] = rng.randrange(replicas)
            fault["factor"] = rng.choice((0.1, 0.25, 0.5, 0.8, 1.5, 2.0, 4.0, 10.0))
        else:
            for key in ("from", "to"):
                endpoints = _endpoints(rng, replicas)
                if endpoints is not None:
                    fault[key] = endpoints
            if rng.random() < 0.5:
                fault["messages"] = sorted(
                    rng.sample(FUZZ_MESSAGE_TYPES, rng.randint(1, 3)),
                    key=FUZZ_MESSAGE_TYPES.index,
                )
            if kind == "delay":
                if rng.random() < 0.5:
                    fault["add_ms"] = rng.randint(1, 2 * timeout_ms)
                else:
                    fault["latency_ms"] = _latency(rng, 2 * timeout_ms)
            elif kind in ("drop", "duplicate"):
                fault["probability"] = rng.choice((0.05, 0.2, 0.5, 0.9, 1.0))
            else:
                fault["window_ms"] = rng.randint(1, 100)
        roll = rng.random()
        if roll < 0.6:
            fault["until_ms"] = rng.randint(start + 1, horizon + 200)
        faults.append(fault)
        if kind == "partition" and roll >= 0.6 and rng.random() < 0.5:
            faults.append({"at_ms": rng.randint(start + 1, horizon), "action": "heal"})

    faults.extend(storm_faults)
    faults.sort(key=lambda fault: fault["at_ms"])
    document: dict[str, Any] = {
        "name": f"fuzz-{seed}",
        "description": (
            f"Generated by `pbft fuzz --replicas {replicas}` (case seed {seed}): "
            f"{len(faults)} faults, {len(byzantine)} Byzantine, every fault healed at "
            f"{heal_all_at_ms} ms."
        ),
        "seed": rng.randrange(2**32),
        "cluster": cluster,
        "network": network,
        "workload": workload,
    }
    if faults:
        document["faults"] = faults
    if byzantine:
        document["byzantine"] = byzantine
    document["liveness"] = {
        "heal_all_at_ms": heal_all_at_ms,
        "within_ms": liveness_within_ms(timeout_ms)
        + backlog_drain_ms(cluster, network, workload, byzantine=bool(byzantine)),
    }
    document["expect"] = {"safety": True, "liveness": True}
    return document


# Behaviours of a Byzantine new primary that the restart storm pairs with restarts.
STORM_BEHAVIORS: tuple[tuple[str, str | None], ...] = (
    ("equivocate", None),
    ("bad_new_view", "refork"),
    ("bad_new_view", "split"),
    ("bad_new_view", "omit_prepared"),
)


def _restart_storm(
    seed: int,
    replicas: int,
    f: int,
    bound: _Intervals,
    byzantine: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    timeout_ms: int,
    horizon: int,
) -> None:
    """Some cases pair a Byzantine primary of view 1 with crash-restarts of up to 2f other
    replicas one at a time, right around the view change (the primary of view 0 is cut off
    to force it): a restarted backup must keep what the NEW-VIEW assigned, whatever the new
    primary offers it afterwards. Drawn from an RNG of its own, so the cases without a storm
    are the same as before it existed. Needs f >= 2 to stay within the fault bound (the
    Byzantine primary plus one replica down at a time)."""
    rng = random.Random(f"pbft-fuzz-storm/{replicas}/{seed}")
    if f < 2 or rng.random() >= 0.4 or horizon < 600:
        return
    primary = 1
    bound.add(primary, 0, FOREVER_MS, exclusive=False)
    behavior, kind = rng.choice(STORM_BEHAVIORS)
    entry: dict[str, Any] = {"replica": primary, "behavior": behavior}
    if kind is not None:
        entry["kind"] = kind
    byzantine.append(entry)
    cut_at = rng.randint(150, max(150, horizon // 3))
    others = [replica for replica in range(replicas) if replica != 0]
    faults.append(
        {
            "at_ms": cut_at,
            "until_ms": cut_at + rng.randint(2 * timeout_ms, 6 * timeout_ms),
            "action": "partition",
            "groups": [[0], others],
        }
    )
    # Entries the others prepare but only replica 0 commits (it executes them, then is cut
    # off): the NEW-VIEW of view 1 must re-propose them, and must keep them.
    faults.append(
        {
            "at_ms": max(0, cut_at - rng.randint(50, 300)),
            "until_ms": cut_at + rng.randint(timeout_ms, 4 * timeout_ms),
            "action": "drop",
            "to": others,
            "messages": ["COMMIT", "CHECKPOINT_STATE", "COMMIT_CERTIFICATE"],
            "probability": rng.choice((0.9, 1.0)),
        }
    )
    # Slow prepares keep the re-proposed entries open for a while after the NEW-VIEW.
    if rng.random() < 0.8:
        faults.append(
            {
                "at_ms": cut_at,
                "until_ms": cut_at + rng.randint(2 * timeout_ms, 6 * timeout_ms),
                "action": "drop",
                "messages": ["PREPARE"],
                "probability": rng.choice((0.5, 0.7, 0.9)),
            }
        )
    backups = [replica for replica in range(replicas) if replica not in (0, primary)]
    rng.shuffle(backups)
    at = cut_at + rng.randint(timeout_ms // 2, 2 * timeout_ms)
    for _ in range(rng.randint(1, 2)):
        for replica in backups[: 2 * f]:
            down_ms = rng.randint(5, 40)
            if at + down_ms >= horizon or not bound.fits(replica, at, at + down_ms):
                return
            bound.add(replica, at, at + down_ms)
            faults.append({"at_ms": at, "action": "crash", "replica": replica})
            faults.append({"at_ms": at + down_ms, "action": "restart", "replica": replica})
            at += down_ms + rng.randint(5, 60)


def liveness_within_ms(view_change_timeout_ms: int) -> int:
    """How long after the heal every payment must be decided: generous (several views)."""
    return 10 * view_change_timeout_ms + 3000


def capacity_per_s(cluster: dict[str, Any], network: dict[str, Any]) -> float:
    """A conservative estimate of how many payments a second a drawn configuration orders
    once the network is healed: one full batch per eight mean one-way delays (a batch takes
    about four: PRE-PREPARE, PREPARE, COMMIT and, when the window is full, CHECKPOINT; a
    quorum waits for the slower messages, and the rest is margin), one batch at a time (the
    chain rule makes batches prepare one after another), and a retransmission interval more
    per batch on a lossy network. A configuration such as batch_size = 1, watermark_window
    = 1 and ~25 ms latency orders about ten payments a second and is estimated at five."""
    latency = network["latency_ms"]
    if latency.get("dist") == "exponential":
        delay_ms = latency.get("min", 0) + latency["mean"]
    else:
        delay_ms = (latency["min"] + latency["max"]) / 2
    batch_ms = 8 * max(1.0, delay_ms)
    if network.get("drop"):
        batch_ms += cluster["retransmit_interval_ms"]
    return float(cluster["batch_size"] * 1000 / batch_ms)


def backlog_drain_ms(
    cluster: dict[str, Any],
    network: dict[str, Any],
    workload: dict[str, Any],
    *,
    byzantine: bool = False,
) -> int:
    """The time the liveness bound adds for a backlog: none while the offered rate is within
    the configuration's capacity (capacity_per_s), else the time to order every payment at
    that capacity.

    Of the two ways for the fuzzer not to call overload a liveness failure, this one: the
    bound accounts for the backlog, rather than drawing only configurations whose capacity
    covers the load. Overloaded cases stay in the swarm because they test something: a
    backlog behind a correct primary must not depose it (pbft/viewchanges.py judges
    progress, not age alone), and every payment must still be decided. The draws are
    unchanged (no random number is taken here), so every case seed names the same faults,
    behaviours and workload as before; only an overloaded case's within_ms grows.

    With a Byzantine replica or client the capacity counts half: a Byzantine client's extra
    requests are ordered too (a reuse_request_id client sends two bodies per id), and with a
    Byzantine replica every quorum waits for the slowest correct replica (case seed
    2371077635: a double-voting replica, a client reusing ids and a lagging replica ordered
    about 30 batches a second where 41 were estimated).

    The allowance is for a backlog behind a correct primary. When a Byzantine replica is in
    the case it may be the primary, and then the allowance would let it delay payments by
    as much unnoticed (review finding F5): generate_document lowers such a case's offered
    rate to its capacity (rate_within_capacity) instead, so no allowance is added, and a
    Byzantine primary slowing the backlog fails the plain liveness bound."""
    capacity = _capacity(cluster, network, byzantine)
    if workload["rate_per_s"] <= capacity:
        return 0
    return math.ceil(workload["payments"] * 1000 / capacity)


def _capacity(cluster: dict[str, Any], network: dict[str, Any], byzantine: bool) -> float:
    return capacity_per_s(cluster, network) / (2 if byzantine else 1)


def rate_within_capacity(
    cluster: dict[str, Any], network: dict[str, Any], workload: dict[str, Any]
) -> float | int:
    """The offered rate of a case with a Byzantine replica: the drawn one, or, if the
    configuration cannot order it (with a Byzantine party's halved capacity), the capacity
    rounded down to a hundredth (at least 0.01 a second)."""
    rate: float | int = workload["rate_per_s"]
    capacity = _capacity(cluster, network, True)
    if rate <= capacity:
        return rate
    return max(0.01, math.floor(capacity * 100) / 100)


def generate(seed: int, replicas: int = 4) -> str:
    """The scenario TOML of one case seed; the same seed always gives the same text."""
    text = to_toml(generate_document(seed, replicas))
    scenario = load_case(text, seed)
    if max_faulty(scenario) > scenario.fault_tolerance:
        raise FuzzError(f"case seed {seed}: generated more than f faulty replicas at once")
    return text


def load_case(text: str, seed: int) -> Scenario:
    try:
        return parse_scenario(text, f"<fuzz case {seed}>")
    except ValueError as error:
        raise FuzzError(f"case seed {seed}: generated an invalid scenario: {error}") from error


# --- running cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class CaseOutcome:
    seed: int
    verdict: str  # "ok" | "violated" | "error"
    # What failed, comparable between runs (see sim.shrink.failure_signature).
    signature: tuple[str, ...]
    problems: tuple[str, ...]
    wall_s: float


def run_case(seed: int, replicas: int) -> CaseOutcome:
    """Generate one case and run it (in a worker process)."""
    from sim.shrink import evaluate

    scenario = load_case(generate(seed, replicas), seed)
    started = time.perf_counter()
    evaluation = evaluate(scenario)
    verdict = "ok"
    if evaluation.signature:
        verdict = "error" if evaluation.signature[0].startswith("exception:") else "violated"
    return CaseOutcome(
        seed,
        verdict,
        evaluation.signature,
        evaluation.problems,
        time.perf_counter() - started,
    )


@dataclass
class FuzzReport:
    first_seed: int
    replicas: int
    runs: int = 0
    failures: list[CaseOutcome] = field(default_factory=list)
    wall_s: float = 0.0
    # The first failure, shrunk and written out.
    path: Path | None = None
    shrink_runs: int = 0
    original_text: str = ""
    shrunk_text: str = ""
    reproduced: bool = False


def fuzz(
    seed: int,
    replicas: int,
    budget_s: float,
    jobs: int,
    out_dir: str | os.PathLike[str],
    *,
    progress: Callable[[int, int, float], None] | None = None,
    max_runs: int | None = None,
    shrink_runs: int = 200,
    log: TextIO | None = None,
    on_failure: Callable[[], None] | None = None,
    executor: Executor | None = None,
) -> FuzzReport:
    """Run case seeds seed, seed + 1, ... until `budget_s` is spent (or `max_runs` ran) or
    a case fails; shrink the failing case with the lowest seed among those that finished
    and write it to out_dir/fuzz-<case seed>.toml. With `executor` (e.g. a dask cluster's)
    cases run there, `jobs` at a time; shrinking stays on this machine."""
    report = FuzzReport(seed, replicas)
    started = time.perf_counter()
    outcomes: dict[int, CaseOutcome] = {}

    def record(outcome: CaseOutcome) -> None:
        outcomes[outcome.seed] = outcome
        report.runs += 1
        if outcome.verdict != "ok":
            report.failures.append(outcome)
        if progress is not None:
            progress(report.runs, len(report.failures), time.perf_counter() - started)

    def more() -> bool:
        if report.failures:
            return False
        if max_runs is not None and report.runs + in_flight() >= max_runs:
            return False
        return time.perf_counter() - started < budget_s

    seeds: Iterator[int] = iter(range(seed, 2**63))
    if executor is None and jobs <= 1:

        def in_flight() -> int:
            return 0

        while more():
            record(run_case(next(seeds), replicas))
    else:
        pool = executor if executor is not None else ProcessPoolExecutor(max_workers=jobs)
        with pool:
            pending: dict[Future[CaseOutcome], int] = {}

            def in_flight() -> int:
                return len(pending)

            while True:
                while len(pending) < jobs and more():
                    case = next(seeds)
                    pending[pool.submit(run_case, case, replicas)] = case
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    del pending[future]
                    record(future.result())
    report.wall_s = time.perf_counter() - started
    if report.failures:
        report.failures.sort(key=lambda outcome: outcome.seed)
        if on_failure is not None:
            on_failure()
        # Shrinking runs here: no more local processes than cores, whatever the cluster.
        local_jobs = jobs if executor is None else min(jobs, os.cpu_count() or 1)
        _shrink_and_write(report, report.failures[0], out_dir, shrink_runs, local_jobs, log)
    return report


def _shrink_and_write(
    report: FuzzReport,
    failure: CaseOutcome,
    out_dir: str | os.PathLike[str],
    shrink_runs: int,
    jobs: int,
    log: TextIO | None,
) -> None:
    from sim.scenario import load_scenario
    from sim.shrink import evaluate, shrink

    text = generate(failure.seed, report.replicas)
    report.original_text = text
    result = shrink(
        text,
        failure.signature,
        max_runs=shrink_runs,
        jobs=jobs,
        log=log,
    )
    report.shrink_runs = result.runs
    document = tomllib.loads(result.text)
    document["description"] = (
        f"Case seed {failure.seed} of `pbft fuzz --replicas {report.replicas}`, shrunk by "
        f"{len(result.steps)} simplifications in {result.runs} runs. Fails with: "
        f"{', '.join(failure.signature)}."
    )
    report.shrunk_text = to_toml(document)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fuzz-{failure.seed}.toml"
    header = (
        f"# Found by `pbft fuzz --seed {report.first_seed} --replicas {report.replicas}` "
        f"(case seed {failure.seed}) and shrunk in {result.runs} runs.\n"
        f"# Fails with: {', '.join(failure.signature)}\n"
        f"# Replay: pbft run {path}\n"
    )
    path.write_text(header + report.shrunk_text, encoding="utf-8")
    report.path = path
    report.reproduced = evaluate(load_scenario(path)).signature == failure.signature


def summarize(report: FuzzReport, stream: TextIO | None = None) -> None:
    stream = stream if stream is not None else sys.stdout
    last = report.first_seed + max(0, report.runs - 1)
    print(
        f"fuzz       case seeds {report.first_seed}..{last}  replicas {report.replicas}",
        file=stream,
    )
    print(f"runs       {report.runs}", file=stream)
    print(f"failures   {len(report.failures)}", file=stream)
    print(f"time       {report.wall_s:.1f} s", file=stream)
    for outcome in report.failures:
        print(
            f"  case seed {outcome.seed}: {outcome.verdict}: {'; '.join(outcome.problems)}",
            file=stream,
        )
    if report.path is not None:
        before = _size(report.original_text)
        after = _size(report.shrunk_text)
        print(f"shrunk     in {report.shrink_runs} runs: {before} -> {after}", file=stream)
        print(f"wrote      {report.path}", file=stream)
        state = "yes" if report.reproduced else "NO (the shrunk file fails differently)"
        print(f"reproduces {state}", file=stream)
        print(f"replay     pbft run {report.path}", file=stream)


def _size(text: str) -> str:
    scenario = parse_scenario(text)
    return (
        f"{len(scenario.faults)} faults, {len(scenario.byzantine)} Byzantine, "
        f"{scenario.workload.payments} payments"
    )
