"""The transport's per-address token buckets (the accept rate and the AUTH verify rate):
a burst then the rate, full buckets forgotten, and a table bounded whatever the number of
source addresses (a flood from an IPv6 /64 has as many as it likes)."""

from __future__ import annotations

from runtime.buckets import TokenBuckets as _TokenBuckets


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


# --- the inbound scheduler's client pacing (runtime/inbound.py: reserve) ----------------------


def test_a_reservation_waits_for_the_tokens_it_took() -> None:
    pace: _TokenBuckets[tuple[str, int]] = _TokenBuckets(rate=400.0, burst=400)
    client = ("client", 1)
    assert [pace.reserve(client, 1.0, 0.0) for _ in range(400)] == [0.0] * 400
    assert pace.reserve(client, 2.0, 0.0) == 2.0 / 400  # a frame of two quanta: in debt
    # A second reader of the same principal cannot pass on those tokens: it waits longer.
    assert pace.reserve(client, 1.0, 0.0) == 3.0 / 400
    assert pace.reserve(("client", 2), 1.0, 0.0) == 0.0  # another client has its own


def test_paced_clients_are_forgotten_when_full_and_the_table_is_bounded() -> None:
    pace: _TokenBuckets[tuple[str, int]] = _TokenBuckets(rate=1.0, burst=400)
    pace.MAX_KEYS = 1000
    for i in range(5000):  # 5,000 clients within 0.05 s: none full again yet
        pace.reserve(("client", i), 1.0, i * 1e-5)
    assert len(pace) == 1000  # the least recently seen went first
    # A client in debt is kept until its debt is paid and its burst back, however long.
    debtor = ("client", -1)
    assert pace.reserve(debtor, 800.0, 1.0) == 400.0  # full again at 801 s
    assert pace.reserve(("client", -2), 1.0, 2.5) == 0.0
    assert len(pace) == 2  # the 1,000 were full again and went; the debtor stays
    assert pace.reserve(("client", -2), 1.0, 801.5) == 0.0
    assert len(pace) == 1  # the debtor was full again by then


def test_100_000_paced_clients_leave_a_bounded_table() -> None:
    """More clients than MAX_KEYS, none full again: the least recently seen go, one per
    reservation beyond the bound (the old pacing kept every client it had not seen for a
    burst's time, and scanned them all on each reservation beyond 4,096)."""
    pace: _TokenBuckets[int] = _TokenBuckets(rate=1.0, burst=400)
    for i in range(100_000):
        pace.reserve(i, 1.0, i * 1e-6)
        assert len(pace) == min(i + 1, pace.MAX_KEYS)
