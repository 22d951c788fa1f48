"""Counting what a quorum vouches for, after etcd raft's quorum package.

Raft's `MajorityConfig.CommittedIndex` sorts the indexes each voter acknowledged and
takes the one a majority reached. The replica asks the same question with other
counts: how far did f + 1 replicas say they executed (one of them is correct), which
later view are f + 1 replicas in (so a correct one is).
"""

from __future__ import annotations

from collections.abc import Iterable


def vouched_by(claims: Iterable[int], count: int) -> int | None:
    """The highest value that at least `count` of `claims` reach (one claim per replica),
    or None when there are fewer than `count` claims."""
    if count < 1:
        raise ValueError(f"a quorum of {count} replicas vouches for nothing")
    ranked = sorted(claims, reverse=True)
    return ranked[count - 1] if len(ranked) >= count else None
