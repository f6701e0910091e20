"""Approvals in the store, on SQLite and PostgreSQL: the core's rules applied atomically."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from broker.core.approvals import (
    Approval,
    ApprovalKind,
    ApprovalRefused,
    ApprovalStatus,
    Problem,
    call_binding,
    new_call_approval,
    new_token_approval,
)
from broker.errors import NotFound
from broker.store import SqlStore
from broker.store.errors import Conflict

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)


def call(approval_id: str = "apr_call", arguments: dict[str, object] | None = None) -> Approval:
    return new_call_approval(
        approval_id,
        agent_id="ag_a",
        client_id="ag_b",
        task_id="tsk_1",
        purpose="clean up",
        token_jti="jti_1",
        decision_id="dec_1",
        connector="files",
        tool="delete_file",
        arguments=arguments or {"path": "/srv/ws/é.txt", "n": [1, 2.5, None, True]},
        scopes=("files:delete",),
        now=NOW,
        ttl_seconds=60,
    )


def token(approval_id: str = "apr_tok") -> Approval:
    return new_token_approval(
        approval_id,
        agent_id="ag_a",
        task_id="tsk_2",
        purpose="deploy",
        scopes=("deploy:prod", "demo:use"),
        binding="f" * 64,
        now=NOW,
        ttl_seconds=600,
    )


async def test_an_approval_round_trips_with_its_exact_arguments(store: SqlStore) -> None:
    approval = call()
    await store.create_approval(approval)
    assert await store.get_approval("apr_call") == approval


async def test_a_taken_approval_id_is_a_conflict(store: SqlStore) -> None:
    await store.create_approval(call())
    with pytest.raises(Conflict, match="apr_call"):
        await store.create_approval(call())


async def test_an_unknown_approval_is_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFound, match="apr_nope"):
        await store.get_approval("apr_nope")
    with pytest.raises(NotFound):
        await store.decide_approval("apr_nope", approve=True, actor="a", reason="", at=NOW)


async def test_list_filters_by_status_kind_and_agent_oldest_first(store: SqlStore) -> None:
    await store.create_approval(token())
    await store.create_approval(call("apr_c2"))
    await store.decide_approval("apr_c2", approve=False, actor="cli:x", reason="no", at=LATER)
    everything = await store.list_approvals()
    assert [a.id for a in everything] == ["apr_c2", "apr_tok"]
    pending = await store.list_approvals(status=ApprovalStatus.PENDING)
    assert [a.id for a in pending] == ["apr_tok"]
    assert [a.id for a in await store.list_approvals(kind=ApprovalKind.CALL)] == ["apr_c2"]
    assert await store.list_approvals(agent_id="ag_other") == []


async def test_approve_then_consume_once_with_the_same_binding(store: SqlStore) -> None:
    approval = call()
    await store.create_approval(approval)
    decided = await store.decide_approval(
        approval.id, approve=True, actor="cli:alice", reason="fine", at=LATER
    )
    assert (decided.status, decided.decided_by, decided.reason) == (
        ApprovalStatus.APPROVED,
        "cli:alice",
        "fine",
    )
    used = await store.consume_approval(approval.id, approval.binding, at=LATER)
    assert used.status is ApprovalStatus.CONSUMED
    with pytest.raises(ApprovalRefused) as caught:
        await store.consume_approval(approval.id, approval.binding, at=LATER)
    assert caught.value.problem is Problem.CONSUMED
    assert (await store.get_approval(approval.id)).consumed_at == LATER


async def test_consuming_for_different_arguments_is_refused_and_changes_nothing(
    store: SqlStore,
) -> None:
    approval = call()
    await store.create_approval(approval)
    await store.decide_approval(approval.id, approve=True, actor="a", reason="", at=LATER)
    other = call_binding("files", "delete_file", {"path": "/srv/ws/other.txt"})
    with pytest.raises(ApprovalRefused) as caught:
        await store.consume_approval(approval.id, other, at=LATER)
    assert caught.value.problem is Problem.BINDING_MISMATCH
    assert (await store.get_approval(approval.id)).status is ApprovalStatus.APPROVED


async def test_deciding_an_expired_request_is_refused_and_recorded_as_expired(
    store: SqlStore,
) -> None:
    approval = call()
    await store.create_approval(approval)
    late = approval.expires_at + timedelta(seconds=1)
    with pytest.raises(ApprovalRefused, match="expired at") as caught:
        await store.decide_approval(approval.id, approve=True, actor="cli:a", reason="", at=late)
    assert caught.value.problem is Problem.EXPIRED
    stored = await store.get_approval(approval.id)
    assert stored.status is ApprovalStatus.EXPIRED
    assert stored.decided_by is None
    with pytest.raises(ApprovalRefused):
        await store.consume_approval(approval.id, approval.binding, at=late)


async def test_a_second_decision_is_refused(store: SqlStore) -> None:
    await store.create_approval(call())
    await store.decide_approval("apr_call", approve=False, actor="cli:a", reason="no", at=LATER)
    with pytest.raises(ApprovalRefused, match="already denied by cli:a"):
        await store.decide_approval("apr_call", approve=True, actor="cli:b", reason="", at=LATER)


async def test_expire_withdraws_pending_only(store: SqlStore) -> None:
    await store.create_approval(call("apr_1"))
    await store.create_approval(call("apr_2"))
    await store.decide_approval("apr_2", approve=True, actor="a", reason="", at=LATER)
    assert (await store.expire_approval("apr_1", at=LATER)).status is ApprovalStatus.EXPIRED
    assert (await store.expire_approval("apr_2", at=LATER)).status is ApprovalStatus.APPROVED


async def test_expire_approvals_marks_overdue_pending_ones(store: SqlStore) -> None:
    await store.create_approval(call("apr_1"))
    await store.create_approval(token("apr_2"))
    assert await store.expire_approvals(at=NOW + timedelta(seconds=60)) == 1
    assert (await store.get_approval("apr_1")).status is ApprovalStatus.EXPIRED
    assert (await store.get_approval("apr_2")).status is ApprovalStatus.PENDING


async def test_concurrent_consumers_release_an_approval_exactly_once(store: SqlStore) -> None:
    approval = call()
    await store.create_approval(approval)
    await store.decide_approval(approval.id, approve=True, actor="a", reason="", at=LATER)
    outcomes: list[str] = []

    async def take() -> None:
        try:
            await store.consume_approval(approval.id, approval.binding, at=LATER)
            outcomes.append("released")
        except ApprovalRefused as exc:
            outcomes.append(exc.problem.value)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(take)
    assert sorted(outcomes) == ["consumed"] * 4 + ["released"]
