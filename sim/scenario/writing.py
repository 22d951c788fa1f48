"""Scenario documents written back as TOML: fuzz cases and shrunk reproducers.

The text comes from tomli-w; what it writes loads back (tomllib) to the same document.
Values a scenario file cannot hold (a NaN, an infinity, an object) are refused here with
ScenarioTomlError rather than written as something the loader would reject later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tomli_w


class ScenarioTomlError(ValueError):
    """A value that has no place in a scenario file (a NaN, an object)."""


def _check(value: Any) -> None:
    if isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ScenarioTomlError(f"cannot write {value!r} to a scenario file")
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check(item)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ScenarioTomlError(f"cannot write the key {key!r} to a scenario file")
            _check(item)
        return
    raise ScenarioTomlError(f"cannot write a {type(value).__name__} to a scenario file")


def to_toml(document: Mapping[str, Any]) -> str:
    """A scenario document (plain dicts and lists, as tomllib returns them) as TOML text:
    top-level values first, then each table ([cluster], ...) and array of tables
    ([[faults]], ...) in the document's order."""
    _check(document)
    return tomli_w.dumps(document)
