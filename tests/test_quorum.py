"""pbft/quorum.py: what a number of replicas vouch for."""

from __future__ import annotations

import pytest

from pbft.quorum import vouched_by


def test_f_plus_one_claims_vouch_for_the_lowest_of_the_highest_f_plus_one() -> None:
    # One replica claiming 1,000 (it may be Byzantine) moves nothing with f = 1.
    assert vouched_by([1_000, 7, 3], 2) == 7
    assert vouched_by([1_000], 2) is None


def test_a_claim_counts_once_whatever_its_value() -> None:
    assert vouched_by([5, 5, 2], 2) == 5
    assert vouched_by([], 1) is None


def test_a_quorum_of_no_replicas_is_refused() -> None:
    with pytest.raises(ValueError, match="vouches for nothing"):
        vouched_by([1], 0)
