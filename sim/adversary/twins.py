"""Twins: two copies of a replica with one key, each talking with part of the network."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from crypto.keys import Principal
from sim.adversary.base import Behavior


class Twin(Behavior):
    """Twins: a second copy of the replica runs with the same key, and each copy sees only
    part of the network (see `Twins`). The copies run the unmodified core and send what it
    writes; the simulator does the splitting, so this wrapper changes nothing."""

    name = "twin"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("groups",)


@dataclass(frozen=True)
class Twins:
    """Who talks with which copy of a twinned replica.

    `groups[r] = (A, B)`: copy 0 of replica r talks only with the replicas in A, copy 1
    only with those in B. A message from another replica s to r reaches the copy whose
    group holds s (none if neither does). Two twinned replicas pair up by copy: copy 0
    with copy 0, copy 1 with copy 1 (colluders, each pair one side of the split).
    Clients reach both copies and hear from both."""

    groups: Mapping[int, tuple[frozenset[int], frozenset[int]]]

    COPIES: ClassVar[tuple[int, int]] = (0, 1)

    def receivers(self, source: Principal, copy: int, destination: Principal) -> tuple[int, ...]:
        """The copies of `destination` that a message from `source`'s copy `copy` reaches."""
        if destination[0] != "replica":
            return (0,)
        target = self.groups.get(destination[1])
        if source[0] != "replica":
            return self.COPIES if target is not None else (0,)
        origin = self.groups.get(source[1])
        if origin is not None and target is not None:
            return (copy,)
        if origin is not None:
            return (0,) if destination[1] in origin[copy] else ()
        if target is not None:
            return tuple(side for side in self.COPIES if source[1] in target[side])
        return (0,)
