"""One timer type for the replica, after TigerBeetle's `Timeout`.

A timeout is named, measured in ms of the driver's clock (the cores have no other
time), and either stopped or running since `started_ms`. It fires once `after_ms`
have passed since it started: `now_ms - started_ms >= after_ms`, the comparison every
timer of the replica used before there was this type, so firing times are unchanged.
Firing does not stop it: the owner's `on_<name>_timeout` decides whether to restart,
stop or leave it (a timer left running fires again on the next tick).

`after_ms` may change while the timeout runs (`backoff`): the new duration counts
from the same start. The replica's view-change backoff doubles several timeouts at
once, so the doubling count lives with the replica and is pushed into each timeout.
"""

from __future__ import annotations


class Timeout:
    __slots__ = ("after_ms", "base_ms", "name", "started_ms")

    def __init__(self, name: str, base_ms: int, *, started_ms: int | None = None) -> None:
        if base_ms < 0:
            raise ValueError(f"timeout {name}: negative duration {base_ms} ms")
        self.name = name
        self.base_ms = base_ms
        self.after_ms = base_ms
        self.started_ms = started_ms

    def __repr__(self) -> str:
        state = "stopped" if self.started_ms is None else f"since {self.started_ms} ms"
        return f"Timeout({self.name}, {self.after_ms} ms, {state})"

    @property
    def running(self) -> bool:
        return self.started_ms is not None

    def start(self, now_ms: int) -> None:
        """Run from `now_ms`, whether it ran before or not."""
        self.started_ms = now_ms

    def stop(self) -> None:
        self.started_ms = None

    def reset(self, now_ms: int) -> None:
        """Restart a running timeout from `now_ms`; a stopped one stays stopped."""
        if self.started_ms is not None:
            self.started_ms = now_ms

    def fired(self, now_ms: int) -> bool:
        return self.started_ms is not None and now_ms - self.started_ms >= self.after_ms

    def quiet(self, now_ms: int) -> bool:
        """For a timeout used as a rate limit: stopped, or its time since the last start is up."""
        return self.started_ms is None or now_ms - self.started_ms >= self.after_ms

    def backoff(self, doublings: int) -> None:
        """Wait 2**doublings times the base duration (from the same start, if running)."""
        if doublings < 0:
            raise ValueError(f"timeout {self.name}: negative backoff {doublings}")
        self.after_ms = self.base_ms * (2**doublings)
