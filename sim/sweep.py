"""Run one scenario under many seeds, in parallel processes, and report every failing seed.

Each seed is an independent, deterministic simulation, so a failing seed replays
exactly with `pbft run FILE --seed N`. Workers are separate processes (the
simulator is CPU-bound Python); results are reported in seed order whatever the
order they finished in.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from sim.scenario import Scenario, load_scenario, parse_scenario
from sim.simulator import run_scenario

MAX_SEEDS = 1_000_000


class SeedRangeError(ValueError):
    pass


@dataclass(frozen=True)
class SeedOutcome:
    seed: int
    verdict: str  # "ok" | "violated" | "error"
    problems: tuple[str, ...]
    trace_hash: str
    wall_s: float
    # Simulated confirmation latency and the highest view reached; None/0 for an error.
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    view_changes: int = 0


def parse_seeds(text: str) -> list[int]:
    """`0..999` (inclusive), `5`, or a comma list of either: `1,4,10..12`."""
    seeds: dict[int, None] = {}
    for part in text.split(","):
        part = part.strip()
        try:
            if ".." in part:
                low_text, high_text = part.split("..", 1)
                low, high = int(low_text), int(high_text)
                if low > high:
                    raise SeedRangeError(f"{part!r}: the range is empty")
                if high - low + 1 + len(seeds) > MAX_SEEDS:
                    raise SeedRangeError(f"more than {MAX_SEEDS} seeds")
                seeds.update(dict.fromkeys(range(low, high + 1)))
            else:
                seeds[int(part)] = None
        except ValueError as error:
            if isinstance(error, SeedRangeError):
                raise
            raise SeedRangeError(f"{part!r} is not a seed or a range like 0..99") from None
    for seed in seeds:
        if not 0 <= seed < 2**63:
            raise SeedRangeError(f"seed {seed} is not in 0..2**63-1")
    return list(seeds)


def run_one(scenario: Scenario, seed: int) -> SeedOutcome:
    started = time.perf_counter()
    try:
        result = run_scenario(scenario, seed)
    except Exception as error:  # a crash is a finding, reported with its seed
        return SeedOutcome(
            seed, "error", (f"{type(error).__name__}: {error}",), "", time.perf_counter() - started
        )
    return SeedOutcome(
        seed,
        result.verdict,
        tuple(result.expectation_failures),
        result.trace_hash,
        time.perf_counter() - started,
        result.latency_ms["p50"],
        result.latency_ms["p99"],
        result.view_changes,
    )


def _run_from_file(path: str, seed: int) -> SeedOutcome:
    return run_one(load_scenario(path), seed)


def _run_from_text(text: str, source: str, seed: int) -> SeedOutcome:
    # For remote workers: they get the scenario itself, not a path on this machine.
    return run_one(parse_scenario(text, source), seed)


def sweep(
    path: str,
    seeds: Sequence[int],
    jobs: int,
    progress: Callable[[int, int, int], None] | None = None,
    executor: Executor | None = None,
) -> list[SeedOutcome]:
    """Every seed's outcome, in the order of `seeds`.

    With `executor` (e.g. a dask cluster's), seeds run there, `jobs` tasks at a time;
    otherwise in `jobs` local processes (in this process if jobs <= 1)."""
    outcomes: dict[int, SeedOutcome] = {}
    failures = 0
    if executor is None and jobs <= 1:
        scenario = load_scenario(path)
        for seed in seeds:
            outcome = run_one(scenario, seed)
            outcomes[seed] = outcome
            failures += outcome.verdict != "ok"
            if progress:
                progress(len(outcomes), len(seeds), failures)
        return [outcomes[seed] for seed in seeds]
    text = ""
    if executor is not None:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    pool = executor if executor is not None else ProcessPoolExecutor(max_workers=jobs)

    def submit(seed: int) -> Future[SeedOutcome]:
        if executor is not None:
            return pool.submit(_run_from_text, text, path, seed)
        return pool.submit(_run_from_file, path, seed)

    with pool:
        pending: dict[Future[SeedOutcome], int] = {}
        queue: Iterator[int] = iter(seeds)
        # Keep a bounded number of tasks in flight: a million seeds never sit in memory at once.
        for seed in _take(queue, 4 * max(1, jobs)):
            pending[submit(seed)] = seed
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                seed = pending.pop(future)
                outcome = future.result()
                outcomes[seed] = outcome
                failures += outcome.verdict != "ok"
                if progress:
                    progress(len(outcomes), len(seeds), failures)
                for next_seed in _take(queue, 1):
                    pending[submit(next_seed)] = next_seed
    return [outcomes[seed] for seed in seeds]


def _take(iterator: Iterator[int], count: int) -> list[int]:
    taken = []
    for _ in range(count):
        try:
            taken.append(next(iterator))
        except StopIteration:
            break
    return taken


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def report(path: str, outcomes: Sequence[SeedOutcome], stream: TextIO | None = None) -> None:
    stream = stream if stream is not None else sys.stdout
    counts: dict[str, int] = {"ok": 0, "violated": 0, "error": 0}
    for outcome in outcomes:
        counts[outcome.verdict] += 1
    total_wall = sum(outcome.wall_s for outcome in outcomes)
    print(f"scenario   {path}", file=stream)
    print(f"seeds      {len(outcomes)}  (cpu {total_wall:.1f} s)", file=stream)
    print("verdict    count", file=stream)
    for verdict, count in counts.items():
        print(f"{verdict:<10} {count}", file=stream)
    failing = [outcome for outcome in outcomes if outcome.verdict != "ok"]
    if failing:
        print("\nfailing seeds (each line replays one):", file=stream)
        for outcome in failing:
            problems = "; ".join(outcome.problems)
            print(f"  seed {outcome.seed}: {outcome.verdict}: {problems}", file=stream)
            print(f"    pbft run {path} --seed {outcome.seed}", file=stream)


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    return {
        "min": round(float(array.min()), 3),
        "median": round(float(np.median(array)), 3),
        "max": round(float(array.max()), 3),
    }


def document(path: str, outcomes: Sequence[SeedOutcome]) -> dict[str, Any]:
    """The sweep as one JSON-ready document: every seed, and the spread across seeds."""
    counts: dict[str, int] = {"ok": 0, "violated": 0, "error": 0}
    for outcome in outcomes:
        counts[outcome.verdict] += 1
    ran = [outcome for outcome in outcomes if outcome.verdict != "error"]
    p50 = [o.latency_p50_ms for o in ran if o.latency_p50_ms is not None]
    p99 = [o.latency_p99_ms for o in ran if o.latency_p99_ms is not None]
    return {
        "scenario": path,
        "seeds": len(outcomes),
        "verdicts": counts,
        "spread": {
            "latency_p50_ms": _spread(p50),
            "latency_p99_ms": _spread(p99),
            "view_changes": _spread([o.view_changes for o in ran]),
        },
        "per_seed": [
            {
                "seed": o.seed,
                "verdict": o.verdict,
                "problems": list(o.problems),
                "trace_hash": o.trace_hash,
                "latency_p50_ms": o.latency_p50_ms,
                "latency_p99_ms": o.latency_p99_ms,
                "view_changes": o.view_changes,
                "wall_s": round(o.wall_s, 3),
            }
            for o in outcomes
        ],
    }
