"""Checking the values of a parsed scenario document: ScenarioError names the field by its
dotted path and shows what it found; ValueReader holds the checks of single values."""

from __future__ import annotations

import datetime
import difflib
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, TypeGuard

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


def describe(value: object) -> str:
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
    return f"{kind} {show(value)}"


def show(value: object) -> str:
    """A short rendering of a value for an error message."""
    # str() of an int beyond 4300 digits raises, and hex TOML integers can be that long.
    if is_integer(value) and value.bit_length() > _LONGEST_SHOWN_INTEGER_BITS:
        return f"<{value.bit_length()}-bit integer>"
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    if len(shown) > _LONGEST_SHOWN_VALUE:
        shown = shown[: _LONGEST_SHOWN_VALUE - 3] + "..."
    return shown


def key_path(parent: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else repr(key)
    return f"{parent}.{shown}" if parent else shown


def is_integer(value: object) -> TypeGuard[int]:
    # TOML booleans are Python bools, which are ints; `true` must never pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


class ValueReader:
    """Checks values of one parsed document; every method raises ScenarioError at the first
    problem."""

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
                raise self.error(key_path(path, key), f"unknown key; {hint}")

    def required(self, table: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in table:
            raise self.error(key_path(path, key), "required")
        return table[key]

    def table(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {describe(value)}")
        return value

    def array_of_tables(self, value: object, path: str) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise self.error(
                path, f"expected an array of tables ([[{path}]]), got {describe(value)}"
            )
        return [self.table(item, f"{path}[{index}]") for index, item in enumerate(value)]

    def integer(self, value: object, path: str, low: int, high: int | None) -> int:
        if not is_integer(value):
            raise self.error(path, f"expected an integer, got {describe(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"in {low}..{high}" if high is not None else f"at least {low}"
            raise self.error(path, f"must be {bounds}, got {show(value)}")
        return value

    def number(self, value: object, path: str) -> float:
        """A finite float; integers are accepted wherever a float is expected."""
        if isinstance(value, float):
            number = value
        elif is_integer(value):
            # TOML integers are unbounded in tomllib; one too large for a float is infinite.
            number = float(value) if abs(value) <= _LARGEST_FLOAT_INTEGER else math.inf
        else:
            raise self.error(path, f"expected a number, got {describe(value)}")
        if not math.isfinite(number):
            raise self.error(path, f"must be finite, got {describe(value)}")
        return number

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {describe(value)}")
        return value

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {describe(value)}")
        return value

    def choice(self, value: object, path: str, choices: tuple[str, ...]) -> str:
        text = self.string(value, path)
        if text not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    def check(self, condition: bool, path: str, problem: str) -> None:
        if not condition:
            raise self.error(path, problem)

    def replica_id(self, value: object, path: str, replicas: int) -> int:
        if not is_integer(value):
            raise self.error(path, f"expected a replica id (integer), got {describe(value)}")
        self.check(
            0 <= value < replicas,
            path,
            f"replica {show(value)} does not exist: cluster.replicas = {replicas}, ids are "
            f"0..{replicas - 1}",
        )
        return value

    def probability(self, value: object, path: str) -> float:
        # 1 is excluded: a link that loses or repeats every message forever is no network.
        probability = self.number(value, path)
        self.check(0 <= probability < 1, path, f"must be in [0, 1), got {probability}")
        return probability

    def groups(self, value: object, path: str, replicas: int) -> tuple[tuple[int, ...], ...]:
        if not isinstance(value, list):
            raise self.error(
                path, f"expected an array of arrays of replica ids, got {describe(value)}"
            )
        self.check(len(value) >= 2, path, f"needs at least 2 groups, got {len(value)}")
        seen: dict[int, int] = {}
        groups: list[tuple[int, ...]] = []
        for group_index, group in enumerate(value):
            group_path = f"{path}[{group_index}]"
            if not isinstance(group, list):
                raise self.error(
                    group_path, f"expected an array of replica ids, got {describe(group)}"
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

    def window(self, table: dict[str, Any], path: str) -> tuple[int, int | None]:
        at_ms = self.integer(table.get("at_ms", 0), f"{path}.at_ms", 0, None)
        until_ms = None
        if "until_ms" in table:
            until_ms = self.integer(table["until_ms"], f"{path}.until_ms", 0, None)
            self.check(
                until_ms > at_ms,
                f"{path}.until_ms",
                f"must be after at_ms ({show(at_ms)}), got {show(until_ms)}",
            )
        return at_ms, until_ms
