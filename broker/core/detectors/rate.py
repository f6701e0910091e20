"""Rate spikes against the agent's own baseline, and an absolute cap. Pure; O(1) state.

Calls are counted per whole minute; a closed minute updates an EWMA of calls per minute (empty
minutes decay it). The current rate is the sliding-window estimate: this minute's count plus
the previous minute's weighted by the part of it still inside the last 60 seconds. A spike is a
rate above ``max(spike_floor, spike_factor * baseline)``, so a new agent is held to the floor and
an agent's own history raises it; the cap applies whatever the history. A clock stepping
backwards counts in the current minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from broker.core.detectors.config import RateConfig
from broker.core.detectors.model import DetectorId, Signal

__all__ = ["RateState", "observe_rate"]

_MAX_GAP = 1440


@dataclass(frozen=True, slots=True)
class RateState:
    minute: int = -1
    count: int = 0
    previous: int = 0
    ewma: float = 0.0
    seen: bool = False


def _roll(state: RateState, minute: int, alpha: float) -> RateState:
    if state.minute < 0:
        return RateState(minute, 0, 0, 0.0, False)
    if minute <= state.minute:
        return state
    ewma = state.count if not state.seen else alpha * state.count + (1 - alpha) * state.ewma
    gap = min(minute - state.minute - 1, _MAX_GAP)
    ewma *= (1 - alpha) ** gap
    previous = state.count if gap == 0 else 0
    return RateState(minute, 0, previous, ewma, True)


def observe_rate(
    state: RateState, ref: str, t: float, cfg: RateConfig
) -> tuple[RateState, list[Signal]]:
    """Count one call at ``t``; signal a spike over the baseline or a rate over the cap."""
    minute = math.floor(t / 60)
    state = _roll(state, minute, cfg.ewma_alpha)
    count = state.count + 1
    state = RateState(state.minute, count, state.previous, state.ewma, state.seen)
    into = max(0.0, t / 60 - state.minute)
    rate = count + state.previous * (1 - into)
    threshold = max(float(cfg.spike_floor_per_minute), cfg.spike_factor * state.ewma)
    if rate <= threshold and rate <= cfg.cap_per_minute:
        return state, []
    values = (("calls_per_minute", round(rate, 2)), ("baseline_per_minute", round(state.ewma, 2)))
    signals: list[Signal] = []
    if rate > cfg.cap_per_minute:
        signals.append(
            Signal(DetectorId.RATE_CAP, (*values, ("cap_per_minute", cfg.cap_per_minute)), (ref,))
        )
    if rate > threshold:
        signals.append(
            Signal(DetectorId.RATE_SPIKE, (*values, ("threshold", round(threshold, 2))), (ref,))
        )
    return state, signals
