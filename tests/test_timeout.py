"""The replica's one timer type (pbft/timeout.py): when a timeout fires, and backoff."""

from __future__ import annotations

import pytest

from pbft.timeout import Timeout


def test_a_timeout_fires_once_its_duration_has_passed_since_it_started() -> None:
    timeout = Timeout("heartbeat", 100)
    timeout.start(1_000)
    assert not timeout.fired(1_099)
    assert timeout.fired(1_100)  # >=: exactly the duration is enough
    assert timeout.fired(5_000)  # firing does not stop it


def test_a_stopped_timeout_never_fires() -> None:
    timeout = Timeout("progress", 100)
    assert not timeout.running and not timeout.fired(10_000)
    timeout.start(0)
    timeout.stop()
    assert not timeout.fired(10_000)


def test_reset_restarts_a_running_timeout_and_leaves_a_stopped_one_stopped() -> None:
    timeout = Timeout("primary", 100, started_ms=0)
    timeout.reset(50)
    assert not timeout.fired(149) and timeout.fired(150)
    stopped = Timeout("view_change", 100)
    stopped.reset(50)
    assert not stopped.running


def test_a_rate_limit_timeout_is_quiet_when_stopped_or_expired() -> None:
    timeout = Timeout("fetch", 100)
    assert timeout.quiet(0)
    timeout.start(10)
    assert not timeout.quiet(109)
    assert timeout.quiet(110)


def test_backoff_doubles_the_duration_counted_from_the_same_start() -> None:
    timeout = Timeout("primary", 100, started_ms=1_000)
    timeout.backoff(2)
    assert timeout.after_ms == 400
    assert not timeout.fired(1_399) and timeout.fired(1_400)
    timeout.backoff(0)
    assert timeout.after_ms == 100 and timeout.fired(1_100)


def test_negative_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="negative duration"):
        Timeout("heartbeat", -1)
    with pytest.raises(ValueError, match="negative backoff"):
        Timeout("heartbeat", 1).backoff(-1)
