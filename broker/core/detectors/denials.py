"""Denial bursts and probing: many refusals, or near-miss retries of a refused call. Pure.

Only refusals that say "you may not" count (`PROBE_REASONS`); transient upstream trouble, rate
limits and pending approvals do not. A later call of the same tool whose canonical arguments
are similar to, but not the same as, a refused call's (Dice coefficient over character trigrams,
the texts cut at `MAX_TEXT`) is a near miss, whether or not the policy refused it: a mutation
that gets through is the one that matters most.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.core.decision import Reason
from broker.core.detectors.config import DenialsConfig
from broker.core.detectors.model import DetectorId, Observation, Signal

__all__ = ["MAX_REFUSED", "MAX_TEXT", "PROBE_REASONS", "DenialState", "observe_denials"]

PROBE_REASONS = frozenset(
    {
        Reason.SCOPE_MISSING,
        Reason.CONSTRAINT_VIOLATED,
        Reason.TOOL_UNAPPROVED,
        Reason.TOOL_DEFINITION_CHANGED,
        Reason.APPROVAL_DENIED,
        Reason.FLOW_BLOCKED,
        Reason.ANOMALY_BLOCKED,
    }
)
MAX_REFUSED = 8
"""Refused calls remembered per agent for near-miss comparison."""
MAX_TEXT = 512

Stamp = tuple[float, str]


@dataclass(frozen=True, slots=True)
class Refused:
    key: str
    text: str
    grams: frozenset[str]
    at: float
    ref: str


@dataclass(frozen=True, slots=True)
class DenialState:
    denials: tuple[Stamp, ...] = ()
    refused: tuple[Refused, ...] = ()
    near_misses: tuple[Stamp, ...] = ()


def _grams(text: str) -> frozenset[str]:
    text = text[:MAX_TEXT]
    return frozenset(text[i : i + 3] for i in range(max(1, len(text) - 2)))


def _dice(a: frozenset[str], b: frozenset[str]) -> float:
    return 2 * len(a & b) / (len(a) + len(b))


def _recent(stamps: tuple[Stamp, ...], cutoff: float, keep: int) -> tuple[Stamp, ...]:
    return tuple(s for s in stamps if s[0] >= cutoff)[-keep:]


def observe_denials(
    state: DenialState, obs: Observation, text: str, t: float, cfg: DenialsConfig
) -> tuple[DenialState, list[Signal]]:
    """Count this call's refusal and near misses; signal a burst or probing."""
    refusal = not obs.allowed and bool(obs.reasons & PROBE_REASONS)
    if not refusal and not state.refused:
        return state, []
    cutoff = t - cfg.window_seconds
    key = obs.key
    signals: list[Signal] = []
    refused = tuple(r for r in state.refused if r.at >= cutoff)
    near_misses = state.near_misses
    denials = state.denials

    same_tool = [r for r in refused if r.key == key and r.text != text]
    grams = _grams(text) if same_tool else frozenset[str]()
    close = [r for r in same_tool if _dice(grams, r.grams) >= cfg.mutation_similarity]
    if close:
        near_misses = (
            *_recent(near_misses, cutoff, cfg.mutation_retries - 1),
            (t, obs.decision_id),
        )
        if len(near_misses) >= cfg.mutation_retries:
            refs = tuple(dict.fromkeys((*(r.ref for r in close), *(s[1] for s in near_misses))))
            signals.append(
                Signal(
                    DetectorId.PROBING,
                    (
                        ("near_misses", len(near_misses)),
                        ("window_seconds", cfg.window_seconds),
                        ("similarity", round(max(_dice(grams, r.grams) for r in close), 3)),
                        ("tool", key),
                    ),
                    refs,
                )
            )

    if refusal:
        denials = (*_recent(denials, cutoff, cfg.burst - 1), (t, obs.decision_id))
        if len(denials) >= cfg.burst:
            signals.append(
                Signal(
                    DetectorId.DENIAL_BURST,
                    (("denials", len(denials)), ("window_seconds", cfg.window_seconds)),
                    tuple(s[1] for s in denials[-8:]),
                )
            )
        if not any(r.key == key and r.text == text for r in refused):
            entry = Refused(key, text, grams or _grams(text), t, obs.decision_id)
            refused = (*refused[-(MAX_REFUSED - 1) :], entry)
    return DenialState(denials, refused, near_misses), signals
