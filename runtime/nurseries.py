"""Handing back what ended a nursery as if there were no nursery.

A long-lived object that runs its tasks in a nursery (the transport, a replica node) should
raise what stopped it (a halt, a failed write, the owner's own exception) unwrapped, not in
a one-member ExceptionGroup: callers catch `ReplicaHalted`, not a group holding it.
"""

from __future__ import annotations

from typing import NoReturn


def raise_lone(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the group's only exception with its own cause and context (re-raising it
    here would otherwise overwrite them); a group of several is raised as it is."""
    if len(group.exceptions) != 1:
        raise group
    error = group.exceptions[0]
    cause, context = error.__cause__, error.__context__
    suppress = error.__suppress_context__
    try:
        raise error  # its cause and context are restored below
    finally:
        error.__cause__, error.__context__ = cause, context
        error.__suppress_context__ = suppress
