"""Delegation: a child token never widens its parent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.delegation import DelegationRefused, derive_child_claims
from broker.core.identity import Agent, AgentStatus
from broker.core.tokens import TokenClaims

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
ROOT_JTI = "r" * 22
CHILD_JTI = "c" * 22
GRANDCHILD_JTI = "g" * 22


def agent(agent_id: str, **over: Any) -> Agent:
    base: dict[str, Any] = {
        "id": agent_id,
        "name": agent_id,
        "owner": "ops",
        "status": AgentStatus.ACTIVE,
        "allowed_scopes": ("files:read", "files:write", "web:fetch"),
        "max_ttl_seconds": 900,
        "auth_method": "client_secret",
        "created_at": NOW - timedelta(days=1),
        "max_delegation_depth": 3,
    }
    base.update(over)
    return Agent(**base)


A = agent("agent-a")
B = agent("agent-b")
C = agent("agent-c")


def root(**over: Any) -> TokenClaims:
    base: dict[str, Any] = {
        "iss": "http://127.0.0.1:8765",
        "aud": "http://127.0.0.1:8765/mcp",
        "sub": "agent-a",
        "client_id": "agent-a",
        "exp": T + 600,
        "iat": T,
        "nbf": T,
        "jti": ROOT_JTI,
        "scope": "files:read files:write",
        "task": {"id": "task-1", "purpose": "tidy the workspace"},
    }
    base.update(over)
    return TokenClaims.model_validate(base)


def derive(
    parent: TokenClaims,
    child: Agent = B,
    *,
    parent_agent: Agent = A,
    scopes: Sequence[str] | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
    ttl: int | None = None,
    budget: int | None = None,
    now: datetime = NOW,
    jti: str = CHILD_JTI,
    max_depth: int = 3,
    purpose: str | None = None,
) -> TokenClaims:
    return derive_child_claims(
        parent,
        child_agent=child,
        parent_agent=parent_agent,
        requested_scopes=scopes,
        extra_details=details,
        requested_ttl=ttl,
        budget=budget,
        now=now,
        jti=jti,
        max_depth=max_depth,
        purpose=purpose,
    )


def test_a_child_token_speaks_for_the_root_through_the_child_agent() -> None:
    child = derive(root(), scopes=["files:read"], purpose="read one file")
    assert child.sub == "agent-a"
    assert child.client_id == "agent-b"
    assert child.act is not None
    assert child.act.to_json() == {"sub": "agent-b"}
    assert child.delegation is not None
    assert child.delegation.to_json() == {"parent": ROOT_JTI, "chain": [ROOT_JTI], "depth": 1}
    assert child.scopes == ("files:read",)
    assert child.task.id == "task-1"
    assert child.task.purpose == "read one file"
    assert child.iat == child.nbf == T
    assert child.exp == T + 600
    assert (child.iss, child.aud) == (root().iss, root().aud)


def test_a_grandchild_extends_the_actor_chain_and_the_ancestors() -> None:
    child = derive(root())
    grandchild = derive(child, C, parent_agent=B, jti=GRANDCHILD_JTI)
    assert grandchild.act is not None
    assert grandchild.act.to_json() == {"sub": "agent-c", "act": {"sub": "agent-b"}}
    assert grandchild.ancestor_jtis == (ROOT_JTI, CHILD_JTI)
    assert grandchild.agents_in_chain == ("agent-a", "agent-b", "agent-c")
    assert grandchild.task.purpose == "tidy the workspace"


def test_constraints_are_kept_and_extended() -> None:
    parent = root(authorization_details=[{"type": "tool_call", "connector": "files"}])
    extra = {"type": "tool_call", "tools": ["read_*"]}
    child = derive(parent, details=[extra])
    assert child.authorization_details == (
        {"type": "tool_call", "connector": "files"},
        {"type": "tool_call", "tools": ["read_*"]},
    )
    assert derive(parent).authorization_details == parent.authorization_details
    assert derive(root(), details=[extra]).authorization_details == (extra,)
    assert derive(root()).authorization_details is None


def test_lifetime_is_capped_by_the_request_the_child_agent_and_the_parent() -> None:
    assert derive(root(), ttl=60).exp == T + 60
    assert derive(root(exp=T + 3000), ttl=2000).exp == T + 900
    assert derive(root(exp=T + 3000)).exp == T + 900
    assert derive(root(), ttl=3000).exp == T + 600


def test_budget_is_inherited_or_narrowed() -> None:
    assert derive(root(budget=10)).budget == 10
    assert derive(root(budget=10), budget=3).budget == 3
    assert derive(root(), budget=3).budget == 3
    assert derive(root()).budget is None


def test_default_scopes_are_the_parents_that_the_child_may_hold() -> None:
    child = derive(root(), agent("agent-b", allowed_scopes=("files:read", "web:fetch")))
    assert child.scopes == ("files:read",)


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("scope-not-in-parent", {"scopes": ["web:fetch"]}, "invalid_scope"),
    (
        "scope-not-allowed-for-child",
        {"scopes": ["files:write"], "child": "reader"},
        "invalid_scope",
    ),
    ("no-scope-requested", {"scopes": []}, "invalid_scope"),
    ("no-common-scope", {"child": "fetcher"}, "invalid_scope"),
    ("ttl-zero", {"ttl": 0}, "invalid_request"),
    ("budget-zero", {"budget": 0}, "invalid_request"),
    ("budget-above-parent", {"parent": {"budget": 5}, "budget": 6}, "invalid_request"),
    ("detail-without-type", {"details": [{"connector": "files"}]}, "invalid_request"),
    ("purpose-with-newline", {"purpose": "a\nb"}, "invalid_request"),
    ("child-already-in-chain", {"child": "agent-a"}, "invalid_request"),
    ("parent-expired", {"now": NOW + timedelta(seconds=600)}, "invalid_grant"),
    ("parent-agent-mismatch", {"parent_agent": "agent-b"}, "invalid_grant"),
    ("parent-agent-quarantined", {"parent_agent": "quarantined-a"}, "invalid_grant"),
    ("child-disabled", {"child": "disabled-b"}, "access_denied"),
    ("depth-over-config", {"max_depth": 0}, "access_denied"),
    ("depth-over-parent-agent", {"parent_agent": "shallow-a"}, "access_denied"),
]

AGENTS = {
    "reader": agent("agent-b", allowed_scopes=("files:read",)),
    "fetcher": agent("agent-b", allowed_scopes=("web:fetch",)),
    "agent-a": A,
    "agent-b": B,
    "disabled-b": agent("agent-b", status=AgentStatus.DISABLED),
    "quarantined-a": agent("agent-a", status=AgentStatus.QUARANTINED),
    "shallow-a": agent("agent-a", max_delegation_depth=0),
}


@pytest.mark.parametrize(("case", "error"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_request_that_would_widen_or_break_the_chain_is_refused(
    case: dict[str, Any], error: str
) -> None:
    case = dict(case)
    parent = root(**case.pop("parent", {}))
    child = AGENTS[case.pop("child", "agent-b")]
    parent_agent = AGENTS[case.pop("parent_agent", "agent-a")]
    with pytest.raises(DelegationRefused) as info:
        derive(parent, child, parent_agent=parent_agent, **case)
    assert info.value.error == error
    assert info.value.description


SCOPES = ("files:read", "files:write", "web:fetch", "git:log")
DETAIL = st.fixed_dictionaries(
    {"type": st.sampled_from(["tool_call", "data_flow"])},
    optional={"connector": st.sampled_from(["files", "git"]), "max": st.integers(0, 9)},
)


@st.composite
def parents(draw: st.DrawFn) -> TokenClaims:
    scopes = draw(st.lists(st.sampled_from(SCOPES), min_size=1, unique=True))
    lifetime = draw(st.integers(1, 3600))
    age = draw(st.integers(0, lifetime + 5))
    details = draw(st.none() | st.lists(DETAIL, max_size=3))
    return root(
        scope=" ".join(scopes),
        iat=T - age,
        nbf=T - age,
        exp=T - age + lifetime,
        authorization_details=details,
        budget=draw(st.none() | st.integers(1, 50)),
    )


@given(
    parent=parents(),
    allowed=st.lists(st.sampled_from(SCOPES), unique=True),
    requested=st.none() | st.lists(st.sampled_from(SCOPES), unique=True),
    extra=st.none() | st.lists(DETAIL, max_size=2),
    ttl=st.none() | st.integers(-5, 7200),
    budget=st.none() | st.integers(-1, 100),
    child_max_ttl=st.integers(10, 7200),
    max_depth=st.integers(0, 4),
    parent_limit=st.integers(0, 4),
)
def test_a_child_never_widens_scope_constraints_lifetime_budget_or_depth(
    parent: TokenClaims,
    allowed: list[str],
    requested: list[str] | None,
    extra: list[dict[str, Any]] | None,
    ttl: int | None,
    budget: int | None,
    child_max_ttl: int,
    max_depth: int,
    parent_limit: int,
) -> None:
    child_agent = agent("agent-b", allowed_scopes=tuple(allowed), max_ttl_seconds=child_max_ttl)
    parent_agent = agent("agent-a", max_delegation_depth=parent_limit)
    try:
        child = derive(
            parent,
            child_agent,
            parent_agent=parent_agent,
            scopes=requested,
            details=extra,
            ttl=ttl,
            budget=budget,
            max_depth=max_depth,
        )
    except DelegationRefused:
        return
    assert set(child.scopes) <= set(parent.scopes)
    assert set(child.scopes) <= set(allowed)
    inherited = parent.authorization_details or ()
    assert (child.authorization_details or ())[: len(inherited)] == inherited
    assert child.exp <= parent.exp
    assert child.exp - child.iat <= child_max_ttl
    assert child.iat == T
    if parent.budget is not None:
        assert child.budget is not None
        assert child.budget <= parent.budget
    assert child.depth == parent.depth + 1 <= min(max_depth, parent_limit)
    assert child.sub == parent.sub
    assert child.task.id == parent.task.id
    assert child.ancestor_jtis[-1] == parent.jti
