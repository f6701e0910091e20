"""The engine: responses, shadow mode, caps after untrusted input, switches, bounds and cost."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from broker.core.decision import Reason
from broker.core.detectors import (
    DetectorBook,
    DetectorId,
    DetectorsConfig,
    DetectorState,
    Observation,
    Response,
    ResultObservation,
    Rules,
    observe_result,
    precheck,
)
from scopes import Label

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def obs(n: int, **kw: Any) -> Observation:
    base = Observation(
        decision_id=f"d{n}",
        agent_id="agent-a",
        jti="jti-1",
        task_id="task-1",
        session_id="s1",
        client_fingerprint="fp-a",
        category="c",
        connector="files",
        tool="read",
        arguments={"path": f"/w/{n}"},
        labels=frozenset({Label.PRIVATE}),
        allowed=True,
    )
    return replace(base, **kw)


def burst(book: DetectorBook, start: int = 0) -> list[Any]:
    return [
        book.precheck(
            obs(start + i, allowed=False, tool=f"t{i}", reasons=frozenset({Reason.SCOPE_MISSING})),
            T0 + timedelta(seconds=i),
        )
        for i in range(10)
    ]


def test_every_detector_has_a_configured_response() -> None:
    rules = Rules(DetectorsConfig())
    for detector in DetectorId:
        group, response = rules.setting(detector)
        assert isinstance(response, Response)
        assert group.enabled


def test_shadow_mode_records_what_would_have_happened_globally_or_per_group() -> None:
    for cfg in (
        DetectorsConfig(shadow=True),
        DetectorsConfig.model_validate({"denials": {"shadow": True}}),
    ):
        verdict = burst(DetectorBook(cfg))[-1]
        signal = verdict.signals[0]
        assert (signal.shadow, signal.would, signal.response) == (
            True,
            Response.QUARANTINE_AGENT,
            Response.RECORD,
        )
        assert not verdict.blocks


def test_after_untrusted_input_content_driven_responses_are_capped_but_token_misuse_is_not() -> (
    None
):
    book = DetectorBook(DetectorsConfig())
    book.observe_result(
        ResultObservation("d0", "agent-a", "task-1", "web", "get", frozenset({Label.UNTRUSTED})), T0
    )
    verdict = burst(book, 1)[-1]
    assert verdict.action is Response.BLOCK_CALL
    assert verdict.signals[0].would is Response.BLOCK_CALL
    assert verdict.signals[0].untrusted
    stolen = book.precheck(obs(99, client_fingerprint="fp-b"), T0 + timedelta(seconds=30))
    assert [s.detector for s in stolen.signals] == [DetectorId.TOKEN_SHARED]
    assert stolen.action is Response.REVOKE_TOKEN


@pytest.mark.parametrize(
    "cfg",
    [
        {"enabled": False},
        {g: {"enabled": False} for g in ("denials", "rate", "profile", "flow", "loops", "tokens")},
    ],
    ids=["engine-off", "every-group-off"],
)
def test_switched_off_detectors_say_nothing(cfg: dict[str, Any]) -> None:
    rules = Rules(DetectorsConfig.model_validate(cfg))
    state = DetectorState()
    for i in range(400):
        state, verdict = precheck(
            state, obs(i % 3, client_fingerprint=f"fp{i}", allowed=i % 2 == 0), T0, rules
        )
        assert not verdict.signals
        state, after = observe_result(
            state,
            ResultObservation(
                f"d{i}", "agent-a", "task-1", "files", "read", frozenset(), result_bytes=10**9
            ),
            T0,
            rules,
        )
        assert not after.signals


def test_the_book_keeps_at_most_its_bounds_and_forgets_tokens() -> None:
    book = DetectorBook(DetectorsConfig(max_agents=2, max_tasks=3, max_tokens=2))
    for i in range(10):
        book.precheck(obs(i, agent_id=f"a{i}", task_id=f"t{i}", jti=f"j{i}"), T0)
    assert (len(book.agents), len(book.tasks), len(book.tokens)) == (2, 3, 2)
    assert book.agents.get("a0") is None
    assert book.agents.get("a9") is not None
    book.forget_token("j9")
    book.forget_token("never-seen")
    assert book.tokens.get("j9") is None
    assert len(book.tokens) == 1


@pytest.mark.parametrize(
    "data",
    [
        {"rate": {"cap_per_minute": 0}},
        {"denials": {"burst_response": "explode"}},
        {"profile": {"high_risk_tools": ["shell/[x]"]}},
        {"loops": {"unknown": True}},
        {"surprise": 1},
    ],
    ids=["zero-cap", "unknown-response", "bad-glob", "unknown-group-key", "unknown-key"],
)
def test_a_bad_detectors_section_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DetectorsConfig.model_validate(data)


def test_arguments_that_are_not_json_fail_closed() -> None:
    with pytest.raises(TypeError):
        precheck(DetectorState(), obs(1, arguments={"x": object()}), T0, Rules(DetectorsConfig()))
