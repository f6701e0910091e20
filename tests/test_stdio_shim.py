"""`broker stdio`: an MCP client launches the shim as a subprocess and reaches a served broker.

Real processes end to end: the SDK `Client` spawns the shim over stdio (both protocol eras), the
shim gets task tokens from the broker's token endpoint and relays to its ``/mcp``. The token
renewal and the header bookkeeping are also checked in-process (`httpx2.MockTransport`, an
injected clock) where a real broker could not make the case deterministic.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx2
import mcp.types as types
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.subscriptions import ToolsListChanged
from mcp.shared.message import ClientMessageMetadata, SessionMessage

from broker.config import ConnectorConfig
from broker.core.revocation import RevocationKind
from broker.stdio_shim import (
    CredentialsRefused,
    EraHeaders,
    ShimConfigError,
    ShimSettings,
    TaskTokenAuth,
    TokenClient,
    relay,
)
from broker.testing import served_broker
from connectors import ToolSet
from tests.test_examples import REPO, VENV_BIN

ERAS = ["legacy", "2026-07-28"]
FIXTURE = ConnectorConfig(
    id="conf",
    kind="stdio",
    prefix="",
    command=sys.executable,
    args=("-m", "tests.fixtures.servers.conformance_server", "--stdio"),
    cwd=REPO,
    env_allowlist=("PATH", "HOME", "LANG", "PYTHONPATH"),
)
FIXTURE_SCOPES = """\
[[scope]]
name = "conf:all"
[[scope.grant]]
connector = "conf"
tools = ["*"]
"""


class CancelProbe:
    """What the in-broker ``hang`` tool saw; fresh events per test."""

    started: anyio.Event
    cancelled: anyio.Event


PROBE = CancelProbe()
HANG_TOOLS = ToolSet()


@HANG_TOOLS.tool
async def hang() -> str:
    """Wait until cancelled."""
    PROBE.started.set()
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        PROBE.cancelled.set()
        raise
    return "never"  # pragma: no cover


HANG = ConnectorConfig(id="slow", kind="native", target="tests.test_stdio_shim:HANG_TOOLS")
HANG_SCOPES = """\
[[scope]]
name = "slow:use"
[[scope.grant]]
connector = "slow"
tools = ["*"]
"""


def shim_command() -> list[str]:
    """``broker stdio`` from the venv once the CLI registers it; the module entry point before."""
    from broker.cli import app

    if any(c.name == "stdio" for c in app.registered_commands):
        return [str(VENV_BIN / "broker"), "stdio"]
    return [sys.executable, "-m", "broker.cli.stdio"]


def shim_params(url: str, client_id: str, secret: str, **extra: str) -> StdioServerParameters:
    command, *args = shim_command()
    env = {
        "BROKER_URL": url,
        "BROKER_CLIENT_ID": client_id,
        "BROKER_CLIENT_SECRET": secret,
        **extra,
    }
    return StdioServerParameters(command=command, args=args, env=env, cwd=REPO)


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


# -- through a real broker ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_lists_and_calls_tools_through_the_stdio_shim(
    tmp_path: Path, mode: str
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("desktop", ["demo:use"])
        params = shim_params(broker.url, agent.id, secret, BROKER_SCOPE="demo:use")
        with anyio.fail_after(30):
            async with Client(params, mode=mode) as client:  # pyright: ignore[reportArgumentType]
                version = client.protocol_version
                names = [t.name for t in (await client.list_tools()).tools]
                echoed = await client.call_tool("demo__echo", {"text": "through stdio"})
                counted = await client.call_tool("demo__word_count", {"text": "a b c"})
        # The client is done: the shim closed its task on the way out.
        closes = await broker.services.store.revocations_since(0)
        (issued,) = await broker.services.store.list_tokens(agent_id=agent.id)
    assert [(r.kind, r.subject, r.actor) for r in closes] == [
        (RevocationKind.TASK_CLOSED, issued.task_id, f"agent:{agent.id}")
    ]
    assert issued.task_id.startswith("stdio-")
    assert version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
    assert names == ["demo__add", "demo__echo", "demo__word_count"]
    assert text_of(echoed) == "through stdio"
    assert counted.structured_content == {"words": 3, "lines": 1, "characters": 5}


@pytest.mark.servers
@pytest.mark.parametrize("mode", ERAS)
async def test_progress_prompts_resources_and_completion_pass_through_the_stdio_shim(
    tmp_path: Path, mode: str
) -> None:
    async with served_broker(tmp_path, connectors=(FIXTURE,), scopes_toml=FIXTURE_SCOPES) as broker:
        agent, secret = await broker.add_agent("desktop", ["conf:all"])
        seen_progress: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen_progress.append(progress)

        with anyio.fail_after(30):
            async with Client(shim_params(broker.url, agent.id, secret), mode=mode) as client:  # pyright: ignore[reportArgumentType]
                stepped = await client.call_tool(
                    "test_tool_with_progress", {}, progress_callback=on_progress
                )
                prompt = await client.get_prompt(
                    "test_prompt_with_arguments", {"arg1": "a", "arg2": "b"}
                )
                resource = await client.read_resource("test://template/7/data")
                templates = await client.list_resource_templates()
    assert not stepped.is_error
    assert len(seen_progress) >= 2
    assert seen_progress == sorted(seen_progress)
    assert "arg1='a'" in json.dumps(prompt.messages[0].content.model_dump())
    assert '\\"id\\": \\"7\\"' in json.dumps(resource.contents[0].model_dump())
    assert [t.uri_template for t in templates.resource_templates] == ["test://template/{id}/data"]


async def test_tools_list_changed_reaches_a_2025_client_through_the_stdio_shim(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("desktop", ["demo:use"])
        changed = anyio.Event()

        async def on_message(message: object) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                changed.set()

        params = shim_params(broker.url, agent.id, secret)
        with anyio.fail_after(30):
            async with Client(params, mode="legacy", message_handler=on_message) as client:
                assert client.server_capabilities.tools is not None
                assert client.server_capabilities.tools.list_changed
                await client.list_tools()
                await broker.services.front.notify_changed(tools=True)
                await changed.wait()


async def test_tools_list_changed_reaches_a_2026_listener_through_the_stdio_shim(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("desktop", ["demo:use"])
        params = shim_params(broker.url, agent.id, secret)
        with anyio.fail_after(30):
            async with (
                Client(params, mode="2026-07-28") as client,
                client.listen(tools_list_changed=True) as subscription,
            ):
                await broker.services.front.notify_changed(tools=True)
                event = await anext(aiter(subscription))
    assert isinstance(event, ToolsListChanged)


@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_cancelling_a_call_cancels_it_in_the_broker_through_the_stdio_shim(
    tmp_path: Path, mode: str
) -> None:
    PROBE.started, PROBE.cancelled = anyio.Event(), anyio.Event()
    async with served_broker(tmp_path, connectors=(HANG,), scopes_toml=HANG_SCOPES) as broker:
        agent, secret = await broker.add_agent("desktop", ["slow:use"])
        params = shim_params(broker.url, agent.id, secret)
        with anyio.fail_after(30):
            async with Client(params, mode=mode) as client:  # pyright: ignore[reportArgumentType]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.call_tool, "slow__hang", {})
                    await PROBE.started.wait()
                    tg.cancel_scope.cancel()
                await PROBE.cancelled.wait()
                still_there = await client.list_tools()
    assert [t.name for t in still_there.tools] == ["slow__hang"]


async def test_a_token_renewed_before_expiry_goes_unnoticed_by_the_client(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path, tokens={"leeway": 0, "default_ttl": 10}) as broker:
        agent, secret = await broker.add_agent("short", ["demo:use"], max_ttl=10)
        store = broker.services.store
        calls = 0
        with anyio.fail_after(40):
            async with Client(shim_params(broker.url, agent.id, secret), mode="legacy") as client:
                # Keep one session busy until a second token exists, then once past the
                # first token's expiry: every call must succeed on the same session.
                while True:
                    result = await client.call_tool("demo__add", {"a": calls, "b": 1})
                    assert text_of(result) == str(calls + 1)
                    calls += 1
                    issued = sorted(
                        await store.list_tokens(agent_id=agent.id), key=lambda t: t.issued_at
                    )
                    if len(issued) >= 2 and datetime.now(UTC) > issued[0].expires_at:
                        break
                    await anyio.sleep(0.25)
    first, second = issued[0], issued[1]
    assert second.issued_at < first.expires_at, "renewed only after expiry"
    assert first.task_id == second.task_id, "a renewal continues the same task"


async def test_a_revoked_token_is_replaced_after_one_401_without_the_client_noticing(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("desktop", ["demo:use"])
        tokens = broker.services.tokens
        with anyio.fail_after(30):
            async with Client(shim_params(broker.url, agent.id, secret), mode="2026-07-28") as c:
                before = await c.call_tool("demo__echo", {"text": "one"})
                (issued,) = await broker.services.store.list_tokens(agent_id=agent.id)
                await tokens.revoke_token(issued.jti, reason="test", actor="test")
                await broker.services.revocations.refresh()
                after = await c.call_tool("demo__echo", {"text": "two"})
        reissued = await broker.services.store.list_tokens(agent_id=agent.id)
    assert (text_of(before), text_of(after)) == ("one", "two")
    assert len(reissued) == 2


async def run_shim_process(env: dict[str, str]) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        done = await anyio.run_process(
            shim_command(), env={"PATH": os.environ["PATH"], **env}, cwd=REPO, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_a_wrong_secret_gives_one_clear_line_and_exit_4(tmp_path: Path) -> None:
    async with served_broker(tmp_path) as broker:
        agent, _ = await broker.add_agent("desktop", ["demo:use"])
        code, out, err = await run_shim_process(
            {
                "BROKER_URL": broker.url,
                "BROKER_CLIENT_ID": agent.id,
                "BROKER_CLIENT_SECRET": "not-the-secret-123",
            }
        )
    assert code == 4
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"broker stdio: error: the broker refused a token for {agent.id}")
    assert "invalid_client" in err
    assert "not-the-secret-123" not in err


async def test_an_unreachable_broker_gives_one_clear_line_and_exit_3(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret\n")
    code, out, err = await run_shim_process(
        {
            "BROKER_URL": "http://127.0.0.1:9",
            "BROKER_CLIENT_ID": "agt_x",
            "BROKER_CLIENT_SECRET_FILE": str(secret_file),
        }
    )
    assert (code, out) == (3, "")
    assert (
        err == "broker stdio: error: cannot reach the broker at http://127.0.0.1:9: ConnectError\n"
    )


async def test_missing_credentials_name_the_variable_and_exit_2() -> None:
    code, out, err = await run_shim_process({"BROKER_URL": "http://127.0.0.1:9"})
    assert (code, out) == (2, "")
    assert "BROKER_CLIENT_ID" in err
    assert "Traceback" not in err


# -- settings ----------------------------------------------------------------------------------


def test_settings_come_from_the_environment_with_the_secret_kept_out_of_repr(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    settings = ShimSettings.from_environ(
        {
            "BROKER_URL": "http://broker.test:8765/",
            "BROKER_CLIENT_ID": "agt_1",
            "BROKER_CLIENT_SECRET_FILE": str(secret_file),
            "BROKER_SCOPE": "demo:use, time:read",
            "BROKER_TASK_PURPOSE": "desktop session",
        }
    )
    assert settings.mcp_url == "http://broker.test:8765/mcp"
    assert settings.client_secret == "from-a-file"
    assert settings.scope == "demo:use time:read"
    assert settings.purpose == "desktop session"
    assert "from-a-file" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, "BROKER_URL"),
        ({"BROKER_URL": "ftp://x"}, "http(s) URL"),
        ({"BROKER_URL": "http://x"}, "BROKER_CLIENT_ID"),
        ({"BROKER_URL": "http://x", "BROKER_CLIENT_ID": "a"}, "BROKER_CLIENT_SECRET"),
        (
            {
                "BROKER_URL": "http://x",
                "BROKER_CLIENT_ID": "a",
                "BROKER_CLIENT_SECRET": "s",
                "BROKER_CLIENT_SECRET_FILE": "/f",
            },
            "not both",
        ),
        (
            {"BROKER_URL": "http://x", "BROKER_CLIENT_ID": "a", "BROKER_CLIENT_SECRET_FILE": "/no"},
            "BROKER_CLIENT_SECRET_FILE /no",
        ),
    ],
    ids=["no-url", "bad-scheme", "no-id", "no-secret", "two-secrets", "unreadable-file"],
)
def test_an_unusable_environment_names_what_to_fix(environ: dict[str, str], names: str) -> None:
    with pytest.raises(ShimConfigError, match=names.replace("(", r"\(").replace(")", r"\)")):
        ShimSettings.from_environ(environ)


# -- token renewal, in-process -----------------------------------------------------------------


class FakeBroker:
    """A token endpoint and an MCP endpoint that accepts only the newest token."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.issued: list[str] = []
        self.seen: list[str | None] = []
        self.refuse = refuse
        self.revoked: set[str] = set()
        self.closes: list[dict[str, str]] = []
        self.close_answer = 200

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/oauth/revoke":
            self.closes.append(dict(parse_qsl(request.content.decode())))
            if self.close_answer != 200:
                return httpx2.Response(self.close_answer, json={"error": "invalid_grant"})
            return httpx2.Response(200)
        if request.url.path == "/oauth/token":
            if self.refuse:
                body = {
                    "error": "invalid_client",
                    "error_description": "client authentication failed",
                }
                return httpx2.Response(401, json=body)
            token = f"tok-{len(self.issued)}"
            self.issued.append(token)
            return httpx2.Response(200, json={"access_token": token, "expires_in": 100})
        header = request.headers.get("authorization")
        self.seen.append(header)
        if header is None or header.removeprefix("Bearer ") in self.revoked:
            return httpx2.Response(401)
        return httpx2.Response(200, json={"ok": True})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = ShimSettings("http://broker.test", "agt_1", "s3cret", "demo:use", None)


def auth_for(fake: FakeBroker, clock: Clock) -> tuple[TaskTokenAuth, httpx2.AsyncClient]:
    transport = httpx2.MockTransport(fake.handle)
    token_http = httpx2.AsyncClient(transport=transport)
    auth = TaskTokenAuth(TokenClient(SETTINGS, token_http, clock=clock))
    return auth, httpx2.AsyncClient(transport=transport, auth=auth)


async def test_the_token_is_renewed_a_quarter_lifetime_before_expiry() -> None:
    fake, clock = FakeBroker(), Clock()
    auth, http = auth_for(fake, clock)
    async with http:
        await auth.start()
        await http.get("http://broker.test/mcp")
        clock.now += 74.9
        await http.get("http://broker.test/mcp")
        clock.now += 0.2
        await http.get("http://broker.test/mcp")
    assert fake.seen == ["Bearer tok-0", "Bearer tok-0", "Bearer tok-1"]
    assert auth.renewals == 1


async def test_a_401_renews_once_and_retries_once() -> None:
    fake, clock = FakeBroker(), Clock()
    auth, http = auth_for(fake, clock)
    async with http:
        await auth.start()
        fake.revoked.add("tok-0")
        ok = await http.get("http://broker.test/mcp")
        fake.revoked.add("tok-1")
        fake.revoked.add("tok-2")
        refused = await http.get("http://broker.test/mcp")
    assert ok.status_code == 200
    assert refused.status_code == 401
    assert fake.seen == ["Bearer tok-0", "Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]


async def test_closing_the_task_sends_the_held_token_and_a_refusal_never_raises() -> None:
    fake = FakeBroker()
    auth, http = auth_for(fake, Clock())
    async with http:
        assert await auth.close_task() is False  # no token yet: nothing to close with
        await auth.start()
        assert await auth.close_task() is True
        fake.close_answer = 400
        assert await auth.close_task() is False
    assert fake.closes == [{"token": "tok-0", "close_task": "true"}] * 2


async def test_refused_credentials_name_the_oauth_error_and_not_the_secret() -> None:
    auth, http = auth_for(FakeBroker(refuse=True), Clock())
    async with http:
        with pytest.raises(CredentialsRefused) as caught:
            await auth.start()
    assert str(caught.value) == (
        "the broker refused a token for agt_1 (invalid_client: client authentication failed)"
    )
    assert "s3cret" not in str(caught.value)


# -- era headers -------------------------------------------------------------------------------


def request(id_: int, method: str, params: dict[str, Any] | None = None) -> types.JSONRPCRequest:
    return types.JSONRPCRequest(jsonrpc="2.0", id=id_, method=method, params=params)


def response(id_: int, result: dict[str, Any]) -> types.JSONRPCResponse:
    return types.JSONRPCResponse(jsonrpc="2.0", id=id_, result=result)


MODERN_META = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}


@pytest.fixture
def era() -> EraHeaders:
    return EraHeaders()


def test_a_handshake_client_gets_the_negotiated_version_header_after_initialize(
    era: EraHeaders,
) -> None:
    assert era.outbound(request(1, "initialize", {"protocolVersion": "2025-11-25"})) is None
    era.inbound(response(1, {"protocolVersion": "2025-06-18", "capabilities": {}}))
    note = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")
    assert era.outbound(note) == {"mcp-protocol-version": "2025-06-18"}
    assert era.outbound(request(2, "tools/list")) == {"mcp-protocol-version": "2025-06-18"}


def test_a_modern_request_gets_method_name_and_param_headers(era: EraHeaders) -> None:
    schema = {
        "type": "object",
        "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
    }
    era.outbound(request(1, "tools/list", MODERN_META))
    era.inbound(response(1, {"tools": [{"name": "where", "inputSchema": schema}]}))
    headers = era.outbound(
        request(2, "tools/call", {**MODERN_META, "name": "where", "arguments": {"region": "eu"}})
    )
    assert headers == {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "where",
        "Mcp-Param-Region": "eu",
    }
    assert era.outbound(request(3, "resources/read", {**MODERN_META, "uri": "test://a"})) == {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "resources/read",
        "mcp-name": "test://a",
    }


async def test_the_relay_stamps_headers_upstream_and_answers_an_unparsable_line_itself() -> None:
    client_in_w, client_in = anyio.create_memory_object_stream[SessionMessage | Exception](8)
    client_out, client_out_r = anyio.create_memory_object_stream[SessionMessage](8)
    broker_in_w, broker_in = anyio.create_memory_object_stream[SessionMessage | Exception](8)
    broker_out, broker_out_r = anyio.create_memory_object_stream[SessionMessage](8)
    listing = request(7, "tools/list", MODERN_META)
    async with (
        client_in_w,
        client_in,
        client_out,
        client_out_r,
        broker_in_w,
        broker_in,
        broker_out,
        broker_out_r,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(relay, client_in, client_out, broker_in, broker_out)
        with anyio.fail_after(5):
            await client_in_w.send(ValueError("not JSON"))
            parse_error = (await client_out_r.receive()).message
            await client_in_w.send(SessionMessage(listing))
            posted = await broker_out_r.receive()
            await broker_in_w.send(SessionMessage(response(7, {"tools": []})))
            answered = (await client_out_r.receive()).message
        assert isinstance(parse_error, types.JSONRPCError)
        assert (parse_error.id, parse_error.error.code) == (None, types.PARSE_ERROR)
        assert posted.message == listing
        assert isinstance(posted.metadata, ClientMessageMetadata)
        assert posted.metadata.headers == {
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/list",
        }
        assert answered == response(7, {"tools": []})
        tg.cancel_scope.cancel()
