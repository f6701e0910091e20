"""Human approval, just in time: approval values and their rules. Pure; stdlib only.

An approval is asked for in one of two places:

- ``call``: a tool call allowed by a scope with ``approval = "call"`` is held until a human
  approves it. The approval is bound to the call by `call_binding`, the SHA-256 of the canonical
  JSON of (connector, tool, canonical arguments): it releases exactly that call, once.
- ``token``: a token request for a scope with ``approval = "token"`` is answered
  ``authorization_pending`` with the approval id; it is bound to the request by
  `token_request_binding` and releases one token for exactly that request, once.

The state machine (``now`` is always passed in)::

    pending ──approve──▶ approved ──consume(binding)──▶ consumed
       │  └───deny────▶ denied
       └──expire / now ≥ expires_at──▶ expired

Nothing is decided or consumed at or after ``expires_at``: a pending approval past it is
expired, and an approved one that was not consumed in time can no longer release anything.
Every refused transition raises `ApprovalRefused` with a `Problem` and a message that says what
was expected and what was found (never an argument value).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

__all__ = [
    "Approval",
    "ApprovalKind",
    "ApprovalRefused",
    "ApprovalStatus",
    "Problem",
    "call_binding",
    "canonical_json",
    "consume",
    "decide",
    "effective_status",
    "expire",
    "new_call_approval",
    "new_token_approval",
    "token_request_binding",
]


class ApprovalKind(StrEnum):
    CALL = "call"
    """One tool call with its exact canonical arguments."""
    TOKEN = "token"
    """One token request (agent, scopes, task, purpose, narrowing)."""


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CONSUMED = "consumed"
    """Approved and used: the call was released or the token issued."""
    EXPIRED = "expired"
    """Nobody decided in time, or the requester gave up waiting."""


class Problem(StrEnum):
    """Why a transition was refused."""

    EXPIRED = "expired"
    ALREADY_DECIDED = "already-decided"
    NOT_APPROVED = "not-approved"
    CONSUMED = "consumed"
    BINDING_MISMATCH = "binding-mismatch"


class ApprovalRefused(Exception):
    """An approval cannot make the transition asked for; nothing changed.

    ``problem`` says why; ``status`` is the approval's effective status when refused. The
    message names the approval id and states what was expected and found.
    """

    def __init__(
        self, approval_id: str, problem: Problem, status: ApprovalStatus, message: str
    ) -> None:
        super().__init__(message)
        self.approval_id = approval_id
        self.problem = problem
        self.status = status


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text, no NaN: one text per JSON value.

    Raises:
        ValueError: ``value`` holds NaN or infinity. TypeError: it is not JSON.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)  # fmt: skip


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def call_binding(connector: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the call: what a call approval releases."""
    return _sha256(
        canonical_json({"connector": connector, "tool": tool, "arguments": dict(arguments)})
    )


def token_request_binding(
    agent_id: str,
    scopes: Sequence[str],
    *,
    task_id: str | None,
    purpose: str | None,
    authorization_details: Sequence[Mapping[str, Any]] | None = None,
    budget: int | None = None,
    expires_in: int | None = None,
) -> str:
    """SHA-256 (hex) of the canonical JSON of a token request: what a token approval releases.

    Scope order and duplicates do not matter; everything else must be repeated exactly.
    """
    return _sha256(
        canonical_json(
            {
                "agent": agent_id,
                "scopes": sorted(set(scopes)),
                "task": task_id,
                "purpose": purpose or "",
                "authorization_details": (
                    None
                    if authorization_details is None
                    else [dict(d) for d in authorization_details]
                ),
                "budget": budget,
                "expires_in": expires_in,
            }
        )
    )


@dataclass(frozen=True, slots=True)
class Approval:
    """One request for a human decision and what became of it.

    For a call: ``connector``, ``tool`` and ``arguments`` (the exact canonical arguments the
    approver sees and that will be forwarded), ``token_jti`` and ``decision_id`` of the call.
    For a token request: ``scopes`` (those needing approval first, then the rest, as asked) and
    the task. ``binding`` is `call_binding` or `token_request_binding`.
    """

    id: str
    kind: ApprovalKind
    status: ApprovalStatus
    agent_id: str
    client_id: str
    task_id: str
    purpose: str
    binding: str
    created_at: datetime
    expires_at: datetime
    scopes: tuple[str, ...] = ()
    connector: str | None = None
    tool: str | None = None
    arguments: Mapping[str, Any] | None = None
    token_jti: str | None = None
    decision_id: str | None = None
    decided_at: datetime | None = None
    decided_by: str | None = None
    reason: str = ""
    consumed_at: datetime | None = None

    def expired_at(self, now: datetime) -> bool:
        return now >= self.expires_at


def new_call_approval(
    approval_id: str,
    *,
    agent_id: str,
    client_id: str,
    task_id: str,
    purpose: str,
    token_jti: str,
    decision_id: str,
    connector: str,
    tool: str,
    arguments: Mapping[str, Any],
    scopes: Sequence[str] = (),
    now: datetime,
    ttl_seconds: float,
) -> Approval:
    """A pending approval for one held call, expiring ``ttl_seconds`` after ``now``."""
    return Approval(
        id=approval_id,
        kind=ApprovalKind.CALL,
        status=ApprovalStatus.PENDING,
        agent_id=agent_id,
        client_id=client_id,
        task_id=task_id,
        purpose=purpose,
        binding=call_binding(connector, tool, arguments),
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
        scopes=tuple(scopes),
        connector=connector,
        tool=tool,
        arguments=dict(arguments),
        token_jti=token_jti,
        decision_id=decision_id,
    )


def new_token_approval(
    approval_id: str,
    *,
    agent_id: str,
    task_id: str,
    purpose: str,
    scopes: Sequence[str],
    binding: str,
    now: datetime,
    ttl_seconds: float,
) -> Approval:
    """A pending approval for one token request, expiring ``ttl_seconds`` after ``now``."""
    return Approval(
        id=approval_id,
        kind=ApprovalKind.TOKEN,
        status=ApprovalStatus.PENDING,
        agent_id=agent_id,
        client_id=agent_id,
        task_id=task_id,
        purpose=purpose,
        binding=binding,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
        scopes=tuple(scopes),
    )


def effective_status(approval: Approval, now: datetime) -> ApprovalStatus:
    """The status as of ``now``: pending or approved-but-unused past ``expires_at`` is expired."""
    live = approval.status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED)
    if live and approval.expired_at(now):
        return ApprovalStatus.EXPIRED
    return approval.status


def _expired_message(approval: Approval, what: str) -> str:
    return (
        f"approval {approval.id} expired at {approval.expires_at.isoformat()}: "
        f"it can no longer be {what}; nothing was released"
    )


def decide(
    approval: Approval, *, approve: bool, actor: str, reason: str, now: datetime
) -> Approval:
    """Approve or deny a pending approval.

    Raises:
        ApprovalRefused: ``expired`` (past ``expires_at``, or expired already), or
            ``already-decided`` (approved, denied or consumed before).
    """
    status = effective_status(approval, now)
    verb = "approved" if approve else "denied"
    if status is ApprovalStatus.EXPIRED:
        raise ApprovalRefused(
            approval.id, Problem.EXPIRED, status, _expired_message(approval, verb)
        )
    if status is not ApprovalStatus.PENDING:
        by = f" by {approval.decided_by}" if approval.decided_by else ""
        raise ApprovalRefused(
            approval.id,
            Problem.ALREADY_DECIDED,
            status,
            f"approval {approval.id} is already {status.value}{by}: expected pending",
        )
    return replace(
        approval,
        status=ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED,
        decided_at=now,
        decided_by=actor,
        reason=reason,
    )


def consume(approval: Approval, binding: str, *, now: datetime) -> Approval:
    """Use an approved approval for the request whose binding is ``binding``: once, exactly.

    Raises:
        ApprovalRefused: ``binding-mismatch`` (another call or request: the approval stays
            usable for its own), ``consumed`` (used before), ``expired``, ``not-approved``
            (pending or denied).
    """
    status = effective_status(approval, now)
    if binding != approval.binding:
        raise ApprovalRefused(
            approval.id,
            Problem.BINDING_MISMATCH,
            status,
            f"approval {approval.id} was given for another {approval.kind.value}: "
            f"expected binding {approval.binding[:12]}, found {binding[:12]}",
        )
    if status is ApprovalStatus.CONSUMED:
        raise ApprovalRefused(
            approval.id, Problem.CONSUMED, status, f"approval {approval.id} was already used"
        )
    if status is ApprovalStatus.EXPIRED:
        raise ApprovalRefused(
            approval.id, Problem.EXPIRED, status, _expired_message(approval, "used")
        )
    if status is not ApprovalStatus.APPROVED:
        raise ApprovalRefused(
            approval.id,
            Problem.NOT_APPROVED,
            status,
            f"approval {approval.id} is {status.value}: expected approved",
        )
    return replace(approval, status=ApprovalStatus.CONSUMED, consumed_at=now)


def expire(approval: Approval, *, now: datetime) -> Approval:
    """Withdraw a pending approval (the requester stopped waiting, or it ran out of time).

    Any other status is returned unchanged: an approval decided just before is kept, so the
    caller can still use an approval that raced its timeout.
    """
    if approval.status is not ApprovalStatus.PENDING:
        return approval
    return replace(approval, status=ApprovalStatus.EXPIRED, decided_at=now)
