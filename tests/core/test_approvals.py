"""Approval values and rules: bindings, the state machine, expiry and single use."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.core.approvals import (
    Approval,
    ApprovalKind,
    ApprovalRefused,
    ApprovalStatus,
    Problem,
    call_binding,
    canonical_json,
    consume,
    decide,
    effective_status,
    expire,
    new_call_approval,
    new_token_approval,
    token_request_binding,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=30)
AFTER_EXPIRY = NOW + timedelta(seconds=120)


def held_call(arguments: dict[str, object] | None = None) -> Approval:
    return new_call_approval(
        "apr_1",
        agent_id="ag_a",
        client_id="ag_a",
        task_id="tsk_1",
        purpose="tidy the workspace",
        token_jti="jti_1",
        decision_id="dec_1",
        connector="files",
        tool="delete_file",
        arguments=arguments or {"path": "/srv/ws/a.txt"},
        scopes=("files:delete",),
        now=NOW,
        ttl_seconds=120,
    )


def approved(approval: Approval) -> Approval:
    return decide(approval, approve=True, actor="cli:alice", reason="ok", now=LATER)


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_unicode() -> None:
    assert canonical_json({"b": 1, "a": ["é", None]}) == '{"a":["é",null],"b":1}'


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON"):
        canonical_json({"x": float("nan")})


def test_call_binding_is_stable_under_key_order_and_changes_with_any_part() -> None:
    base = call_binding("files", "delete_file", {"path": "/a", "force": False})
    assert base == call_binding("files", "delete_file", {"force": False, "path": "/a"})
    assert len(base) == 64
    others = {
        call_binding("files", "delete_file", {"path": "/b", "force": False}),
        call_binding("files", "delete_file", {"path": "/a", "force": True}),
        call_binding("files", "move_file", {"path": "/a", "force": False}),
        call_binding("other", "delete_file", {"path": "/a", "force": False}),
    }
    assert base not in others
    assert len(others) == 4


def test_token_request_binding_ignores_scope_order_but_not_task_purpose_or_narrowing() -> None:
    def binding(scopes: tuple[str, ...] = ("a", "b"), **kw: Any) -> str:
        fields: dict[str, Any] = {"task_id": "t", "purpose": "p"} | kw
        return token_request_binding("ag", scopes, **fields)

    base = binding()
    assert base == binding(scopes=("b", "a", "a"))
    variants = [
        binding(scopes=("a",)),
        binding(task_id="t2"),
        binding(purpose="other"),
        binding(authorization_details=[{"type": "tool_call"}]),
        binding(budget=3),
        binding(expires_in=60),
    ]
    assert base not in variants
    assert token_request_binding("ag2", ("a", "b"), task_id="t", purpose="p") != base


def test_a_new_call_approval_is_pending_and_bound_to_its_call() -> None:
    approval = held_call()
    assert approval.kind is ApprovalKind.CALL
    assert approval.status is ApprovalStatus.PENDING
    assert approval.expires_at == NOW + timedelta(seconds=120)
    assert approval.binding == call_binding("files", "delete_file", {"path": "/srv/ws/a.txt"})


def test_a_new_token_approval_is_pending_with_its_scopes() -> None:
    approval = new_token_approval(
        "apr_2",
        agent_id="ag_a",
        task_id="t",
        purpose="p",
        scopes=("deploy:prod",),
        binding="b" * 64,
        now=NOW,
        ttl_seconds=600,
    )
    assert (approval.kind, approval.status, approval.scopes) == (
        ApprovalKind.TOKEN,
        ApprovalStatus.PENDING,
        ("deploy:prod",),
    )
    assert approval.client_id == "ag_a"


@pytest.mark.parametrize(
    ("approve", "status"),
    [(True, ApprovalStatus.APPROVED), (False, ApprovalStatus.DENIED)],
    ids=["approve", "deny"],
)
def test_deciding_a_pending_approval_records_who_when_and_why(
    approve: bool, status: ApprovalStatus
) -> None:
    decided = decide(
        held_call(), approve=approve, actor="cli:alice", reason="looks fine", now=LATER
    )
    assert decided.status is status
    assert (decided.decided_by, decided.decided_at, decided.reason) == (
        "cli:alice",
        LATER,
        "looks fine",
    )


def test_deciding_an_expired_request_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ApprovalRefused, match="expired at 2026-11-23T12:02:00") as caught:
        decide(held_call(), approve=True, actor="cli:alice", reason="", now=AFTER_EXPIRY)
    assert caught.value.problem is Problem.EXPIRED
    assert "nothing was released" in str(caught.value)


def test_deciding_exactly_at_expiry_is_refused() -> None:
    with pytest.raises(ApprovalRefused) as caught:
        decide(held_call(), approve=False, actor="x", reason="", now=held_call().expires_at)
    assert caught.value.problem is Problem.EXPIRED


@pytest.mark.parametrize(
    "prior",
    [ApprovalStatus.APPROVED, ApprovalStatus.DENIED, ApprovalStatus.CONSUMED],
    ids=["approved", "denied", "consumed"],
)
def test_deciding_twice_is_refused_as_already_decided(prior: ApprovalStatus) -> None:
    done = replace(held_call(), status=prior, decided_by="cli:bob")
    with pytest.raises(ApprovalRefused, match=f"already {prior.value} by cli:bob") as caught:
        decide(done, approve=True, actor="cli:alice", reason="", now=LATER)
    assert caught.value.problem is Problem.ALREADY_DECIDED


def test_deciding_a_withdrawn_request_is_refused_as_expired() -> None:
    withdrawn = expire(held_call(), now=LATER)
    with pytest.raises(ApprovalRefused) as caught:
        decide(withdrawn, approve=True, actor="cli:alice", reason="", now=LATER)
    assert caught.value.problem is Problem.EXPIRED


def test_an_approved_call_is_consumed_once_for_its_own_arguments() -> None:
    approval = approved(held_call())
    used = consume(approval, approval.binding, now=LATER)
    assert used.status is ApprovalStatus.CONSUMED
    assert used.consumed_at == LATER
    with pytest.raises(ApprovalRefused, match="already used") as caught:
        consume(used, approval.binding, now=LATER)
    assert caught.value.problem is Problem.CONSUMED


def test_an_approval_for_other_arguments_is_refused_and_not_used_up() -> None:
    approval = approved(held_call({"path": "/srv/ws/a.txt"}))
    other = call_binding("files", "delete_file", {"path": "/srv/ws/b.txt"})
    with pytest.raises(ApprovalRefused, match="for another call") as caught:
        consume(approval, other, now=LATER)
    assert caught.value.problem is Problem.BINDING_MISMATCH
    assert "/srv/ws" not in str(caught.value)
    assert consume(approval, approval.binding, now=LATER).status is ApprovalStatus.CONSUMED


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (ApprovalStatus.PENDING, Problem.NOT_APPROVED),
        (ApprovalStatus.DENIED, Problem.NOT_APPROVED),
        (ApprovalStatus.EXPIRED, Problem.EXPIRED),
    ],
    ids=["pending", "denied", "expired"],
)
def test_only_an_approved_approval_can_be_consumed(
    status: ApprovalStatus, problem: Problem
) -> None:
    approval = replace(held_call(), status=status)
    with pytest.raises(ApprovalRefused) as caught:
        consume(approval, approval.binding, now=LATER)
    assert caught.value.problem is problem


def test_an_approved_approval_not_used_before_expiry_releases_nothing() -> None:
    approval = approved(held_call())
    with pytest.raises(ApprovalRefused) as caught:
        consume(approval, approval.binding, now=AFTER_EXPIRY)
    assert caught.value.problem is Problem.EXPIRED
    assert caught.value.status is ApprovalStatus.EXPIRED


@pytest.mark.parametrize(
    ("status", "at", "expected"),
    [
        (ApprovalStatus.PENDING, LATER, ApprovalStatus.PENDING),
        (ApprovalStatus.PENDING, AFTER_EXPIRY, ApprovalStatus.EXPIRED),
        (ApprovalStatus.APPROVED, AFTER_EXPIRY, ApprovalStatus.EXPIRED),
        (ApprovalStatus.DENIED, AFTER_EXPIRY, ApprovalStatus.DENIED),
        (ApprovalStatus.CONSUMED, AFTER_EXPIRY, ApprovalStatus.CONSUMED),
    ],
    ids=["pending", "pending-late", "approved-late", "denied-late", "consumed-late"],
)
def test_effective_status_expires_only_live_approvals(
    status: ApprovalStatus, at: datetime, expected: ApprovalStatus
) -> None:
    assert effective_status(replace(held_call(), status=status), at) is expected


def test_expire_withdraws_a_pending_approval_and_keeps_a_decided_one() -> None:
    assert expire(held_call(), now=LATER).status is ApprovalStatus.EXPIRED
    decided = approved(held_call())
    assert expire(decided, now=LATER) is decided
