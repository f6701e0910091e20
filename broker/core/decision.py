"""Decisions: the vocabulary every room shares. Pure; imports the standard library only.

A denial is a value, not an exception. `Decision.allowed` is true only when something granted the
request and nothing denied it; reasons explain a denial and are kebab-case, a closed vocabulary
(`Reason`). Only the adapters (MCP front, admin API) turn reasons into wire shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Decision", "Reason"]


class Reason(StrEnum):
    """Why a request was denied (or what held it). Closed vocabulary; the record keeps the story."""

    TOKEN_INVALID = "token-invalid"
    TOKEN_REVOKED = "token-revoked"
    AGENT_QUARANTINED = "agent-quarantined"
    AGENT_DISABLED = "agent-disabled"
    TASK_CLOSED = "task-closed"
    SCOPE_MISSING = "scope-missing"
    CONSTRAINT_VIOLATED = "constraint-violated"
    TOOL_UNAPPROVED = "tool-unapproved"
    TOOL_DEFINITION_CHANGED = "tool-definition-changed"
    BUDGET_EXHAUSTED = "budget-exhausted"
    RATE_LIMITED = "rate-limited"
    APPROVAL_REQUIRED = "approval-required"
    APPROVAL_DENIED = "approval-denied"
    FLOW_BLOCKED = "flow-blocked"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_UNAVAILABLE = "upstream-unavailable"
    RESULT_TOO_LARGE = "result-too-large"
    STORE_UNAVAILABLE = "store-unavailable"
    DECISION_ERROR = "decision-error"
    ANOMALY_BLOCKED = "anomaly-blocked"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of deciding one request.

    ``rule_ids`` names what produced the outcome (scope names, grant ids, detector ids) for the
    record; ``decision_id`` is handed in by the shell and is what the agent sees on a denial.
    """

    allowed: bool
    reasons: frozenset[Reason]
    decision_id: str
    rule_ids: tuple[str, ...] = ()
    detail: tuple[str, ...] = field(default=())

    @classmethod
    def allow(cls, decision_id: str, rule_ids: tuple[str, ...] = ()) -> Decision:
        return cls(True, frozenset(), decision_id, rule_ids)

    @classmethod
    def deny(
        cls,
        decision_id: str,
        *reasons: Reason,
        rule_ids: tuple[str, ...] = (),
        detail: tuple[str, ...] = (),
    ) -> Decision:
        if not reasons:
            raise ValueError("a denial needs at least one reason")
        return cls(False, frozenset(reasons), decision_id, rule_ids, detail)

    def reason_text(self) -> str:
        """Reasons sorted and comma-joined: the stable form for wire texts and logs."""
        return ",".join(sorted(self.reasons))
