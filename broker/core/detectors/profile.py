"""Off-profile use and first use of a high-risk tool. Pure; bounded state per agent.

A profile is the set of ``connector/tool`` keys an agent has been allowed to call for one kind
of task. The kind (`purpose_category`) is the task token's sorted scope set: structured, stable
across rewordings of the stated purpose, and cheap. A call outside a profile that has seen
``min_calls`` calls is off-profile. A high-risk tool (configured globs, or any ``egress`` call)
that the agent has never used in any task, called once the agent has ``min_calls`` calls behind
it, is held unless the task token names that tool exactly. Profiles learn only from calls that
went through; a new agent is in its learning period for its first ``min_calls`` calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.core.detectors.config import ProfileConfig
from broker.core.detectors.model import DetectorId, Observation, Signal
from scopes import Label, ToolPatterns

__all__ = ["Profile", "ProfileState", "check_profile", "learn_profile", "purpose_category"]


def purpose_category(scopes: Iterable[str]) -> str:
    """The kind of task a token is for: its scope names, sorted and space-joined."""
    return " ".join(sorted(set(scopes)))


@dataclass(frozen=True, slots=True)
class Profile:
    category: str
    tools: frozenset[str]
    connectors: frozenset[str]
    calls: int


@dataclass(frozen=True, slots=True)
class ProfileState:
    profiles: tuple[Profile, ...] = ()
    """Least recently used first."""
    seen: frozenset[str] = frozenset()
    calls: int = 0


def _find(state: ProfileState, category: str) -> Profile | None:
    for p in state.profiles:
        if p.category == category:
            return p
    return None


def check_profile(
    state: ProfileState, obs: Observation, cfg: ProfileConfig, high_risk: ToolPatterns | None
) -> list[Signal]:
    """Signals for ``obs`` against the agent's profiles (allowed calls only)."""
    if not obs.allowed:
        return []
    key = obs.key
    signals: list[Signal] = []
    profile = _find(state, obs.category)
    if profile is not None and profile.calls >= cfg.min_calls and key not in profile.tools:
        signals.append(
            Signal(
                DetectorId.OFF_PROFILE,
                (
                    ("tool", key),
                    ("new_connector", obs.connector not in profile.connectors),
                    ("profile_calls", profile.calls),
                    ("profile_tools", len(profile.tools)),
                ),
                (obs.decision_id,),
            )
        )
    risky = (cfg.egress_is_high_risk and Label.EGRESS in obs.labels) or (
        high_risk is not None and high_risk.matches(key)
    )
    if (
        risky
        and state.calls >= cfg.min_calls
        and key not in state.seen
        and key not in obs.declared.tools
    ):
        signals.append(
            Signal(
                DetectorId.HIGH_RISK_FIRST_USE,
                (("tool", key), ("agent_calls", state.calls)),
                (obs.decision_id,),
            )
        )
    return signals


def learn_profile(state: ProfileState, obs: Observation, cfg: ProfileConfig) -> ProfileState:
    """Add a call that went through to the agent's profile for its category."""
    key = obs.key
    profiles = state.profiles
    old = profiles[-1] if profiles and profiles[-1].category == obs.category else None
    if old is not None and key in old.tools and key in state.seen:
        # The common case: the newest profile, a known tool. Only the counters move.
        newest = Profile(old.category, old.tools, old.connectors, old.calls + 1)
        return ProfileState((*profiles[:-1], newest), state.seen, state.calls + 1)
    old = _find(state, obs.category)
    if old is None:
        profile = Profile(obs.category, frozenset({key}), frozenset({obs.connector}), 1)
    else:
        tools = old.tools
        if key not in tools and len(tools) < cfg.max_tools:
            tools = tools | {key}
        connectors = old.connectors
        if obs.connector not in connectors and len(connectors) < cfg.max_tools:
            connectors = connectors | {obs.connector}
        profile = Profile(old.category, tools, connectors, old.calls + 1)
    others = tuple(p for p in state.profiles if p is not old)
    profiles = (*others[max(0, len(others) - cfg.max_categories + 1) :], profile)
    seen = state.seen
    if key not in seen and len(seen) < cfg.max_tools:
        seen = seen | {key}
    return ProfileState(profiles, seen, state.calls + 1)
