"""The revocation view and the check every token use goes through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.core.decision import Reason
from broker.core.identity import AgentStatus
from broker.core.revocation import Revocation, RevocationKind, RevocationView, check_token
from broker.core.tokens import TokenClaims

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
ROOT, CHILD, GRANDCHILD = "r" * 22, "c" * 22, "g" * 22


def token(**over: Any) -> TokenClaims:
    base: dict[str, Any] = {
        "iss": "http://127.0.0.1:8765",
        "aud": "http://127.0.0.1:8765/mcp",
        "sub": "agent-a",
        "client_id": "agent-a",
        "exp": T + 600,
        "iat": T - 10,
        "nbf": T - 10,
        "jti": ROOT,
        "scope": "files:read",
        "task": {"id": "task-1"},
    }
    base.update(over)
    return TokenClaims.model_validate(base)


GRANDCHILD_TOKEN = token(
    client_id="agent-c",
    jti=GRANDCHILD,
    act={"sub": "agent-c", "act": {"sub": "agent-b"}},
    delegation={"parent": CHILD, "chain": [ROOT, CHILD], "depth": 2},
)


def rev(seq: int, kind: RevocationKind, subject: str, at: datetime = NOW) -> Revocation:
    return Revocation(seq=seq, kind=kind, subject=subject, at=at, reason="test", actor="admin")


FRESH = RevocationView().confirmed(NOW)


def check(claims: TokenClaims, view: RevocationView, now: datetime = NOW) -> Reason | None:
    return check_token(claims, view, now=now, staleness=5.0)


def test_a_fresh_empty_view_lets_a_token_through() -> None:
    assert check(token(), FRESH) is None
    assert check(GRANDCHILD_TOKEN, FRESH) is None


def test_a_view_never_confirmed_or_too_old_fails_closed() -> None:
    assert check(token(), RevocationView()) is Reason.STORE_UNAVAILABLE
    assert check(token(), FRESH, NOW + timedelta(seconds=5)) is None
    assert check(token(), FRESH, NOW + timedelta(seconds=5.01)) is Reason.STORE_UNAVAILABLE


CASES: list[tuple[str, list[Revocation], TokenClaims, Reason | None]] = [
    ("own-jti", [rev(1, RevocationKind.TOKEN, ROOT)], token(), Reason.TOKEN_REVOKED),
    ("other-jti", [rev(1, RevocationKind.TOKEN, CHILD)], token(), None),
    ("task", [rev(1, RevocationKind.TASK, "task-1")], token(), Reason.TOKEN_REVOKED),
    ("other-task", [rev(1, RevocationKind.TASK, "task-2")], token(), None),
    (
        "root-revokes-grandchild",
        [rev(1, RevocationKind.TOKEN, ROOT)],
        GRANDCHILD_TOKEN,
        Reason.TOKEN_REVOKED,
    ),
    (
        "parent-revokes-child",
        [rev(1, RevocationKind.TOKEN, CHILD)],
        GRANDCHILD_TOKEN,
        Reason.TOKEN_REVOKED,
    ),
    (
        "agent-cutoff-after-iat",
        [rev(1, RevocationKind.AGENT, "agent-a")],
        token(),
        Reason.TOKEN_REVOKED,
    ),
    (
        "agent-cutoff-at-iat",
        [rev(1, RevocationKind.AGENT, "agent-a", NOW - timedelta(seconds=10))],
        token(),
        Reason.TOKEN_REVOKED,
    ),
    (
        "agent-cutoff-before-iat",
        [rev(1, RevocationKind.AGENT, "agent-a", NOW - timedelta(seconds=11))],
        token(),
        None,
    ),
    (
        "middle-agent-cascades-to-grandchild",
        [rev(1, RevocationKind.AGENT, "agent-b")],
        GRANDCHILD_TOKEN,
        Reason.TOKEN_REVOKED,
    ),
    (
        "root-agent-cascades-to-grandchild",
        [rev(1, RevocationKind.AGENT, "agent-a")],
        GRANDCHILD_TOKEN,
        Reason.TOKEN_REVOKED,
    ),
    ("unrelated-agent", [rev(1, RevocationKind.AGENT, "agent-z")], GRANDCHILD_TOKEN, None),
]


@pytest.mark.parametrize(
    ("revocations", "claims", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_revocations_reach_the_token_its_ancestors_task_and_agents(
    revocations: list[Revocation], claims: TokenClaims, expected: Reason | None
) -> None:
    assert check(claims, FRESH.with_revocations(revocations)) is expected


@pytest.mark.parametrize(
    ("agent_id", "status", "expected"),
    [
        ("agent-b", AgentStatus.QUARANTINED, Reason.AGENT_QUARANTINED),
        ("agent-c", AgentStatus.DISABLED, Reason.AGENT_DISABLED),
        ("agent-a", AgentStatus.ACTIVE, None),
        ("agent-z", AgentStatus.DISABLED, None),
    ],
    ids=["middle-quarantined", "client-disabled", "active", "unrelated"],
)
def test_an_inactive_agent_anywhere_in_the_chain_refuses_the_token(
    agent_id: str, status: AgentStatus, expected: Reason | None
) -> None:
    view = FRESH.with_statuses([(agent_id, status, NOW)])
    assert check(GRANDCHILD_TOKEN, view) is expected


def test_quarantine_wins_over_disable_and_over_revocation() -> None:
    view = FRESH.with_statuses(
        [("agent-a", AgentStatus.DISABLED, NOW), ("agent-c", AgentStatus.QUARANTINED, NOW)]
    ).with_revocations([rev(1, RevocationKind.AGENT, "agent-c")])
    assert check(GRANDCHILD_TOKEN, view) is Reason.AGENT_QUARANTINED


def test_the_later_status_change_wins_whatever_the_order_they_arrive_in() -> None:
    early, late = NOW - timedelta(seconds=5), NOW
    view = FRESH.with_statuses([("agent-a", AgentStatus.ACTIVE, late)]).with_statuses(
        [("agent-a", AgentStatus.QUARANTINED, early)]
    )
    assert view.agent_statuses["agent-a"] is AgentStatus.ACTIVE
    assert view.statuses_as_of == late
    released = view.with_statuses([("agent-a", AgentStatus.DISABLED, late)])
    assert released.agent_statuses["agent-a"] is AgentStatus.DISABLED


def test_a_released_agent_keeps_its_old_tokens_revoked_but_new_ones_work() -> None:
    view = FRESH.with_revocations([rev(1, RevocationKind.AGENT, "agent-a")]).with_statuses(
        [("agent-a", AgentStatus.ACTIVE, NOW + timedelta(seconds=1))]
    )
    assert check(token(), view) is Reason.TOKEN_REVOKED
    later = NOW + timedelta(seconds=2)
    new = token(iat=int(later.timestamp()), nbf=int(later.timestamp()))
    assert check(new, view.confirmed(later), later) is None


def test_applying_revocations_tracks_seq_keeps_the_latest_cutoff_and_is_idempotent() -> None:
    first = rev(3, RevocationKind.AGENT, "agent-a", NOW)
    older = rev(2, RevocationKind.AGENT, "agent-a", NOW - timedelta(seconds=60))
    view = FRESH.with_revocations([first, older])
    assert view.seq == 3
    assert view.agent_cutoffs["agent-a"] == NOW
    again = view.with_revocations([older, rev(1, RevocationKind.TOKEN, ROOT)])
    assert again.agent_cutoffs["agent-a"] == NOW
    assert again.seq == 3
    assert again.revoked_jtis == {ROOT}
    assert again.with_revocations([]) == again


def test_a_local_revocation_does_not_skip_ones_not_fetched_yet() -> None:
    view = FRESH.with_revocations([rev(9, RevocationKind.TOKEN, ROOT)], advance=False)
    assert view.seq == 0
    assert check(token(), view) is Reason.TOKEN_REVOKED


def test_confirming_never_moves_freshness_backwards() -> None:
    view = FRESH.confirmed(NOW - timedelta(seconds=1))
    assert view.as_of == NOW
    assert FRESH.confirmed(NOW + timedelta(seconds=1)).as_of == NOW + timedelta(seconds=1)


def test_a_closed_task_is_refused_last_and_remembers_its_first_close() -> None:
    task = token().task.id
    closed = FRESH.with_revocations([rev(7, RevocationKind.TASK_CLOSED, task)])
    assert check(token(), closed) is Reason.TASK_CLOSED
    assert closed.closed_tasks == {task: 7}
    # A second close (another replica's, or a retry) keeps the first on record, in any order.
    again = closed.with_revocations([rev(9, RevocationKind.TASK_CLOSED, task)])
    assert again.closed_tasks == {task: 7}
    earlier = FRESH.with_revocations(
        [rev(9, RevocationKind.TASK_CLOSED, task), rev(7, RevocationKind.TASK_CLOSED, task)]
    )
    assert earlier.closed_tasks == {task: 7}
    # Revoked or quarantined wins over closed: those are refused at the door.
    revoked = closed.with_revocations([rev(8, RevocationKind.TASK, task)])
    assert check(token(), revoked) is Reason.TOKEN_REVOKED
    assert check(token(), closed.with_statuses([("agent-a", AgentStatus.QUARANTINED, NOW)])) is (
        Reason.AGENT_QUARANTINED
    )
    # Another task of the same agent is untouched.
    other = token(task={"id": "task-2"})
    assert check(other, closed) is None
