"""Percentiles, the one way every report computes them (simulator, benchmarks, attacks)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import TypeVar

Number = TypeVar("Number", int, float)


def nearest_rank(values: Iterable[Number], percent: int | float) -> Number:
    """The nearest-rank percentile: the smallest observed value that at least `percent`% of
    the values are at or below. Always an observed value, and exact: the rank is computed
    in rational arithmetic (99.9 is 999/10), so no float rounding moves it. numpy's
    `inverted_cdf` method is the same rule in floats; it picks the next rank for p99.9 of
    1,000 values, for one."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values to take a percentile of")
    share = Fraction(str(percent)) if isinstance(percent, float) else Fraction(percent)
    if not 0 <= share <= 100:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    rank = max(1, math.ceil(share * len(ordered) / 100))
    return ordered[rank - 1]
