"""The transport's per-address token buckets (the accept rate and the AUTH verify rate):
a burst then the rate, full buckets forgotten, and a table bounded whatever the number of
source addresses (a flood from an IPv6 /64 has as many as it likes)."""

from __future__ import annotations

from runtime.transport import _TokenBuckets


def test_an_address_gets_its_burst_then_its_rate() -> None:
    buckets = _TokenBuckets(rate=20.0, burst=40)
    assert [buckets.take("a", 0.0) for _ in range(41)].count(True) == 40
    assert not buckets.take("a", 0.0)
    assert buckets.take("a", 0.05)  # one token back after 1/20 s
    assert not buckets.take("a", 0.05)
    assert buckets.take("b", 0.05)  # another address has its own burst


def test_full_buckets_are_forgotten_and_the_table_is_bounded() -> None:
    buckets = _TokenBuckets(rate=20.0, burst=40)
    buckets.MAX_KEYS = 1000
    for i in range(5000):  # 5,000 addresses within 0.05 s: none full again yet
        buckets.take(f"2001:db8::{i:x}", i * 1e-5)
    assert len(buckets) == 1000  # the least recently seen went first
    assert buckets.take("2001:db8::1387", 0.05)  # a recent one kept its count
    # Two seconds later every bucket is full again: one more take leaves only itself.
    assert buckets.take("c", 3.0)
    assert len(buckets) == 1
