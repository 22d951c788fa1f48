"""Exit codes of the `pbft` commands, and unwrapping the exception behind one.

Every command: 0 ok, 2 a user mistake (bad arguments or files: one line, never a
traceback), 3 an internal error (a bug), 130 interrupted (Ctrl-C). The scenario commands
exit 1 when an expectation does not hold; pay and balance exit 1 when the answer is no and 4
when no decision came within the timeout; `pbft replica` has its own 4 to 7. Each
command's --help lists its own.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VIOLATED = 1  # run, sweep, fuzz: an expectation does not hold
EXIT_NO = 1  # pay: rejected; balance: no such account; cluster up: every replica stopped
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_NO_DECISION = 4  # pay, balance: no decision within the timeout
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT

# `pbft replica`: one code per way it stops, so a supervisor can tell them apart.
EXIT_REPLICA_LOCKED = 4
EXIT_STORAGE_FAILED = 5
EXIT_STORAGE_CORRUPT = 6
EXIT_REPLICA_HALTED = 7


def leaf(raised: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of one of `kinds` inside (possibly nested) exception groups."""
    if isinstance(raised, kinds):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            found = leaf(inner, kinds)
            if found is not None:
                return found
    return None
