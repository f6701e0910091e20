"""The detector engine: every detector over one call, and the response each signal takes. Pure.

`precheck` runs before a call is forwarded and may block it; `observe_result` runs after. Both
take the state slices of the call's agent, task and token (`DetectorState`) and return the new
slices with a `Verdict`; the shell stores the slices back under their keys (see `DetectorBook`
for a bounded in-memory keeper). Learning (profiles, taint, split-exfiltration windows) happens
only for calls that went through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from broker.core.detectors.config import DetectorGroup, DetectorsConfig
from broker.core.detectors.denials import DenialState, observe_denials
from broker.core.detectors.flow import FlowState, add_secrets, check_flow, commit_flow
from broker.core.detectors.loops import (
    LoopState,
    call_digest,
    check_budget,
    observe_bytes,
    observe_repeat,
)
from broker.core.detectors.misuse import TokenState, check_closed, observe_token
from broker.core.detectors.model import (
    DetectorId,
    Observation,
    Response,
    ResultObservation,
    Signal,
    Verdict,
)
from broker.core.detectors.profile import ProfileState, check_profile, learn_profile
from broker.core.detectors.rate import RateState, observe_rate
from broker.core.detectors.secrets import Hit
from scopes import Label, ToolPatterns

__all__ = [
    "AgentState",
    "DetectorState",
    "Rules",
    "TaskState",
    "close_task",
    "observe_result",
    "precheck",
]


_NO_HITS: frozenset[Hit] = frozenset()
_SETTINGS: dict[DetectorId, tuple[str, str]] = {
    DetectorId.DENIAL_BURST: ("denials", "burst_response"),
    DetectorId.PROBING: ("denials", "probing_response"),
    DetectorId.RATE_SPIKE: ("rate", "spike_response"),
    DetectorId.RATE_CAP: ("rate", "cap_response"),
    DetectorId.OFF_PROFILE: ("profile", "off_profile_response"),
    DetectorId.HIGH_RISK_FIRST_USE: ("profile", "high_risk_response"),
    DetectorId.LETHAL_TRIFECTA: ("flow", "trifecta_response"),
    DetectorId.SECRET_ECHO: ("flow", "secret_echo_response"),
    DetectorId.REPEATED_CALL: ("loops", "repeat_response"),
    DetectorId.READ_BUDGET: ("loops", "budget_response"),
    DetectorId.TOKEN_SHARED: ("tokens", "shared_response"),
    DetectorId.TASK_CLOSED_USE: ("tokens", "closed_task_response"),
}
"""Detector -> (group of `DetectorsConfig`, the group's response field)."""


@dataclass(frozen=True, slots=True)
class AgentState:
    denials: DenialState = field(default_factory=DenialState)
    rate: RateState = field(default_factory=RateState)
    profile: ProfileState = field(default_factory=ProfileState)


@dataclass(frozen=True, slots=True)
class TaskState:
    flow: FlowState = field(default_factory=FlowState)
    loops: LoopState = field(default_factory=LoopState)
    closed_ref: str | None = None


@dataclass(frozen=True, slots=True)
class DetectorState:
    """The slices one call touches: its agent's, its task's and its token's."""

    agent: AgentState = field(default_factory=AgentState)
    task: TaskState = field(default_factory=TaskState)
    token: TokenState = field(default_factory=TokenState)


@dataclass(frozen=True, slots=True)
class Rules:
    """`DetectorsConfig` with its globs compiled; build once, reuse for every call."""

    config: DetectorsConfig
    high_risk: ToolPatterns | None = field(init=False)
    egress: ToolPatterns | None = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        high_risk = (
            ToolPatterns(cfg.profile.high_risk_tools) if cfg.profile.high_risk_tools else None
        )
        egress = ToolPatterns(cfg.flow.egress_tools) if cfg.flow.egress_tools else None
        object.__setattr__(self, "high_risk", high_risk)
        object.__setattr__(self, "egress", egress)

    def setting(self, detector: DetectorId) -> tuple[DetectorGroup, Response]:
        """The detector's group settings and configured response."""
        c = self.config
        group, field_name = _SETTINGS[detector]
        settings: DetectorGroup = getattr(c, group)
        return settings, getattr(settings, field_name)

    def resolve(self, signals: list[Signal], untrusted_task: bool) -> Verdict:
        """Give each signal its response: configured, capped after untrusted input, shadowed."""
        out: list[Signal] = []
        cap = self.config.untrusted_max_response
        for s in signals:
            group, would = self.setting(s.detector)
            untrusted = s.untrusted or untrusted_task
            if untrusted and group.cap_after_untrusted:
                would = would.at_most(cap)
            shadow = self.config.shadow or group.shadow
            response = Response.RECORD if shadow else would
            out.append(Signal(s.detector, s.values, s.refs, would, response, shadow, untrusted))
        return Verdict(tuple(out))


def _canonical(obs: Observation) -> str:
    return json.dumps(obs.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def precheck(
    state: DetectorState, obs: Observation, now: datetime, rules: Rules
) -> tuple[DetectorState, Verdict]:
    """Run every detector on a call before it is forwarded; the verdict may block it.

    Raises:
        TypeError, ValueError: the arguments are not JSON (the shell fails closed).
    """
    cfg = rules.config
    if not cfg.enabled:
        return state, Verdict()
    t = now.timestamp()
    ref = obs.decision_id
    agent, task, token = state.agent, state.task, state.token
    signals: list[Signal] = []
    text = _canonical(obs)

    if cfg.tokens.enabled:
        token, found = observe_token(token, obs)
        signals += found
        signals += check_closed(task.closed_ref, obs)
    denials, rate, profile = agent.denials, agent.rate, agent.profile
    if cfg.denials.enabled:
        denials, found = observe_denials(denials, obs, text, t, cfg.denials)
        signals += found
    if cfg.rate.enabled:
        rate, found = observe_rate(rate, ref, t, cfg.rate)
        signals += found
    if cfg.profile.enabled:
        signals += check_profile(profile, obs, cfg.profile, rules.high_risk)
    loops = task.loops
    if cfg.loops.enabled:
        loops, found = observe_repeat(loops, call_digest(obs.key, text), ref, t, cfg.loops)
        signals += found
        signals += check_budget(loops, ref, cfg.loops)
    flow = task.flow
    hits = _NO_HITS
    if cfg.flow.enabled:
        egress = Label.EGRESS in obs.labels or (
            rules.egress is not None and rules.egress.matches(obs.key)
        )
        found, hits = check_flow(flow, obs, egress, cfg.flow)
        signals += found

    verdict = rules.resolve(signals, flow.untrusted) if signals else Verdict()
    forwarded = obs.allowed and not verdict.blocks
    if forwarded and cfg.profile.enabled:
        profile = learn_profile(profile, obs, cfg.profile)
    if cfg.flow.enabled:
        flow = commit_flow(flow, obs, hits, forwarded, cfg.flow)
    new = DetectorState(
        AgentState(denials, rate, profile), TaskState(flow, loops, task.closed_ref), token
    )
    return new, verdict


def observe_result(
    state: DetectorState, res: ResultObservation, now: datetime, rules: Rules
) -> tuple[DetectorState, Verdict]:
    """Take in a forwarded call's result: watched values, taint, bytes read."""
    del now  # results carry no timing rule yet; kept for a uniform signature
    cfg = rules.config
    if not cfg.enabled:
        return state, Verdict()
    task = state.task
    flow, loops = task.flow, task.loops
    signals: list[Signal] = []
    if cfg.flow.enabled:
        flow = add_secrets(flow, res, cfg.flow)
    if cfg.loops.enabled:
        loops, signals = observe_bytes(loops, res.result_bytes, res.decision_id, cfg.loops)
    verdict = rules.resolve(signals, flow.untrusted) if signals else Verdict()
    new_task = TaskState(flow, loops, task.closed_ref)
    return DetectorState(state.agent, new_task, state.token), verdict


def close_task(task: TaskState, ref: str) -> TaskState:
    """Mark a task closed (``ref``: the closing event); later calls under it are signalled."""
    if task.closed_ref is not None:
        return task
    return TaskState(task.flow, task.loops, ref)
