"""Data flow: the lethal trifecta and secret echo. Pure; bounded state per task.

State is kept per task, so a delegated child (same task id) and several sessions of one task
share it. A task is tainted ``private`` or ``untrusted`` by a call that went through under a
scope with that label. An egress call (the allowing scope is labelled ``egress``, or the tool
matches ``egress_tools``) in a task tainted both ways is the lethal trifecta, unless the task
token declares ``private->egress``. Secret echo looks in every egress call's string arguments
(and their percent-decoded form) for chunks of values read earlier in the task; matches from
the last ``split_window_calls`` egress calls that carried any add up. A declared flow does not
lift secret echo: watched values are credentials, never meant to leave.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from broker.core.detectors.config import FlowConfig
from broker.core.detectors.model import (
    DetectorId,
    Flow,
    Observation,
    ResultObservation,
    Signal,
)
from broker.core.detectors.secrets import Hit, SecretIndex, add_values, grams
from scopes import JSONValue, Label

__all__ = ["FlowState", "add_secrets", "check_flow", "commit_flow", "string_leaves"]


@dataclass(frozen=True, slots=True)
class FlowState:
    private_ref: str | None = None
    untrusted_ref: str | None = None
    secrets: SecretIndex = field(default_factory=SecretIndex, repr=False)
    window: tuple[tuple[str, frozenset[Hit]], ...] = ()
    """(decision id, hits) of recent egress calls that carried watched chunks."""

    @property
    def untrusted(self) -> bool:
        return self.untrusted_ref is not None


def _tail(
    items: tuple[tuple[str, frozenset[Hit]], ...], n: int
) -> tuple[tuple[str, frozenset[Hit]], ...]:
    return items[max(0, len(items) - n) :] if n > 0 else ()


def string_leaves(value: JSONValue, out: list[str]) -> None:
    """Append every string (object keys included) in ``value`` to ``out``."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            out.append(k)
            string_leaves(v, out)
    elif isinstance(value, list):
        for v in value:
            string_leaves(v, out)


def _hits(index: SecretIndex, arguments: Mapping[str, JSONValue]) -> frozenset[Hit]:
    leaves: list[str] = []
    string_leaves(dict(arguments), leaves)
    text = "\x00".join(leaves)
    seen = grams(text)
    if "%" in text:
        seen |= grams(unquote(text))
    found = index.chunks.keys() & seen
    return frozenset(hit for chunk in found for hit in index.chunks[chunk])


def check_flow(
    state: FlowState, obs: Observation, egress: bool, cfg: FlowConfig
) -> tuple[list[Signal], frozenset[Hit]]:
    """Signals for an allowed egress call, and the watched chunks it carries."""
    if not (egress and obs.allowed):
        return [], frozenset()
    signals: list[Signal] = []
    if (
        state.private_ref is not None
        and state.untrusted_ref is not None
        and Flow.PRIVATE_TO_EGRESS not in obs.declared.flows
    ):
        signals.append(
            Signal(
                DetectorId.LETHAL_TRIFECTA,
                (("tool", obs.key), ("declared", False)),
                (state.private_ref, state.untrusted_ref, obs.decision_id),
                untrusted=True,
            )
        )
    if not state.secrets.entries:
        return signals, frozenset()
    hits = _hits(state.secrets, obs.arguments)
    if hits:
        echo = _echo(state, hits, obs.decision_id, cfg)
        if echo is not None:
            signals.append(echo)
    return signals, hits


def _echo(state: FlowState, hits: frozenset[Hit], ref: str, cfg: FlowConfig) -> Signal | None:
    window = _tail(state.window, cfg.split_window_calls - 1)
    by_form: dict[int, set[int]] = {}
    carriers: dict[int, list[str]] = {}
    for call_ref, call_hits in (*window, (ref, hits)):
        for form_id, n in call_hits:
            by_form.setdefault(form_id, set()).add(n)
            calls = carriers.setdefault(form_id, [])
            if not calls or calls[-1] != call_ref:
                calls.append(call_ref)
    best: Signal | None = None
    best_share = 0.0
    for form_id, numbers in by_form.items():
        form = state.secrets.forms.get(form_id)
        if form is None:
            continue
        total = len(form.chunks)
        share = len(numbers) / total
        if len(numbers) >= max(1, math.ceil(cfg.match_fraction * total)) and share > best_share:
            best_share = share
            best = Signal(
                DetectorId.SECRET_ECHO,
                (
                    ("encoding", form.encoding),
                    ("coverage", round(share, 3)),
                    ("calls", len(carriers[form_id])),
                ),
                (form.ref, *carriers[form_id]),
                untrusted=state.untrusted,
            )
    return best


def commit_flow(
    state: FlowState, obs: Observation, hits: frozenset[Hit], forwarded: bool, cfg: FlowConfig
) -> FlowState:
    """Taint and remember what a call that went through brought in or carried out."""
    if not forwarded:
        return state
    private_ref = state.private_ref
    untrusted_ref = state.untrusted_ref
    if private_ref is None and Label.PRIVATE in obs.labels:
        private_ref = obs.decision_id
    if untrusted_ref is None and Label.UNTRUSTED in obs.labels:
        untrusted_ref = obs.decision_id
    window = state.window
    if hits:
        window = (*_tail(window, cfg.split_window_calls - 1), (obs.decision_id, hits))
    if (private_ref, untrusted_ref) == (state.private_ref, state.untrusted_ref) and not hits:
        return state
    return FlowState(private_ref, untrusted_ref, state.secrets, window)


def add_secrets(state: FlowState, res: ResultObservation, cfg: FlowConfig) -> FlowState:
    """Watch the values a result carried, and taint the task by what the result was."""
    private_ref = state.private_ref
    untrusted_ref = state.untrusted_ref
    if private_ref is None and Label.PRIVATE in res.labels:
        private_ref = res.decision_id
    if untrusted_ref is None and Label.UNTRUSTED in res.labels:
        untrusted_ref = res.decision_id
    secrets = state.secrets
    if res.secrets:
        secrets = add_values(
            secrets,
            res.secrets,
            res.decision_id,
            keep=cfg.max_secrets,
            min_chars=cfg.min_secret_chars,
            max_chars=cfg.max_secret_chars,
        )
    return FlowState(private_ref, untrusted_ref, secrets, state.window)
