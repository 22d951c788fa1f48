"""Scenario documents written back as TOML: fuzz cases and shrunk reproducers.

Hand-written for now (a few dozen lines for the subset scenarios use: strings, integers,
floats, booleans, arrays, tables, arrays of tables); the guide's choice is tomli-w, and
moving to it changes the text of every reproducer written from then on (not the scenarios
they load as), so it is its own step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any


class ScenarioTomlError(ValueError):
    """A value that has no place in a scenario file (a NaN, an object)."""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ScenarioTomlError(f"cannot write {value!r} to a scenario file")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(key)} = {_toml_value(item)}" for key, item in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ScenarioTomlError(f"cannot write a {type(value).__name__} to a scenario file")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(document: Mapping[str, Any]) -> str:
    """A scenario document (plain dicts and lists, as tomllib returns them) as TOML text.

    Top-level values first, then each table ([cluster], ...) and array of tables
    ([[faults]], ...) in the document's order. Values inside tables are written inline."""
    lines: list[str] = []
    for key, value in document.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in document.items():
        if isinstance(value, Mapping):
            lines.append("")
            lines.append(f"[{_toml_key(key)}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        elif _is_table_array(value):
            for table in value:
                lines.append("")
                lines.append(f"[[{_toml_key(key)}]]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
