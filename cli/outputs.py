"""Checks on a file a command will write when it is done (a receipt, a JSON report): made
before any work starts, so a mistake costs one line and exit 2, not the work."""

from __future__ import annotations

import os
from pathlib import Path


def output_file_problem(option: str, name: str | None) -> str | None:
    """What is wrong with writing `name` later, as one line naming `option`; None if nothing."""
    if name is None:
        return None
    if not name:
        return f"{option}: an empty file name"
    path = Path(name)
    parent = path.parent
    if path.is_dir():
        return f"{option}: {name} is a directory, not a file"
    if not parent.is_dir():
        return f"{option}: the directory {parent} does not exist"
    writable = os.access(parent, os.W_OK | os.X_OK)
    if not writable or (path.exists() and not os.access(path, os.W_OK)):
        return f"{option}: {name} is not writable"
    return None
