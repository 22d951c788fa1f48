"""The fault bound over a scenario's time: which replicas are faulty when, and the most at
once. The fuzzer generates within it; the shrinker never leaves it."""

from __future__ import annotations

from sim.scenario import Scenario


def faulty_over_time(scenario: Scenario) -> list[tuple[int, frozenset[int]]]:
    """The faulty replicas after each replica fault takes effect, as (time ms, replicas).

    Byzantine replicas are faulty for the whole run. A crashed replica is faulty until it
    restarts, a paused one until it resumes (by a `resume` fault or its until_ms), and
    both until the liveness phase (which restarts and resumes everything). A wiped restart
    makes a replica faulty for the rest of the run. Faults the simulator skips (from the
    liveness phase on) are skipped here too. Simultaneous events are taken in the order
    that counts the most faults at once: a fault before a derived end (until_ms)."""
    byzantine = frozenset(
        entry.replica for entry in scenario.byzantine if entry.replica is not None
    )
    heal_ms = scenario.liveness.heal_all_at_ms if scenario.liveness is not None else None
    # (time, phase, order, action, replica, wipe); phase 0: faults as listed, 1: derived ends
    events: list[tuple[int, int, int, str, int | None, bool]] = []
    for order, fault in enumerate(scenario.faults):
        if heal_ms is not None and fault.at_ms >= heal_ms:
            continue
        events.append((fault.at_ms, 0, order, fault.action, fault.replica, fault.wipe))
        if fault.action == "pause" and fault.until_ms is not None:
            events.append((fault.until_ms, 1, order, "resume", fault.replica, False))
    if heal_ms is not None:
        events.append((heal_ms, 1, len(events), "heal_all", None, False))
    events.sort(key=lambda event: event[:3])
    # Dicts as ordered sets: the simulator's packages build no hash-ordered sets.
    crashed: dict[int, None] = {}
    paused: dict[int, None] = {}
    wiped: dict[int, None] = {}
    timeline = [(0, byzantine)]
    for at_ms, _, _, action, replica, wipe in events:
        if action == "heal_all":
            crashed.clear()
            paused.clear()
        elif replica is None:
            continue
        elif action == "crash":
            crashed[replica] = None
            paused.pop(replica, None)
        elif action == "restart":
            if wipe:
                wiped[replica] = None
                paused.pop(replica, None)
            crashed.pop(replica, None)
        elif action == "pause":
            paused[replica] = None
        elif action == "resume":
            paused.pop(replica, None)
        else:
            continue
        timeline.append(
            (at_ms, byzantine | frozenset(crashed) | frozenset(paused) | frozenset(wiped))
        )
    return timeline


def max_faulty(scenario: Scenario) -> int:
    """The most replicas faulty at any one time (see `faulty_over_time`)."""
    return max(len(replicas) for _, replicas in faulty_over_time(scenario))
