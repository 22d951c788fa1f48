"""Shrinking a failing scenario: greedy delta debugging over the scenario's structure.

Starting from a failing scenario file, try one simplification at a time: remove a fault or
a Byzantine replica (all of them at once first, then one by one), drop the liveness phase
(only for a failure that is not a liveness failure), halve the payments, take away clients
and accounts, calm the network, shorten fault windows and move them earlier, lower their
probabilities, reset cluster parameters to their defaults. A change is kept when the
scenario still fails *the same way*: the same set of violated checks, or the same
exception type (see `failure_signature`). Then start again from the first simplification,
until none helps or the run budget is spent.

Every candidate is TOML text read back with `sim.scenario.parse_scenario`, with the same
seed inside, so the result replays with `pbft run FILE`. A candidate that is invalid, or
puts more replicas at fault at once than the original did (say, dropping the restart of a
crashed replica while another crashes later), is never run.
"""

from __future__ import annotations

import copy
import tomllib
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from sim.checkers import SAFETY_CHECKS
from sim.faultbound import max_faulty
from sim.scenario import Scenario, ScenarioError, WorkloadSpec, parse_scenario, to_toml
from sim.simulator import run_scenario

Document = dict[str, Any]


@dataclass(frozen=True)
class Evaluation:
    # Empty: the scenario's expectations hold. Otherwise what failed, e.g.
    # ("safety:agreement", "liveness") or ("exception:KeyError",).
    signature: tuple[str, ...]
    problems: tuple[str, ...]


def failure_signature(scenario: Scenario) -> tuple[str, ...]:
    return evaluate(scenario).signature


def evaluate(scenario: Scenario) -> Evaluation:
    """Run the scenario (its own seed) and say how it fails, comparably between runs."""
    try:
        result = run_scenario(scenario)
    except Exception as error:  # a crash of the simulated system is a finding
        where = traceback.extract_tb(error.__traceback__)[-1]
        problem = f"{type(error).__name__}: {error} ({where.filename}:{where.lineno})"
        return Evaluation((f"exception:{type(error).__name__}",), (problem,))
    signature: list[str] = []
    expect = scenario.expect
    broken = [name for name in SAFETY_CHECKS if not result.checks[name].ok]
    if expect.safety:
        signature.extend(f"safety:{name}" for name in broken)
    elif not broken:
        signature.append("no-safety-violation")
    if expect.liveness and not result.checks["liveness"].ok:
        signature.append("liveness")
    problems = dict.fromkeys(result.expectation_failures)
    for name, check in result.checks.items():
        if not check.ok:
            problems.update(dict.fromkeys(f"{name}: {detail}" for detail in check.details[:2]))
    return Evaluation(tuple(sorted(signature)), tuple(problems))


def _evaluate_text(text: str) -> tuple[str, ...]:
    return evaluate(parse_scenario(text, "<shrink candidate>")).signature


@dataclass(frozen=True)
class ShrinkResult:
    text: str
    signature: tuple[str, ...]
    runs: int
    # Simplifications kept, in order, e.g. "remove faults[2]".
    steps: tuple[str, ...]


def shrink(
    text: str,
    signature: tuple[str, ...] | None = None,
    *,
    max_runs: int = 200,
    jobs: int = 1,
    log: TextIO | None = None,
    valid: Callable[[Scenario], bool] | None = None,
) -> ShrinkResult:
    """The smallest scenario found that fails like `text` (whose failure is `signature`;
    None: run it once to find out). `valid` may refuse candidates besides the fault bound.
    With jobs > 1, candidates are tried `jobs` at a time and the first one in order that
    still fails is kept: the result is the one a single process finds, only sooner."""

    current_scenario = parse_scenario(text, "<shrink input>")
    runs = 0
    if signature is None:
        signature = failure_signature(current_scenario)
        runs += 1
    if not signature:
        raise ValueError("the scenario does not fail: nothing to shrink")
    bound = max(current_scenario.fault_tolerance, max_faulty(current_scenario))
    current: Document = tomllib.loads(text)
    current_text = to_toml(current)
    tried = {current_text: None}
    steps: list[str] = []
    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None

    def acceptable(candidate_text: str) -> bool:
        try:
            scenario = parse_scenario(candidate_text, "<shrink candidate>")
        except ScenarioError:
            return False
        if max_faulty(scenario) > bound:
            return False
        return valid is None or valid(scenario)

    try:
        improved = True
        while improved and runs < max_runs:
            improved = False
            candidates = _candidates(current, signature)
            exhausted = False
            while not improved and not exhausted and runs < max_runs:
                batch: list[tuple[str, str, Document]] = []
                while len(batch) < max(1, jobs) and runs + len(batch) < max_runs:
                    try:
                        description, candidate = next(candidates)
                    except StopIteration:
                        exhausted = True
                        break
                    candidate_text = to_toml(candidate)
                    if candidate_text in tried:
                        continue
                    tried[candidate_text] = None
                    if acceptable(candidate_text):
                        batch.append((description, candidate_text, candidate))
                if not batch:
                    break
                if pool is not None:
                    results = list(pool.map(_evaluate_text, [item[1] for item in batch]))
                else:
                    results = [_evaluate_text(item[1]) for item in batch]
                runs += len(batch)
                for (description, candidate_text, candidate), result in zip(
                    batch, results, strict=True
                ):
                    if result == signature:
                        current, current_text = candidate, candidate_text
                        steps.append(description)
                        improved = True
                        if log is not None:
                            log.write(f"shrink: kept {description} ({runs} runs)\n")
                            log.flush()
                        break
    finally:
        if pool is not None:
            pool.shutdown()
    return ShrinkResult(current_text, signature, runs, tuple(steps))


# --- candidates ---------------------------------------------------------------------------


def _with(document: Document, change: Callable[[Document], None]) -> Document:
    candidate = copy.deepcopy(document)
    change(candidate)
    return candidate


def _candidates(document: Document, signature: tuple[str, ...]) -> Iterator[tuple[str, Document]]:
    """Simplifications of `document`, boldest first."""
    faults: list[Document] = document.get("faults", [])
    byzantine: list[Document] = document.get("byzantine", [])

    def remove_all(key: str) -> Callable[[Document], None]:
        return lambda d: d.pop(key, None)

    def remove_range(key: str, low: int, high: int) -> Callable[[Document], None]:
        def change(d: Document) -> None:
            del d[key][low:high]
            if not d[key]:
                del d[key]

        return change

    # Whole groups first (delta debugging's coarse steps), then halves, then one at a time.
    for key, entries in (("faults", faults), ("byzantine", byzantine)):
        if entries:
            yield f"remove every {key} entry", _with(document, remove_all(key))
        if len(entries) >= 4:
            half = len(entries) // 2
            yield f"remove {key}[0:{half}]", _with(document, remove_range(key, 0, half))
            yield f"remove {key}[{half}:]", _with(document, remove_range(key, half, len(entries)))
    for key, entries in (("faults", faults), ("byzantine", byzantine)):
        for index in range(len(entries)):
            yield f"remove {key}[{index}]", _with(document, remove_range(key, index, index + 1))

    liveness_failure = "liveness" in signature
    if "liveness" in document and not liveness_failure:
        yield "remove the liveness phase", _with(document, remove_all("liveness"))

    workload: Document = document.get("workload", {})
    payments = workload.get("payments", WorkloadSpec().payments)
    if payments > 1:
        for smaller in (payments // 2, payments * 3 // 4, payments - 1):
            if 1 <= smaller < payments:
                yield f"payments {smaller}", _with(document, _set("workload", "payments", smaller))
    clients = workload.get("clients", WorkloadSpec().clients)
    if clients > 1:
        for fewer in (1, clients // 2, clients - 1):
            if 1 <= fewer < clients:
                yield f"clients {fewer}", _with(document, _set("workload", "clients", fewer))
    accounts = workload.get("accounts", WorkloadSpec().accounts)
    if accounts > 2:
        for fewer in (2, accounts // 2, accounts - 1):
            if 2 <= fewer < accounts:
                yield f"accounts {fewer}", _with(document, _set("workload", "accounts", fewer))

    network: Document = document.get("network", {})
    for key in ("drop", "duplicate"):
        if network.get(key):
            yield f"network.{key} 0", _with(document, _unset("network", key))
            yield (
                f"network.{key} halved",
                _with(document, _set("network", key, round(network[key] / 2, 4))),
            )
    if "latency_ms" in network:
        yield "default latency", _with(document, _unset("network", "latency_ms"))

    for index, fault in enumerate(faults):
        yield from _fault_candidates(document, "faults", index, fault)
    for index, entry in enumerate(byzantine):
        yield from _window_candidates(document, "byzantine", index, entry)

    liveness: Document | None = document.get("liveness")
    if liveness is not None:
        latest = max((fault["at_ms"] for fault in faults), default=0)
        heal = liveness["heal_all_at_ms"]
        earlier = max(latest + 1, heal // 2)
        if earlier < heal:
            yield (
                f"liveness.heal_all_at_ms {earlier}",
                _with(document, _set("liveness", "heal_all_at_ms", earlier)),
            )

    for key in ("cluster", "network", "workload"):
        table: Document = document.get(key, {})
        for field_name in list(table):
            if key == "cluster" and field_name == "replicas":
                continue
            default = _SIZE_DEFAULTS.get((key, field_name))
            if default is not None and default >= table[field_name]:
                continue  # the default is bigger, not simpler
            yield f"default {key}.{field_name}", _with(document, _unset(key, field_name))


# Defaults of the workload's size fields (sim.scenario.WorkloadSpec): resetting one of
# these to a bigger default is no simplification.
_SIZE_DEFAULTS = {
    ("workload", "payments"): WorkloadSpec().payments,
    ("workload", "clients"): WorkloadSpec().clients,
    ("workload", "accounts"): WorkloadSpec().accounts,
}


def _set(table: str, key: str, value: Any) -> Callable[[Document], None]:
    def change(document: Document) -> None:
        document.setdefault(table, {})[key] = value

    return change


def _unset(table: str, key: str) -> Callable[[Document], None]:
    def change(document: Document) -> None:
        document.get(table, {}).pop(key, None)
        if table in document and not document[table]:
            del document[table]

    return change


def _entry_change(
    key: str, index: int, change: Callable[[Document], None]
) -> Callable[[Document], None]:
    def apply(document: Document) -> None:
        change(document[key][index])

    return apply


def _window_candidates(
    document: Document, key: str, index: int, entry: Document
) -> Iterator[tuple[str, Document]]:
    """Shorter windows and earlier times for an entry with at_ms (and maybe until_ms)."""
    at_ms = entry.get("at_ms", 0)
    until_ms = entry.get("until_ms")
    name = f"{key}[{index}]"
    if until_ms is not None and until_ms - at_ms > 1:
        shorter = at_ms + (until_ms - at_ms) // 2

        def shorten(e: Document, value: int = shorter) -> None:
            e["until_ms"] = value

        yield f"{name}.until_ms {shorter}", _with(document, _entry_change(key, index, shorten))
    if at_ms > 0:
        earlier = at_ms // 2

        def move(e: Document, value: int = earlier, delta: int = at_ms - earlier) -> None:
            if value == 0 and key == "byzantine":
                e.pop("at_ms", None)
            else:
                e["at_ms"] = value
            if "until_ms" in e:
                e["until_ms"] -= delta

        yield f"{name}.at_ms {earlier}", _with(document, _entry_change(key, index, move))


def _fault_candidates(
    document: Document, key: str, index: int, fault: Document
) -> Iterator[tuple[str, Document]]:
    yield from _window_candidates(document, key, index, fault)
    name = f"{key}[{index}]"
    probability = fault.get("probability")
    if probability:
        lower = round(probability / 2, 4)

        def lower_probability(e: Document, value: float = lower) -> None:
            e["probability"] = value

        yield (
            f"{name}.probability {lower}",
            _with(document, _entry_change(key, index, lower_probability)),
        )
    add_ms = fault.get("add_ms")
    if add_ms:
        smaller = add_ms // 2 if isinstance(add_ms, int) else round(add_ms / 2, 3)

        def lower_delay(e: Document, value: float = smaller) -> None:
            e["add_ms"] = value

        yield f"{name}.add_ms {smaller}", _with(document, _entry_change(key, index, lower_delay))
    if fault.get("direction") == "one-way":

        def both_ways(e: Document) -> None:
            e.pop("direction", None)

        yield f"{name} both ways", _with(document, _entry_change(key, index, both_ways))
    if fault.get("wipe"):

        def keep_disk(e: Document) -> None:
            e.pop("wipe", None)

        yield f"{name} without wipe", _with(document, _entry_change(key, index, keep_disk))
