"""Connectors against real downstream servers: PyPI time and git, npm everything and filesystem."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import mcp.types as types
import pytest

from connectors import (
    CallTimeout,
    HttpConnector,
    HttpSpec,
    StdioConnector,
    StdioSpec,
)
from connectors._mcp import McpConnector

pytestmark = pytest.mark.servers

VENV_BIN = Path(sys.executable).parent
NpmEntry = Callable[[str], str]


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


def venv_server(name: str) -> str:
    path = VENV_BIN / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: install the project with `pip install -e '.[servers]'`")
    return str(path)


async def test_time_server_answers_and_reports_a_bad_timezone_as_a_tool_error() -> None:
    spec = StdioSpec(id="time", command=venv_server("mcp-server-time"))
    async with StdioConnector(spec) as connector:
        with anyio.fail_after(30):
            names = {tool.name for tool in await connector.list_tools()}
            now = await connector.call_tool("get_current_time", {"timezone": "UTC"})
            bad = await connector.call_tool("get_current_time", {"timezone": "Mars/Olympus"})
    assert {"get_current_time", "convert_time"} <= names
    assert not now.is_error
    assert now.structured_content is not None
    assert now.structured_content["timezone"] == "UTC"
    assert bad.is_error is True


async def test_git_server_reports_the_status_of_a_fresh_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    await anyio.run_process(["git", "init", "-q", str(repo)])
    (repo / "new.txt").write_text("hello\n")
    spec = StdioSpec(
        id="git", command=venv_server("mcp-server-git"), args=("--repository", str(repo))
    )
    async with StdioConnector(spec) as connector:
        with anyio.fail_after(30):
            names = {tool.name for tool in await connector.list_tools()}
            status = await connector.call_tool("git_status", {"repo_path": str(repo)})
    assert {"git_status", "git_log", "git_diff"} <= names
    assert not status.is_error
    assert "new.txt" in text_of(status)


async def test_filesystem_server_reads_inside_the_roots_the_broker_gives_and_nowhere_else(
    npm_server: NpmEntry, tmp_path: Path
) -> None:
    root = tmp_path / "workspace"
    root.mkdir()
    (root / "notes.txt").write_text("inside the root\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    # No directory on the command line: the server takes its directories from roots/list.
    spec = StdioSpec(
        id="files", command="node", args=(npm_server("server-filesystem"),), roots=(str(root),)
    )
    async with StdioConnector(spec) as connector:
        with anyio.fail_after(30):
            # The server asks for roots after the handshake, so poll until it has them.
            while str(root) not in text_of(  # noqa: ASYNC110 - no event to wait on
                await connector.call_tool("list_allowed_directories", {})
            ):
                await anyio.sleep(0.05)
            inside = await connector.call_tool("read_text_file", {"path": str(root / "notes.txt")})
            outside = await connector.call_tool(
                "read_text_file", {"path": str(tmp_path / "secret.txt")}
            )
    assert text_of(inside) == "inside the root\n"
    assert outside.is_error is True


@pytest.fixture(scope="module")
def everything_http_url() -> Iterator[str]:
    """server-everything in streamable HTTP mode on a free loopback port, for the module."""
    entry = (
        Path(__file__).resolve().parents[2]
        / ".tools/npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
    )
    if not entry.is_file():
        pytest.skip(f"{entry} is missing: run `make tools` to install the npm test servers")
    port = _free_port()
    env = {"PATH": os.environ["PATH"], "PORT": str(port)}
    child = subprocess.Popen(
        ["node", str(entry), "streamableHttp"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_listening(port)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, limit: float = 30.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + limit
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(params=["stdio", "http"])
def everything(request: pytest.FixtureRequest, npm_server: NpmEntry) -> Callable[[], McpConnector]:
    """A factory for a connector to server-everything over stdio or streamable HTTP."""
    if request.param == "stdio":
        entry = npm_server("server-everything")
        return lambda: StdioConnector(StdioSpec(id="everything", command="node", args=(entry,)))
    url = request.getfixturevalue("everything_http_url")
    return lambda: HttpConnector(HttpSpec(id="everything", url=url))


async def test_everything_echoes_and_adds(everything: Callable[[], McpConnector]) -> None:
    async with everything() as connector:
        with anyio.fail_after(30):
            echoed = await connector.call_tool("echo", {"message": "hi"})
            summed = await connector.call_tool("get-sum", {"a": 2, "b": 40})
    assert text_of(echoed) == "Echo: hi"
    assert "42" in text_of(summed)


async def test_everything_progress_reaches_the_callback(
    everything: Callable[[], McpConnector],
) -> None:
    steps: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append((progress, total))

    async with everything() as connector:
        with anyio.fail_after(30):
            result = await connector.call_tool(
                "trigger-long-running-operation",
                {"duration": 0.6, "steps": 3},
                progress=on_progress,
            )
    assert not result.is_error
    assert steps == [(1, 3), (2, 3), (3, 3)]


async def test_everything_long_call_is_cancelled_at_the_deadline_and_the_session_goes_on(
    everything: Callable[[], McpConnector],
) -> None:
    async with everything() as connector:
        started = anyio.current_time()
        with anyio.fail_after(10), pytest.raises(CallTimeout):
            await connector.call_tool(
                "trigger-long-running-operation", {"duration": 30, "steps": 30}, timeout=0.5
            )
        assert anyio.current_time() - started < 3
        with anyio.fail_after(10):
            after = await connector.call_tool("echo", {"message": "still here"})
    assert text_of(after) == "Echo: still here"


async def test_everything_resources_are_listed_and_read(
    everything: Callable[[], McpConnector],
) -> None:
    async with everything() as connector:
        with anyio.fail_after(30):
            resources = await connector.list_resources()
            templates = await connector.list_resource_templates()
            read = await connector.read_resource(str(resources[0].uri))
    assert resources
    assert any("{resourceId}" in t.uri_template for t in templates)
    assert read.contents
    assert str(read.contents[0].uri) == str(resources[0].uri)


async def test_everything_prompts_are_listed_got_and_completed(
    everything: Callable[[], McpConnector],
) -> None:
    async with everything() as connector:
        with anyio.fail_after(30):
            prompts = {prompt.name for prompt in await connector.list_prompts()}
            got = await connector.get_prompt("args-prompt", {"city": "Oslo"})
            completion = await connector.complete(
                types.PromptReference(type="ref/prompt", name="completable-prompt"),
                {"name": "department", "value": "E"},
            )
    assert {"simple-prompt", "args-prompt"} <= prompts
    assert "Oslo" in str(got.messages[0].content)
    assert completion.values
    assert all(value.startswith("E") for value in completion.values)
