"""The MCP front, driven by a real MCP client in process (both protocol eras) over real connectors.

The principal is injected (the in-memory transport carries no bearer token); the HTTP path with a
real token is covered at the end of this module.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.server import ServerRequestContext
from mcp.server.auth.provider import AccessToken
from starlette.applications import Starlette
from starlette.routing import Mount

from broker.config import ServerConfig
from broker.core.tokens import TaskClaim, TokenClaims, TokenRejected, mint_token, verify_token
from broker.mcp_front import McpFront
from broker.principal import Principal
from broker.registry import Registry
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url
from broker.testing import serve_app
from connectors import NativeConnector, Progress, StdioSpec, ToolSet, open_connector
from connectors.testing import EchoConnector
from scopes.definitions import parse_scope_toml
from tests.callers import Caller, principal

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent
ERAS = ["legacy", "2026-07-28"]
DECISION = re.compile(r"dec_[0-9a-f]{20}")

SCOPES = parse_scope_toml(
    """
[[scope]]
name = "tools:use"
[[scope.grant]]
connector = "local"
tools = ["echo", "steps", "hang"]
[[scope.grant]]
connector = "slow"
tools = ["sleep"]

[[scope]]
name = "conf:all"
[[scope.grant]]
connector = "conf"
tools = ["*"]

[[scope]]
name = "conf:narrow"
[[scope.grant]]
connector = "conf"
tools = ["*"]
args = { text = { max_length = 5 } }
""",
    source="test",
)


@dataclass
class Tracker:
    started: anyio.Event
    cancelled: anyio.Event


def local_tools(tracker: Tracker) -> ToolSet:
    tools = ToolSet()

    @tools.tool
    async def echo(text: str) -> str:
        """Echo."""
        return text

    @tools.tool
    async def secret() -> str:
        """Not granted to anyone."""
        return "top secret"

    @tools.tool
    async def steps(count: int, progress: Progress) -> str:
        """Report progress ``count`` times."""
        for i in range(count):
            await progress(i + 1, count, f"step {i + 1}")
        return "done"

    @tools.tool
    async def hang(progress: Progress) -> str:
        """Wait until cancelled."""
        tracker.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            tracker.cancelled.set()
        return "never"  # pragma: no cover

    return tools


async def approve_all(store: SqlStore, registry: Registry) -> None:
    for pin in await store.list_pins():
        if pin.approved_digest != pin.digest:
            await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "test", NOW)
    await registry.reload_pins()


@dataclass
class Broker:
    store: SqlStore
    registry: Registry
    front: McpFront
    caller: Caller
    tracker: Tracker


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with migrated_store(sqlite_url(tmp_path)) as s:
        yield s


@pytest.fixture
async def broker(store: SqlStore) -> AsyncIterator[Broker]:
    tracker = Tracker(anyio.Event(), anyio.Event())
    registry = Registry(store, pin_poll_interval=60)
    registry.add(NativeConnector.from_toolset("local", local_tools(tracker)))
    registry.add(EchoConnector("slow", call_timeout=0.2))
    caller = Caller(principal("tools:use"))
    front = McpFront(registry, SCOPES, principal_lookup=caller.lookup)
    async with registry:
        await approve_all(store, registry)
        yield Broker(store, registry, front, caller, tracker)


def text_of(result: types.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


@pytest.mark.parametrize("mode", ERAS)
async def test_tools_list_shows_only_the_tools_the_callers_scopes_cover(
    broker: Broker, mode: str
) -> None:
    async with Client(broker.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        names = [t.name for t in (await client.list_tools()).tools]
    assert names == ["local__echo", "local__hang", "local__steps", "slow__sleep"]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_granted_call_is_forwarded_and_the_downstream_result_returned(
    broker: Broker, mode: str
) -> None:
    async with Client(broker.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        result = await client.call_tool("local__echo", {"text": "hi"})
    assert not result.is_error
    assert text_of(result) == "hi"


@pytest.mark.parametrize("mode", ERAS)
async def test_unknown_and_forbidden_tools_get_the_same_denial_but_for_the_decision_id(
    broker: Broker, mode: str
) -> None:
    async with Client(broker.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        forbidden = await client.call_tool("local__secret", {})
        unknown = await client.call_tool("local__nothing_here", {})
    assert forbidden.is_error
    assert unknown.is_error
    assert DECISION.sub("dec_X", text_of(forbidden)) == "denied (scope-missing); decision dec_X"
    assert DECISION.sub("dec_X", text_of(unknown)) == DECISION.sub("dec_X", text_of(forbidden))
    assert forbidden.model_dump(exclude={"content"}) == unknown.model_dump(exclude={"content"})


async def test_a_caller_without_a_verified_token_sees_nothing_and_is_denied(
    broker: Broker,
) -> None:
    broker.caller.who = None
    async with Client(broker.front.server, mode="legacy") as client:
        assert (await client.list_tools()).tools == []
        result = await client.call_tool("local__echo", {"text": "hi"})
    assert DECISION.sub("dec_X", text_of(result)) == "denied (token-invalid); decision dec_X"


async def test_a_covered_tool_not_yet_approved_is_hidden_and_denied_as_unapproved(
    store: SqlStore,
) -> None:
    registry = Registry(store, pin_poll_interval=60)
    registry.add(EchoConnector("slow"))
    front = McpFront(registry, SCOPES, principal_lookup=Caller(principal("tools:use")).lookup)
    async with registry, Client(front.server, mode="legacy") as client:
        assert (await client.list_tools()).tools == []
        result = await client.call_tool("slow__sleep", {"seconds": 0})
    assert DECISION.sub("dec_X", text_of(result)) == "denied (tool-unapproved); decision dec_X"


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_reported_by_the_connector_reaches_the_agent(
    broker: Broker, mode: str
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(broker.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(5):
            result = await client.call_tool(
                "local__steps", {"count": 3}, progress_callback=on_progress
            )
    assert text_of(result) == "done"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


@pytest.mark.parametrize("mode", ERAS)
async def test_cancelling_the_agents_request_cancels_the_connector_call(
    broker: Broker, mode: str
) -> None:
    async with Client(broker.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    await client.call_tool("local__hang", {})

                tg.start_soon(call)
                await broker.tracker.started.wait()
                tg.cancel_scope.cancel()
            await broker.tracker.cancelled.wait()


async def test_a_connector_deadline_becomes_an_upstream_timeout_denial(broker: Broker) -> None:
    async with Client(broker.front.server, mode="legacy") as client:
        with anyio.fail_after(5):
            result = await client.call_tool("slow__sleep", {"seconds": 5})
    assert DECISION.sub("dec_X", text_of(result)) == "denied (upstream-timeout); decision dec_X"


async def test_handler_failures_never_leak_their_text_on_the_2025_path(broker: Broker) -> None:
    def exploding(_ctx: ServerRequestContext[Any, Any]) -> Principal | None:
        raise RuntimeError("s3cret internal detail")

    broker.front.principal_lookup = exploding
    async with Client(broker.front.server, mode="legacy") as client:
        result = await client.call_tool("local__echo", {"text": "hi"})
        with pytest.raises(MCPError) as listing:
            await client.list_tools()
        with pytest.raises(MCPError) as resources:
            await client.list_resources()
    assert DECISION.sub("dec_X", text_of(result)) == "denied (decision-error); decision dec_X"
    for err in (listing.value, resources.value):
        assert err.error.code == types.INTERNAL_ERROR
        assert err.error.message == "Internal error"
        assert "s3cret" not in repr(err.error)


async def test_the_2025_handshake_advertises_tools_list_changed(broker: Broker) -> None:
    async with Client(broker.front.server, mode="legacy") as client:
        tools = client.server_capabilities.tools
    assert tools is not None
    assert tools.list_changed is True


async def _add_grant_and_approve(broker: Broker) -> None:
    """Make the visible tool set change: approve a new tool in the store and reload pins."""
    extra = ToolSet()

    @extra.tool
    async def fresh() -> str:
        """New."""
        return "fresh"

    await broker.registry.register(NativeConnector.from_toolset("more", extra))
    await approve_all(broker.store, broker.registry)


async def test_list_changed_reaches_a_2025_session_when_the_tool_set_changes(
    broker: Broker,
) -> None:
    changed = anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with Client(broker.front.server, mode="legacy", message_handler=on_message) as client:
        await client.list_tools()
        await _add_grant_and_approve(broker)
        with anyio.fail_after(5):
            await changed.wait()


async def test_list_changed_reaches_a_2026_listener_when_the_tool_set_changes(
    broker: Broker,
) -> None:
    async with (
        Client(broker.front.server, mode="2026-07-28") as client,
        client.listen(tools_list_changed=True) as subscription,
    ):
        await _add_grant_and_approve(broker)
        with anyio.fail_after(5):
            async for event in subscription:
                assert type(event).__name__ == "ToolsListChanged"
                break


@pytest.fixture
async def conf(store: SqlStore) -> AsyncIterator[Broker]:
    """The conformance fixture server as a stdio connector: it has resources and prompts."""
    spec = StdioSpec(
        id="conf",
        command=sys.executable,
        args=("-m", "tests.fixtures.servers.conformance_server", "--stdio"),
        cwd=str(REPO),
    )
    registry = Registry(store, pin_poll_interval=60)
    registry.add(open_connector(spec))
    caller = Caller(principal("conf:all"))
    front = McpFront(registry, SCOPES, principal_lookup=caller.lookup)
    async with registry:
        await approve_all(store, registry)
        yield Broker(store, registry, front, caller, Tracker(anyio.Event(), anyio.Event()))


@pytest.mark.parametrize("mode", ERAS)
async def test_resources_prompts_and_completion_need_an_unconstrained_connector_wide_grant(
    conf: Broker, mode: str
) -> None:
    async with Client(conf.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        resources = [str(r.uri) for r in (await client.list_resources()).resources]
        assert "test://static-text" in resources
        read = await client.read_resource("test://static-text")
        assert read.contents
        templates = (await client.list_resource_templates()).resource_templates
        assert "test://template/{id}/data" in [t.uri_template for t in templates]
        templated = await client.read_resource("test://template/42/data")
        assert templated.contents
        prompts = [p.name for p in (await client.list_prompts()).prompts]
        assert "conf__test_simple_prompt" in prompts
        prompt = await client.get_prompt("conf__test_simple_prompt")
        assert prompt.messages

        conf.caller.who = principal("conf:narrow")
        assert (await client.list_resources()).resources == []
        assert (await client.list_prompts()).prompts == []
        with pytest.raises(MCPError) as forbidden:
            await client.read_resource("test://static-text")
        with pytest.raises(MCPError) as unknown:
            await client.read_resource("test://no-such-thing")
        # Alike but for the URI each names (SEP-2164's data.uri echoes what was asked).
        assert forbidden.value.error.code == unknown.value.error.code
        assert forbidden.value.error.message == unknown.value.error.message
        assert forbidden.value.error.data == {"uri": "test://static-text"}
        assert unknown.value.error.data == {"uri": "test://no-such-thing"}
        with pytest.raises(MCPError):
            await client.get_prompt("conf__test_simple_prompt")
        done = await client.complete(
            types.PromptReference(name="conf__test_prompt_with_arguments"),
            {"name": "arg1", "value": "a"},
        )
        assert done.completion.values == []


# -- the real HTTP path with a real token ------------------------------------------------------


class Ed25519Verifier:
    """The SDK TokenVerifier protocol over the token core (until `BrokerTokenVerifier` lands)."""

    def __init__(self, key: Ed25519PrivateKey, *, issuer: str, audience: str) -> None:
        self.keys = {"k1": key.public_key()}
        self.issuer = issuer
        self.audience = audience

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            claims = verify_token(
                token,
                keys=self.keys,
                audience=self.audience,
                issuer=self.issuer,
                now=datetime.now(UTC),
                leeway=30,
                max_lifetime=3600,
            )
        except TokenRejected:
            return None
        return AccessToken(
            token=token,
            client_id=claims.client_id,
            scopes=list(claims.scopes),
            subject=claims.sub,
            expires_at=claims.exp,
            claims=claims.model_dump(mode="json"),
        )


def mint(key: Ed25519PrivateKey, server: ServerConfig, scope: str, agent: str = "agent-1") -> str:
    now = datetime.now(UTC)
    claims = TokenClaims(
        iss=server.base_url,
        aud=server.resource_url,
        sub=agent,
        client_id=agent,
        exp=int((now + timedelta(minutes=5)).timestamp()),
        iat=int(now.timestamp()),
        nbf=int(now.timestamp()),
        jti="j" * 10 + str(int(now.timestamp() * 1000)) + agent.replace("-", "_"),
        scope=scope,
        task=TaskClaim(id="task-1", purpose="test"),
    )
    return mint_token(claims, private_key=key, kid="k1")


@pytest.mark.parametrize("mode", ERAS)
async def test_over_http_a_real_token_lists_and_calls_and_a_bad_one_gets_401(
    broker: Broker, mode: str
) -> None:
    key = Ed25519PrivateKey.generate()
    server = ServerConfig(port=0, public_url="http://127.0.0.1:8765")
    verifier = Ed25519Verifier(key, issuer=server.base_url, audience=server.resource_url)
    front = McpFront(broker.registry, SCOPES, verifier=verifier, server_config=server)
    app = Starlette(
        routes=[Mount("/", app=front.http_app())], lifespan=lambda _app: front.lifespan()
    )
    token = mint(key, server, "tools:use")
    async with serve_app(app) as base:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=10) as http:
            transport = streamable_http_client(f"{base}/mcp", http_client=http)
            async with Client(transport, mode=mode) as client:  # pyright: ignore[reportArgumentType]
                names = [t.name for t in (await client.list_tools()).tools]
                result = await client.call_tool("local__echo", {"text": "over http"})
        async with httpx2.AsyncClient(timeout=10) as http:
            bad = await http.post(
                f"{base}/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={"Authorization": "Bearer not-a-token", "Accept": "application/json"},
            )
    assert names == ["local__echo", "local__hang", "local__steps", "slow__sleep"]
    assert text_of(result) == "over http"
    assert bad.status_code == 401
    assert "resource_metadata=" in bad.headers["www-authenticate"]


async def test_close_sessions_for_ends_an_agents_2025_http_sessions(broker: Broker) -> None:
    key = Ed25519PrivateKey.generate()
    server = ServerConfig(port=0, public_url="http://127.0.0.1:8765")
    verifier = Ed25519Verifier(key, issuer=server.base_url, audience=server.resource_url)
    front = McpFront(broker.registry, SCOPES, verifier=verifier, server_config=server)
    app = Starlette(
        routes=[Mount("/", app=front.http_app())], lifespan=lambda _app: front.lifespan()
    )
    async with serve_app(app) as base:
        headers = {"Authorization": f"Bearer {mint(key, server, 'tools:use')}"}
        async with httpx2.AsyncClient(headers=headers, timeout=10) as http:
            transport = streamable_http_client(f"{base}/mcp", http_client=http)
            async with Client(transport, mode="legacy") as client:
                await client.list_tools()
                assert await front.close_sessions_for("someone-else") == 0
                assert await front.close_sessions_for("agent-1") == 1
                with pytest.raises(MCPError, match="Session not found"):
                    await client.list_tools()
