"""Human approval end to end, on real SQLite and PostgreSQL stores.

Calls: a real MCP client calls through the broker's MCP front (mediation and all) to a native
downstream tool whose scope says ``approval = "call"``; approvers act through the in-process
`ApprovalDesk` (the admin API's port) or the ``broker approvals`` CLI run in another thread with
its own store connection (seen by the gate's store poll). Token requests: `TokenApprovals`
directly, and through ``POST /oauth/token`` once the token service is wired to it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
import pytest
import typer
from mcp import Client
from mcp.server import ServerRequestContext
from typer.testing import CliRunner

from broker.approvals import (
    ApprovalDesk,
    AuthorizationPending,
    CallApprovalGate,
    Denied,
    PendingApproval,
    TokenApprovals,
)
from broker.cli import approvals as approvals_cli
from broker.config import ApprovalConfig
from broker.core.approvals import (
    ApprovalKind,
    ApprovalRefused,
    ApprovalStatus,
    Problem,
    call_binding,
    token_request_binding,
)
from broker.core.decision import Reason
from broker.errors import OAuthError
from broker.mcp_front import McpFront
from broker.ports import SystemClock
from broker.principal import Principal
from broker.registry import Registry
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url, temporary_postgres_url
from broker.token_service import TokenService
from connectors import NativeConnector, ToolSet
from scopes.definitions import parse_scope_toml

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
DECISION = re.compile(r"dec_[0-9a-f]{20}")

SCOPES_TOML = """
[[scope]]
name = "files:delete"
description = "Delete files in the workspace, each deletion approved by a human"
approval = "call"
[[scope.grant]]
connector = "files"
tools = ["delete_file"]
args = { path = { within = "/srv/ws" } }

[[scope]]
name = "files:list"
[[scope.grant]]
connector = "files"
tools = ["list_files"]

[[scope]]
name = "deploy:prod"
description = "Deploy to production; a human approves each token"
approval = "token"
[[scope.grant]]
connector = "files"
tools = ["list_files"]
"""
SCOPES = parse_scope_toml(SCOPES_TOML, source="test")
SCOPE_DEFS = {s.name: s for s in SCOPES}


@dataclass
class Downstream:
    """What the downstream tool actually received."""

    deleted: list[str] = field(default_factory=list[str])


def files_tools(downstream: Downstream) -> ToolSet:
    tools = ToolSet()

    @tools.tool
    async def delete_file(path: str) -> str:
        """Delete one file."""
        downstream.deleted.append(path)
        return f"deleted {path}"

    @tools.tool
    async def list_files() -> str:
        """List files."""
        return "a.txt b.txt"

    return tools


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        async with temporary_postgres_url() as url:
            yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    async with migrated_store(store_url) as s:
        yield s


@dataclass
class Held:
    """A broker whose MCP front holds approval = "call" scopes at a `CallApprovalGate`."""

    store: SqlStore
    store_url: str
    front: McpFront
    gate: CallApprovalGate
    desk: ApprovalDesk
    downstream: Downstream
    principal: Principal


def make_principal(*scopes: str, agent: str = "ag_cleaner") -> Principal:
    return Principal(
        agent_id=agent,
        client_id=agent,
        scopes=frozenset(scopes),
        token_id="jti_" + "x" * 20,
        task_id="tsk_cleanup",
        task_purpose="remove stale logs from the workspace",
    )


@asynccontextmanager
async def open_held(
    store: SqlStore, store_url: str, *, call_timeout: float = 30.0
) -> AsyncIterator[Held]:
    downstream = Downstream()
    registry = Registry(store, pin_poll_interval=60)
    registry.add(NativeConnector.from_toolset("files", files_tools(downstream)))
    clock = SystemClock()
    gate = CallApprovalGate(
        store, clock, ApprovalConfig(call_timeout=call_timeout), store_poll=0.05
    )
    principal = make_principal("files:delete", "files:list")

    def lookup(_ctx: ServerRequestContext[Any, Any]) -> Principal | None:
        return principal

    front = McpFront(
        registry, SCOPES, principal_lookup=lookup, clock=clock, store=store, approvals=gate
    )
    async with registry:
        for pin in await store.list_pins():
            await store.approve_pin(
                pin.connector_id, pin.tool_name, pin.digest, "test", datetime.now(UTC)
            )
        await registry.reload_pins()
        yield Held(
            store, store_url, front, gate, ApprovalDesk(store, clock, gate), downstream, principal
        )


@pytest.fixture
async def held(store: SqlStore, store_url: str) -> AsyncIterator[Held]:
    async with open_held(store, store_url) as h:
        yield h


@pytest.fixture
async def held_briefly(store: SqlStore, store_url: str) -> AsyncIterator[Held]:
    async with open_held(store, store_url, call_timeout=0.5) as h:
        yield h


def text_of(result: types.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


@dataclass
class Outcome:
    result: types.CallToolResult | None = None


async def call_while(
    held: Held, arguments: dict[str, Any], approver: Any, *, mode: str = "legacy"
) -> types.CallToolResult:
    """Call delete_file; once the call is held, run ``approver(approval)``; return the result."""
    outcome = Outcome()
    async with Client(held.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]

        async def call() -> None:
            outcome.result = await client.call_tool("files__delete_file", arguments)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                [approval] = await held.gate.wait_until_held()
                await approver(approval)
    assert outcome.result is not None
    return outcome.result


def cli_config(tmp_path: Path, store_url: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(f'[store]\nurl = "{store_url}"\n', encoding="utf-8")
    return path


async def run_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """``broker approvals ...`` in a worker thread: its own event loop and store connection."""
    root = typer.Typer()
    root.add_typer(approvals_cli.app, name="approvals")

    def invoke() -> tuple[int, str, str]:
        result = CliRunner().invoke(root, ["approvals", *args, "--config", str(config)])
        return result.exit_code, result.stdout, result.stderr

    return await anyio.to_thread.run_sync(invoke)


# -- calls --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_held_call_approved_at_the_desk_is_released_once_with_its_canonical_arguments(
    held: Held, mode: str
) -> None:
    async def approve(approval: Any) -> None:
        assert approval.arguments == {"path": "/srv/ws/old.log"}
        assert held.downstream.deleted == []
        await held.desk.decide(approval.id, approve=True, actor="admin:t1", reason="stale")

    result = await call_while(held, {"path": "/srv/ws/./logs/../old.log"}, approve, mode=mode)
    assert not result.is_error, text_of(result)
    assert text_of(result) == "deleted /srv/ws/old.log"
    assert held.downstream.deleted == ["/srv/ws/old.log"]
    [approval] = await held.store.list_approvals(kind=ApprovalKind.CALL)
    assert approval.status is ApprovalStatus.CONSUMED
    assert (approval.decided_by, approval.reason) == ("admin:t1", "stale")
    assert approval.purpose == "remove stale logs from the workspace"
    assert DECISION.fullmatch(approval.decision_id or "")


async def test_a_held_call_approved_from_the_cli_in_another_connection_is_released(
    held: Held, tmp_path: Path
) -> None:
    config = cli_config(tmp_path, held.store_url)

    async def approve(approval: Any) -> None:
        code, out, err = await run_cli(config, "list", "--json")
        assert code == 0, err
        assert '"path": "/srv/ws/old.log"' in out
        code, out, err = await run_cli(config, "approve", approval.id, "--reason", "ok")
        assert code == 0, err

    result = await call_while(held, {"path": "/srv/ws/old.log"}, approve)
    assert text_of(result) == "deleted /srv/ws/old.log"
    assert held.downstream.deleted == ["/srv/ws/old.log"]
    [approval] = await held.store.list_approvals()
    assert approval.status is ApprovalStatus.CONSUMED
    assert (approval.decided_by or "").startswith("cli:")


async def test_a_denied_call_is_a_tool_error_naming_approval_denied_and_never_forwarded(
    held: Held, tmp_path: Path
) -> None:
    config = cli_config(tmp_path, held.store_url)

    async def deny(approval: Any) -> None:
        code, _, err = await run_cli(config, "deny", approval.id, "--reason", "keep it")
        assert code == 0, err

    result = await call_while(held, {"path": "/srv/ws/keep.log"}, deny)
    assert result.is_error
    assert DECISION.sub("dec_X", text_of(result)) == "denied (approval-denied); decision dec_X"
    assert held.downstream.deleted == []


async def test_a_call_nobody_approves_in_time_is_a_tool_error_and_the_request_expires(
    held_briefly: Held,
) -> None:
    held = held_briefly
    async with Client(held.front.server, mode="legacy") as client:
        with anyio.fail_after(10):
            result = await client.call_tool("files__delete_file", {"path": "/srv/ws/a.log"})
    assert result.is_error
    assert DECISION.sub("dec_X", text_of(result)) == "denied (approval-required); decision dec_X"
    [approval] = await held.store.list_approvals()
    assert approval.status is ApprovalStatus.EXPIRED
    assert held.downstream.deleted == []


async def test_an_approver_acting_on_an_expired_request_gets_a_clear_error_and_nothing_runs(
    held_briefly: Held, tmp_path: Path
) -> None:
    held = held_briefly
    async with Client(held.front.server, mode="legacy") as client:
        with anyio.fail_after(10):
            result = await client.call_tool("files__delete_file", {"path": "/srv/ws/a.log"})
    assert result.is_error
    [approval] = await held.store.list_approvals()
    code, _, err = await run_cli(cli_config(tmp_path, held.store_url), "approve", approval.id)
    assert code == 1
    assert f"approval {approval.id} expired at" in err
    assert "nothing was released" in err
    with pytest.raises(ApprovalRefused) as caught:
        await held.desk.decide_approval(approval.id, approve=True, actor="admin:t", reason="")
    assert caught.value.problem is Problem.EXPIRED
    assert held.downstream.deleted == []
    assert (await held.store.get_approval(approval.id)).status is ApprovalStatus.EXPIRED


async def test_an_approval_never_releases_a_call_with_other_arguments(held: Held) -> None:
    async def approve(approval: Any) -> None:
        await held.desk.decide(approval.id, approve=True, actor="admin:t", reason="")

    await call_while(held, {"path": "/srv/ws/a.log"}, approve)
    [first] = await held.store.list_approvals()

    async def check_and_deny(second: Any) -> None:
        assert second.id != first.id
        assert second.arguments == {"path": "/srv/ws/b.log"}
        other = call_binding("files", "delete_file", {"path": "/srv/ws/b.log"})
        with pytest.raises(ApprovalRefused) as caught:
            await held.store.consume_approval(first.id, other, at=datetime.now(UTC))
        assert caught.value.problem is Problem.BINDING_MISMATCH
        await held.desk.decide(second.id, approve=False, actor="admin:t", reason="no")

    result = await call_while(held, {"path": "/srv/ws/b.log"}, check_and_deny)
    assert result.is_error
    assert held.downstream.deleted == ["/srv/ws/a.log"]


async def test_a_consumed_approval_cannot_release_anything_again(held: Held) -> None:
    async def approve(approval: Any) -> None:
        await held.desk.decide(approval.id, approve=True, actor="admin:t", reason="")

    await call_while(held, {"path": "/srv/ws/a.log"}, approve)
    [approval] = await held.store.list_approvals()
    with pytest.raises(ApprovalRefused) as caught:
        await held.store.consume_approval(approval.id, approval.binding, at=datetime.now(UTC))
    assert caught.value.problem is Problem.CONSUMED
    with pytest.raises(ApprovalRefused) as decided:
        await held.desk.decide_approval(approval.id, approve=True, actor="admin:t", reason="")
    assert decided.value.problem is Problem.ALREADY_DECIDED
    assert held.downstream.deleted == ["/srv/ws/a.log"]


async def test_a_call_outside_the_approval_scope_is_not_held(held: Held) -> None:
    async with Client(held.front.server, mode="legacy") as client:
        with anyio.fail_after(10):
            result = await client.call_tool("files__list_files", {})
    assert text_of(result) == "a.txt b.txt"
    assert await held.store.list_approvals() == []


async def test_a_call_cancelled_while_held_withdraws_its_approval(held: Held) -> None:
    outcome: list[Reason | None] = []
    held_now: list[Any] = []

    async def hold() -> None:
        outcome.append(
            await held.gate.gate(
                held.principal, "dec_" + "0" * 20, "files", "delete_file", {"path": "/srv/ws/x"}
            )
        )

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            held_now.extend(await held.gate.wait_until_held())
            tg.cancel_scope.cancel()
    [approval] = held_now
    assert outcome == []
    assert held.gate.held() == []
    assert (await held.store.get_approval(approval.id)).status is ApprovalStatus.EXPIRED


async def test_two_identical_calls_are_held_and_decided_separately(held: Held) -> None:
    results: list[Reason | None] = []

    async def hold() -> None:
        results.append(
            await held.gate.gate(
                held.principal, "dec_" + "1" * 20, "files", "delete_file", {"path": "/srv/ws/x"}
            )
        )

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            tg.start_soon(hold)
            first, second = await held.gate.wait_until_held(2)
            assert first.binding == second.binding
            await held.desk.decide(first.id, approve=True, actor="admin:t", reason="")
            await held.desk.decide(second.id, approve=False, actor="admin:t", reason="")
    assert sorted(results, key=str) == sorted([None, Reason.APPROVAL_DENIED], key=str)


async def test_the_desk_lists_pending_calls_with_their_exact_arguments(held: Held) -> None:
    async def look(approval: Any) -> None:
        [row] = await held.desk.list(state=None)
        assert row["arguments"] == {"path": "/srv/ws/a.log"}
        assert (row["tool"], row["status"], row["kind"]) == ("delete_file", "pending", "call")
        assert await held.desk.list(state="denied") == []
        with pytest.raises(ValueError, match="state: expected one of"):
            await held.desk.list(state="bogus")
        await held.desk.decide(approval.id, approve=False, actor="admin:t", reason="no")

    await call_while(held, {"path": "/srv/ws/a.log"}, look)
    assert [r["status"] for r in await held.desk.list(state="all")] == ["denied"]


# -- token requests -----------------------------------------------------------------------------


class MovableClock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.at


def token_approvals(store: SqlStore, clock: Any) -> TokenApprovals:
    return TokenApprovals(
        store,
        clock,
        ApprovalConfig(token_request_ttl=600, poll_interval=3),
        scope_definitions=SCOPE_DEFS,
    )


def fingerprint(agent: str = "ag_deployer", **kw: Any) -> str:
    base: dict[str, Any] = {"task_id": "tsk_rel", "purpose": "ship 1.2"} | kw
    return token_request_binding(agent, ("deploy:prod", "files:list"), **base)


async def ask(approvals: TokenApprovals, auth_req_id: str | None = None, **kw: Any) -> Any:
    return await approvals.check(
        kw.pop("agent", "ag_deployer"),
        ("deploy:prod", "files:list"),
        task_id="tsk_rel",
        purpose="ship 1.2",
        request_fingerprint=kw.pop("fp", fingerprint()),
        auth_req_id=auth_req_id,
    )


async def test_a_token_request_for_ungated_scopes_needs_no_approval(store: SqlStore) -> None:
    approvals = token_approvals(store, SystemClock())
    outcome = await approvals.check(
        "ag_x", ("files:list",), task_id=None, purpose="", request_fingerprint="0" * 64
    )
    assert outcome == "approved"
    assert await store.list_approvals() == []


async def test_a_gated_token_request_waits_then_the_poll_after_approval_gets_the_token_once(
    store: SqlStore,
) -> None:
    approvals = token_approvals(store, SystemClock())
    pending = await ask(approvals)
    assert isinstance(pending, PendingApproval)
    assert (pending.interval, 595 <= pending.expires_in <= 600) == (3, True)
    again = await ask(approvals)
    assert isinstance(again, PendingApproval)
    assert again.approval_id == pending.approval_id
    still = await ask(approvals, pending.approval_id)
    assert isinstance(still, PendingApproval)
    [row] = await store.list_approvals()
    assert (row.kind, row.scopes, row.purpose) == (
        ApprovalKind.TOKEN,
        ("deploy:prod", "files:list"),
        "ship 1.2",
    )
    await ApprovalDesk(store, SystemClock()).decide(
        pending.approval_id, approve=True, actor="cli:alice", reason="release day"
    )
    assert await ask(approvals, pending.approval_id) == "approved"
    reused = await ask(approvals, pending.approval_id)
    assert reused == Denied("invalid_grant", "auth_req_id was already used")


async def test_a_denied_token_request_polls_to_access_denied(store: SqlStore) -> None:
    approvals = token_approvals(store, SystemClock())
    pending = await ask(approvals)
    await ApprovalDesk(store, SystemClock()).decide(
        pending.approval_id, approve=False, actor="cli:alice", reason="not today"
    )
    outcome = await ask(approvals, pending.approval_id)
    assert isinstance(outcome, Denied)
    assert outcome.error == "access_denied"


async def test_a_token_request_nobody_decides_in_time_polls_to_expired_token(
    store: SqlStore,
) -> None:
    clock = MovableClock()
    approvals = token_approvals(store, clock)
    pending = await ask(approvals)
    clock.at += timedelta(seconds=601)
    outcome = await ask(approvals, pending.approval_id)
    assert isinstance(outcome, Denied)
    assert outcome.error == "expired_token"
    desk = ApprovalDesk(store, clock)
    with pytest.raises(ApprovalRefused, match="expired at") as caught:
        await desk.decide_approval(pending.approval_id, approve=True, actor="cli:a", reason="")
    assert caught.value.problem is Problem.EXPIRED
    assert (await ask(approvals, pending.approval_id)).error == "expired_token"
    fresh = await ask(approvals)
    assert isinstance(fresh, PendingApproval)
    assert fresh.approval_id != pending.approval_id


async def test_an_approved_token_not_collected_in_time_expires(store: SqlStore) -> None:
    clock = MovableClock()
    approvals = token_approvals(store, clock)
    pending = await ask(approvals)
    await ApprovalDesk(store, clock).decide(pending.approval_id, approve=True, actor="a", reason="")
    clock.at += timedelta(seconds=601)
    outcome = await ask(approvals, pending.approval_id)
    assert isinstance(outcome, Denied)
    assert outcome.error == "expired_token"


async def test_an_approved_token_request_cannot_be_reused_for_a_different_request(
    store: SqlStore,
) -> None:
    approvals = token_approvals(store, SystemClock())
    pending = await ask(approvals)
    await ApprovalDesk(store, SystemClock()).decide(
        pending.approval_id, approve=True, actor="a", reason=""
    )
    wider = await ask(approvals, pending.approval_id, fp=fingerprint(purpose="anything at all"))
    assert wider == Denied("invalid_grant", "auth_req_id was approved for a different request")
    other_agent = await ask(approvals, pending.approval_id, agent="ag_thief")
    assert isinstance(other_agent, Denied)
    assert other_agent.error == "invalid_grant"
    assert await ask(approvals, pending.approval_id) == "approved"


async def test_an_unknown_or_call_approval_id_is_invalid_grant(held: Held) -> None:
    approvals = token_approvals(held.store, SystemClock())
    unknown = await ask(approvals, "apr_nothing")
    assert isinstance(unknown, Denied)
    assert unknown.error == "invalid_grant"

    async def try_as_token(approval: Any) -> None:
        outcome = await ask(approvals, approval.id, agent=approval.agent_id)
        assert isinstance(outcome, Denied)
        assert outcome.error == "invalid_grant"
        await held.desk.decide(approval.id, approve=False, actor="a", reason="no")

    await call_while(held, {"path": "/srv/ws/a.log"}, try_as_token)


async def test_require_raises_authorization_pending_with_the_ciba_fields(store: SqlStore) -> None:
    approvals = token_approvals(store, SystemClock())
    with pytest.raises(AuthorizationPending) as caught:
        await approvals.require(
            "ag_deployer", ["deploy:prod"], task_id="tsk_rel", purpose="ship", budget=5
        )
    pending = caught.value
    assert pending.error == "authorization_pending"
    assert set(pending.extra) == {"auth_req_id", "expires_in", "interval"}
    await ApprovalDesk(store, SystemClock()).decide(
        pending.extra["auth_req_id"], approve=False, actor="a", reason="no"
    )
    with pytest.raises(OAuthError) as denied:
        await approvals.require(
            "ag_deployer",
            ["deploy:prod"],
            task_id="tsk_rel",
            purpose="ship",
            budget=5,
            auth_req_id=pending.extra["auth_req_id"],
        )
    assert denied.value.error == "access_denied"


# -- token requests through the real token endpoint (active once the lead wires TokenApprovals) --

WIRED = "auth_req_id" in inspect.signature(TokenService.client_credentials).parameters
TOKEN_SCOPES = """
[[scope]]
name = "demo:use"
[[scope.grant]]
connector = "demo"
tools = ["*"]

[[scope]]
name = "deploy:prod"
approval = "token"
[[scope.grant]]
connector = "demo"
tools = ["echo"]
"""


@pytest.mark.skipif(not WIRED, reason="TokenService.client_credentials has no auth_req_id yet")
@pytest.mark.parametrize("decision", ["approve", "deny"])
async def test_the_token_endpoint_answers_pending_then_token_or_access_denied(
    tmp_path: Path, decision: str
) -> None:
    from broker.testing import served_broker

    async with served_broker(tmp_path, scopes_toml=TOKEN_SCOPES) as broker:
        agent, secret = await broker.add_agent("deployer", ["demo:use", "deploy:prod"])
        form = {
            "grant_type": "client_credentials",
            "scope": "deploy:prod",
            "task": "tsk_release",
            "purpose": "ship release 1.2",
        }
        async with httpx2.AsyncClient(auth=(agent.id, secret), timeout=10) as http:
            first = await http.post(broker.url + "/oauth/token", data=form)
            assert first.status_code == 400, first.text
            body = first.json()
            assert body["error"] == "authorization_pending"
            assert body["interval"] >= 1
            auth_req_id = body["auth_req_id"]
            config = cli_config(tmp_path, sqlite_url(tmp_path))
            args = ["approve", auth_req_id] if decision == "approve" else ["deny", auth_req_id]
            code, _, err = await run_cli(config, *args, "--reason", "checked")
            assert code == 0, err
            poll = await http.post(
                broker.url + "/oauth/token", data=form | {"auth_req_id": auth_req_id}
            )
            if decision == "approve":
                assert poll.status_code == 200, poll.text
                assert poll.json()["scope"] == "deploy:prod"
                again = await http.post(
                    broker.url + "/oauth/token", data=form | {"auth_req_id": auth_req_id}
                )
                assert again.json()["error"] == "invalid_grant"
            else:
                assert poll.json()["error"] == "access_denied"
