"""Through the broker to real downstream servers, with a real MCP client in both protocol eras.

PyPI ``mcp-server-time`` and ``mcp-server-git`` (from the venv), npm ``server-everything`` and
``server-filesystem`` (from ``.tools``, installed by ``make tools``), each run as a stdio
connector behind the front.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import mcp.types as types
import pytest
from mcp import Client
from mcp.server import ServerRequestContext

from broker.mcp_front import McpFront
from broker.principal import Principal
from broker.registry import Registry
from broker.store.testing import migrated_store, sqlite_url
from connectors import Connector, JSONValue, ProgressCallback, StdioSpec, open_connector
from scopes.definitions import parse_scope_toml

pytestmark = pytest.mark.servers

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ERAS = ["legacy", "2026-07-28"]
VENV_BIN = Path(sys.executable).parent
NPM = (
    Path(__file__).resolve().parent.parent
    / ".tools"
    / "npm"
    / "node_modules"
    / "@modelcontextprotocol"
)
SCOPES = parse_scope_toml(
    "\n".join(
        f'[[scope]]\nname = "{c}:all"\n[[scope.grant]]\nconnector = "{c}"\ntools = ["*"]\n'
        for c in ("time", "git", "everything", "fs")
    ),
    source="test",
)


def venv_server(name: str) -> str:
    path = VENV_BIN / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: install the project with `pip install -e '.[servers]'`")
    return str(path)


def npm_server(package: str) -> str:
    path = NPM / package / "dist" / "index.js"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `make tools` to install the npm test servers")
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    return str(path)


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


class Watched:
    """A real connector, delegated to; notes when a forwarded call is cancelled."""

    def __init__(self, inner: Connector) -> None:
        self.inner = inner
        self.cancelled = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, JSONValue],
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the Connector protocol's deadline
    ) -> types.CallToolResult:
        try:
            return await self.inner.call_tool(name, arguments, progress=progress, timeout=timeout)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise


@asynccontextmanager
async def broker(tmp_path: Path, *connectors: Connector | Watched) -> AsyncIterator[McpFront]:
    agent = Principal(
        agent_id="agent-1",
        client_id="agent-1",
        scopes=frozenset(s.name for s in SCOPES),
        token_id="t" * 22,
    )

    def lookup(_ctx: ServerRequestContext[Any, Any]) -> Principal:
        return agent

    async with migrated_store(sqlite_url(tmp_path)) as store:
        registry = Registry(store, pin_poll_interval=60)
        for connector in connectors:
            registry.add(cast(Connector, connector))
        async with registry:
            for pin in await store.list_pins():
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "t", NOW)
            await registry.reload_pins()
            yield McpFront(registry, SCOPES, principal_lookup=lookup)


def client(front: McpFront, mode: str, **kwargs: Any) -> Client:
    return Client(front.server, mode=mode, **kwargs)  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize("mode", ERAS)
async def test_time_server_tools_are_listed_and_called_through_the_broker(
    tmp_path: Path, mode: str
) -> None:
    time = open_connector(StdioSpec(id="time", command=venv_server("mcp-server-time")))
    async with broker(tmp_path, time) as front, client(front, mode) as agent:
        with anyio.fail_after(30):
            names = {t.name for t in (await agent.list_tools()).tools}
            now = await agent.call_tool("time__get_current_time", {"timezone": "UTC"})
    assert {"time__get_current_time", "time__convert_time"} <= names
    assert not now.is_error
    assert '"timezone": "UTC"' in text_of(now) or "UTC" in text_of(now)


@pytest.mark.parametrize("mode", ERAS)
async def test_git_server_reports_status_through_the_broker(tmp_path: Path, mode: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    await anyio.run_process(["git", "init", "-q", str(repo)])
    (repo / "new.txt").write_text("hello\n")
    git = open_connector(
        StdioSpec(id="git", command=venv_server("mcp-server-git"), args=("--repository", str(repo)))
    )
    async with broker(tmp_path, git) as front, client(front, mode) as agent:
        with anyio.fail_after(30):
            status = await agent.call_tool("git__git_status", {"repo_path": str(repo)})
    assert not status.is_error
    assert "new.txt" in text_of(status)


@pytest.mark.parametrize("mode", ERAS)
async def test_filesystem_server_gets_its_roots_from_the_broker_not_the_agent(
    tmp_path: Path, mode: str
) -> None:
    root = tmp_path / "workspace"
    root.mkdir()
    (root / "notes.txt").write_text("inside the root\n")
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT\n")
    fs = open_connector(
        StdioSpec(
            id="fs",
            command="node",
            args=(npm_server("server-filesystem"),),
            roots=(str(root),),
        )
    )
    agent_roots_asked = anyio.Event()

    async def agent_roots(_ctx: Any) -> types.ListRootsResult:
        agent_roots_asked.set()
        return types.ListRootsResult(roots=[types.Root(uri="file:///")])  # pyright: ignore[reportArgumentType]

    async with (
        broker(tmp_path, fs) as front,
        client(front, mode, list_roots_callback=agent_roots) as agent,
    ):
        with anyio.fail_after(30):
            inside = await agent.call_tool("fs__read_text_file", {"path": str(root / "notes.txt")})
            outside = await agent.call_tool(
                "fs__read_text_file", {"path": str(tmp_path / "secret.txt")}
            )
    assert text_of(inside).strip() == "inside the root"
    assert outside.is_error
    assert "TOP-SECRET-CONTENT" not in text_of(outside)
    assert not agent_roots_asked.is_set()


@pytest.fixture
def everything() -> Callable[[], Watched]:
    entry = npm_server("server-everything")
    return lambda: Watched(
        open_connector(StdioSpec(id="everything", command="node", args=(entry, "stdio")))
    )


@pytest.mark.parametrize("mode", ERAS)
async def test_everything_tools_and_progress_flow_through_the_broker(
    tmp_path: Path, mode: str, everything: Callable[[], Watched]
) -> None:
    steps: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append((progress, total))

    async with broker(tmp_path, everything()) as front, client(front, mode) as agent:
        with anyio.fail_after(30):
            echo = await agent.call_tool("everything__echo", {"message": "hi"})
            long = await agent.call_tool(
                "everything__trigger-long-running-operation",
                {"duration": 0.6, "steps": 3},
                progress_callback=on_progress,
            )
    assert text_of(echo) == "Echo: hi"
    assert not long.is_error
    assert steps == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("mode", ERAS)
async def test_everything_resources_prompts_and_completion_flow_through_the_broker(
    tmp_path: Path, mode: str, everything: Callable[[], Watched]
) -> None:
    async with broker(tmp_path, everything()) as front, client(front, mode) as agent:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(30):
            resources = (await agent.list_resources()).resources
            read = await agent.read_resource(str(resources[0].uri))
            templates = (await agent.list_resource_templates()).resource_templates
            prompts = {p.name for p in (await agent.list_prompts()).prompts}
            got = await agent.get_prompt("everything__args-prompt", {"city": "Oslo"})
            completion = await agent.complete(
                types.PromptReference(name="everything__completable-prompt"),
                {"name": "department", "value": "E"},
            )
    assert resources
    assert str(read.contents[0].uri) == str(resources[0].uri)
    assert any("{resourceId}" in t.uri_template for t in templates)
    assert {"everything__simple-prompt", "everything__args-prompt"} <= prompts
    assert "Oslo" in str(got.messages[0].content)
    assert completion.completion.values
    assert all(v.startswith("E") for v in completion.completion.values)


@pytest.mark.parametrize("mode", ERAS)
async def test_cancelling_a_long_call_at_the_agent_cancels_it_downstream(
    tmp_path: Path, mode: str, everything: Callable[[], Watched]
) -> None:
    watched = everything()
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    async with broker(tmp_path, watched) as front, client(front, mode) as agent:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    await agent.call_tool(
                        "everything__trigger-long-running-operation",
                        {"duration": 30, "steps": 30},
                        progress_callback=on_progress,
                    )

                tg.start_soon(call)
                await started.wait()
                tg.cancel_scope.cancel()
            await watched.cancelled.wait()
            after = await agent.call_tool("everything__echo", {"message": "still here"})
    assert text_of(after) == "Echo: still here"
