"""Rate limits as pure rules: a token bucket whose state is a value. Stdlib only; time passed in.

The shell keeps one `Bucket` per key (agent, connector) and replaces it with what `take` returns.
A bucket holds up to ``burst`` calls and refills at ``per_minute`` calls a minute, so short bursts
pass and a sustained rate above the limit is refused with the seconds until the next call would
pass (the retry hint an agent sees). A clock that steps backwards never adds calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Bucket", "RateLimit", "take"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_minute: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_minute > 0 and math.isfinite(self.per_minute)) or self.burst < 1:
            raise ValueError("a rate limit needs per_minute > 0 and burst >= 1")


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    updated: datetime


def take(bucket: Bucket | None, limit: RateLimit, now: datetime) -> tuple[Bucket, float | None]:
    """Spend one call: the new bucket, and None when allowed or the seconds to wait when not."""
    if bucket is None:
        bucket = Bucket(float(limit.burst), now)
    elapsed = max(0.0, (now - bucket.updated).total_seconds())
    tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.per_minute / 60.0)
    updated = max(now, bucket.updated)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, updated), None
    wait = (1.0 - tokens) * 60.0 / limit.per_minute
    return Bucket(tokens, updated), wait
