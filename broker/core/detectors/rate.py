"""Rate spikes against the agent's own baseline, and an absolute cap. Pure; O(1) state.

Calls are counted per whole minute. The current rate is the sliding-window estimate: this
minute's count plus the previous minute's weighted by the part of it still inside the last 60
seconds. A spike is a rate above ``max(spike_floor, spike_factor * baseline)``, so a new agent is
held to the floor and an agent's own history raises it; the cap applies whatever the history.
A clock stepping backwards counts in the current minute.

The baseline is an EWMA of calls per minute over the minutes *before* the sliding window, and
two rules keep an attacker from training it:

- The window's own calls never raise the threshold. The previous minute is folded into the
  baseline only as far as it lowers it (an idle minute decays the baseline at once); it is
  learned in full when it leaves the window. Without this, a flood that starts a few seconds
  before a minute turns over would be learned as the agent's normal rate as soon as the minute
  closed, and would be stopped two or three times later than the same flood started at the top
  of a minute.
- A minute in which a rate signal fired is never learned (neither its calls nor its decay), so a
  sustained flood does not become the new normal minute by minute. An agent whose real workload
  grows eightfold at once stays held at the old threshold until the configuration changes; that
  is the intended, conservative outcome.
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
    """The current minute (``floor(t / 60)``); -1 before the first call."""
    count: int = 0
    """Calls in the current minute."""
    flagged: bool = False
    """A rate signal fired in the current minute: it will not be learned."""
    previous: int = 0
    """Calls in the minute before the current one."""
    previous_learnable: bool = False
    """The previous minute may be learned: it was observed (not before the first call) and not
    flagged."""
    ewma: float = 0.0
    """The baseline over the minutes before the previous one."""
    seen: bool = False
    """``ewma`` has learned at least one minute."""


def _learn(ewma: float, seen: bool, count: float, alpha: float) -> float:
    return alpha * count + (1 - alpha) * ewma if seen else count


def _roll(state: RateState, minute: int, alpha: float) -> RateState:
    if state.minute < 0:
        return RateState(minute)
    if minute <= state.minute:
        return state
    ewma, seen = state.ewma, state.seen
    if state.previous_learnable:
        ewma, seen = _learn(ewma, seen, state.previous, alpha), True
    if minute == state.minute + 1:
        return RateState(minute, 0, False, state.count, not state.flagged, ewma, seen)
    if not state.flagged:
        ewma, seen = _learn(ewma, seen, state.count, alpha), True
    # Idle minutes that have left the window are learned as zeros.
    idle = min(minute - state.minute - 2, _MAX_GAP)
    if idle > 0:
        ewma, seen = (ewma * (1 - alpha) ** idle if seen else 0.0), True
    return RateState(minute, 0, False, 0, True, ewma, seen)


def _baseline(state: RateState, alpha: float) -> float:
    """The history before the window, lowered (never raised) by the previous minute."""
    if not state.seen:
        return 0.0
    if not state.previous_learnable:
        return state.ewma
    return _learn(state.ewma, True, min(float(state.previous), state.ewma), alpha)


def observe_rate(
    state: RateState, ref: str, t: float, cfg: RateConfig
) -> tuple[RateState, list[Signal]]:
    """Count one call at ``t``; signal a spike over the baseline or a rate over the cap."""
    minute = math.floor(t / 60)
    state = _roll(state, minute, cfg.ewma_alpha)
    count = state.count + 1
    into = max(0.0, t / 60 - state.minute)
    rate = count + state.previous * (1 - into)
    baseline = _baseline(state, cfg.ewma_alpha)
    threshold = max(float(cfg.spike_floor_per_minute), cfg.spike_factor * baseline)
    spike, over_cap = rate > threshold, rate > cfg.cap_per_minute
    state = RateState(
        state.minute,
        count,
        state.flagged or spike or over_cap,
        state.previous,
        state.previous_learnable,
        state.ewma,
        state.seen,
    )
    if not (spike or over_cap):
        return state, []
    values = (("calls_per_minute", round(rate, 2)), ("baseline_per_minute", round(baseline, 2)))
    signals: list[Signal] = []
    if over_cap:
        signals.append(
            Signal(DetectorId.RATE_CAP, (*values, ("cap_per_minute", cfg.cap_per_minute)), (ref,))
        )
    if spike:
        signals.append(
            Signal(DetectorId.RATE_SPIKE, (*values, ("threshold", round(threshold, 2))), (ref,))
        )
    return state, signals
