"""Drive corpus scripts through the pure detector engine and report what it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.core.decision import Reason
from broker.core.detectors import (
    DetectorBook,
    DetectorsConfig,
    Observation,
    ResultObservation,
    Signal,
    Verdict,
    declarations,
    purpose_category,
)
from scopes import Label
from tests.scenarios.corpus import CORPUS_CONFIG, Call, CloseTask, Script, Token

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@dataclass
class Run:
    script: Script
    verdicts: list[tuple[int, Call, Verdict]] = field(
        default_factory=list[tuple[int, Call, Verdict]]
    )
    stopped_at: int | None = None
    """1-based count of attacking calls up to and including the first one stopped."""
    stop: Verdict | None = None
    attacking: int = 0

    @property
    def signals(self) -> list[Signal]:
        return [s for _, _, v in self.verdicts for s in v.signals]

    @property
    def enforced(self) -> list[Signal]:
        return [s for s in self.signals if s.response.rank > 0]


def corpus_config(**overrides: Any) -> DetectorsConfig:
    data: dict[str, Any] = {k: dict(v) for k, v in CORPUS_CONFIG.items()}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return DetectorsConfig.model_validate(data)


def _observation(script: Script, n: int, call: Call, token: Token) -> Observation:
    allowed = call.outcome == "allowed"
    return Observation(
        decision_id=f"{script.name}#{n}",
        agent_id=token.agent,
        jti=f"jti-{script.name}-{token.alias}",
        task_id=token.task,
        session_id=f"s-{token.alias}",
        client_fingerprint=call.client,
        category=purpose_category(token.scopes),
        connector=call.connector,
        tool=call.tool,
        arguments=call.args,
        labels=frozenset(Label(x) for x in call.labels) if allowed else frozenset(),
        allowed=allowed,
        reasons=frozenset() if allowed else frozenset({Reason(call.outcome)}),
        declared=declarations(token.authorization_details),
    )


def run(
    script: Script,
    config: DetectorsConfig | None = None,
    *,
    until_stop: bool = True,
    start: datetime = T0,
) -> Run:
    """Replay ``script`` from ``start`` (script time 0); stop at the first attacking call the
    engine stops (if ``until_stop``)."""
    book = DetectorBook(config or corpus_config())
    tokens = {t.alias: t for t in script.tokens}
    out = Run(script)
    in_attack = False
    for n, step in enumerate(script.steps):
        now = start + timedelta(seconds=step.at)
        if isinstance(step, CloseTask):
            book.close_task(step.task, f"{script.name}#close-{n}")
            continue
        token = tokens[step.token]
        obs = _observation(script, n, step, token)
        in_attack = in_attack or step.attack
        out.attacking += in_attack
        verdict = book.precheck(obs, now)
        after = Verdict()
        if obs.allowed and not verdict.blocks:
            after = book.observe_result(
                ResultObservation(
                    obs.decision_id,
                    token.agent,
                    token.task,
                    step.connector,
                    step.tool,
                    obs.labels,
                    ok=step.ok,
                    result_bytes=step.result_bytes,
                    secrets=step.secrets,
                ),
                now,
            )
        both = Verdict(verdict.signals + after.signals)
        out.verdicts.append((n, step, both))
        stopped = verdict.blocks or after.action.rank >= 2
        if in_attack and stopped and out.stopped_at is None:
            out.stopped_at = out.attacking
            out.stop = both
            if until_stop:
                break
    return out
