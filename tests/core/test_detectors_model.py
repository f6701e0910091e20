"""Detector values: responses order, verdicts, and how a token declares flows and tools."""

from __future__ import annotations

from typing import Any

import pytest

from broker.core.decision import Reason
from broker.core.detectors import (
    Declarations,
    DetectorId,
    Flow,
    Response,
    Severity,
    Signal,
    Verdict,
    declarations,
)


def test_responses_are_ordered_from_record_to_quarantine() -> None:
    ranks = [r.rank for r in Response]
    assert ranks == sorted(ranks)
    assert Response.QUARANTINE_AGENT.at_most(Response.BLOCK_CALL) is Response.BLOCK_CALL
    assert Response.RECORD.at_most(Response.BLOCK_CALL) is Response.RECORD


def _signal(detector: DetectorId, response: Response) -> Signal:
    return Signal(detector, (), ("d1",), response, response)


@pytest.mark.parametrize(
    ("signals", "action", "reason"),
    [
        ((), Response.RECORD, None),
        ((_signal(DetectorId.OFF_PROFILE, Response.RECORD),), Response.RECORD, None),
        (
            (
                _signal(DetectorId.RATE_SPIKE, Response.BLOCK_CALL),
                _signal(DetectorId.TOKEN_SHARED, Response.REVOKE_TOKEN),
            ),
            Response.REVOKE_TOKEN,
            Reason.ANOMALY_BLOCKED,
        ),
        (
            (
                _signal(DetectorId.SECRET_ECHO, Response.QUARANTINE_AGENT),
                _signal(DetectorId.RATE_SPIKE, Response.BLOCK_CALL),
            ),
            Response.QUARANTINE_AGENT,
            Reason.FLOW_BLOCKED,
        ),
    ],
    ids=["nothing", "record-only", "anomaly", "flow-wins"],
)
def test_a_verdict_takes_the_strongest_response_and_names_the_reason(
    signals: tuple[Signal, ...], action: Response, reason: Reason | None
) -> None:
    verdict = Verdict(signals)
    assert verdict.action is action
    assert verdict.blocks is (action is not Response.RECORD)
    assert verdict.reason == reason
    assert verdict.detectors == tuple(s.detector.value for s in signals)


def test_every_detector_has_a_severity() -> None:
    assert {_signal(d, Response.RECORD).severity for d in DetectorId} <= set(Severity)


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (None, Declarations()),
        ((), Declarations()),
        (
            ({"type": "data_flow", "allow": ["private->egress"]},),
            Declarations(frozenset({Flow.PRIVATE_TO_EGRESS})),
        ),
        (
            (
                {"type": "tool_call", "connector": "web", "tools": ["fetch", "get_*", "x?"]},
                {"type": "tool_call", "connector": 3, "tools": ["a"]},
                {"type": "tool_call", "connector": "mail", "tools": "send"},
                {"type": "tool_call", "connector": "mail", "tools": [7]},
                {"type": "other"},
            ),
            Declarations(tools=frozenset({"web/fetch"})),
        ),
    ],
    ids=["none", "empty", "data-flow", "exact-tools-only"],
)
def test_a_token_declares_flows_and_exactly_named_tools(
    details: tuple[dict[str, Any], ...] | None, expected: Declarations
) -> None:
    assert declarations(details) == expected


@pytest.mark.parametrize(
    "detail",
    [
        {"type": "data_flow"},
        {"type": "data_flow", "allow": []},
        {"type": "data_flow", "allow": "private->egress"},
        {"type": "data_flow", "allow": ["egress->private"]},
        {"type": "data_flow", "allow": [1]},
        {"type": "data_flow", "allow": ["private->egress"], "why": "x"},
    ],
    ids=["no-allow", "empty", "not-a-list", "unknown-flow", "not-a-string", "extra-key"],
)
def test_a_malformed_data_flow_declaration_is_refused(detail: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="data_flow"):
        declarations((detail,))
