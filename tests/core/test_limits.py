"""Token-bucket rate limits: bursts pass, sustained excess is refused with a retry hint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.limits import Bucket, RateLimit, take

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_a_burst_up_to_the_limit_passes_and_the_next_call_waits_for_a_refill() -> None:
    limit = RateLimit(per_minute=60, burst=3)
    bucket = None
    for _ in range(3):
        bucket, wait = take(bucket, limit, T0)
        assert wait is None
    bucket, wait = take(bucket, limit, T0)
    assert wait == pytest.approx(1.0)
    bucket, wait = take(bucket, limit, T0 + timedelta(seconds=1))
    assert wait is None


def test_a_clock_stepping_backwards_adds_no_calls() -> None:
    limit = RateLimit(per_minute=60, burst=1)
    bucket, _ = take(None, limit, T0)
    _, wait = take(bucket, limit, T0 - timedelta(hours=1))
    assert wait is not None


@pytest.mark.parametrize(("per_minute", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0)])
def test_a_meaningless_limit_is_refused(per_minute: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimit(per_minute, burst)


@given(
    per_minute=st.integers(1, 600),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 5), min_size=1, max_size=200),
)
def test_no_window_admits_more_than_burst_plus_refill(
    per_minute: int, burst: int, gaps: list[float]
) -> None:
    limit = RateLimit(per_minute, burst)
    bucket: Bucket | None = None
    now = T0
    admitted = 0
    for gap in gaps:
        now += timedelta(seconds=gap)
        bucket, wait = take(bucket, limit, now)
        admitted += wait is None
    elapsed = (now - T0).total_seconds()
    assert admitted <= burst + elapsed * per_minute / 60 + 1e-9
