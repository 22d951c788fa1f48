"""Nearest-rank percentiles (pbft/stats.py), the rule every report uses."""

from __future__ import annotations

import pytest

from pbft.stats import nearest_rank


def test_a_percentile_is_an_observed_value_at_its_rank() -> None:
    assert nearest_rank([30, 10, 20, 40], 50) == 20
    assert nearest_rank([30, 10, 20, 40], 75) == 30
    assert nearest_rank([30, 10, 20, 40], 76) == 40
    assert nearest_rank([7], 99) == 7
    assert nearest_rank([2.5, 1.5], 0) == 1.5


def test_integer_percents_give_what_the_simulator_always_reported() -> None:
    # The simulator's former formula, in integers: the summaries must not move.
    for count in range(1, 400):
        values = list(range(count))
        for percent in (50, 95, 99):
            rank = max(1, -(-percent * count // 100))
            assert nearest_rank(values, percent) == values[rank - 1]


def test_fractional_percents_are_exact_where_floats_are_not() -> None:
    values = list(range(1000))
    # 99.9% of 1,000 is rank 999 exactly; numpy's float version of the rule (inverted_cdf)
    # took rank 1,000 when this was written.
    assert nearest_rank(values, 99.9) == 998
    assert nearest_rank(values, 99.99) == 999


def test_nothing_to_rank_or_a_percent_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        nearest_rank([], 50)
    with pytest.raises(ValueError):
        nearest_rank([1, 2], 101)
    with pytest.raises(ValueError):
        nearest_rank([1, 2], -1)
