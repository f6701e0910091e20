"""StdioConnector against test-owned servers: environment, stderr, deadlines, crashes, cleanup."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import anyio
import mcp.types as types
import pytest

from connectors import (
    ConnectorBroken,
    ConnectorClosed,
    ConnectorConfigError,
    DownstreamError,
    StdioConnector,
    StdioSpec,
)
from connectors.base import ProgressCallback
from connectors.testing import check_connector

Argv = Callable[[str], tuple[str, ...]]


def misbehaving(
    fixture_server: Argv, marker: Path | None = None, **spec_fields: object
) -> StdioSpec:
    command, *args = fixture_server("misbehaving")
    if marker is not None:
        args += ["--marker", str(marker)]
    return StdioSpec(id="unruly", command=command, args=tuple(args), **spec_fields)  # pyright: ignore[reportArgumentType]


async def wait_for_line(path: Path, line: str, limit: float = 10.0) -> None:
    """Poll the marker file the server appends to (no event crosses the process boundary)."""
    marker = anyio.Path(path)
    with anyio.fail_after(limit):
        while not (await marker.exists() and line in (await marker.read_text()).splitlines()):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_stdio_connector_passes_the_conformance_suite(fixture_server: Argv) -> None:
    await check_connector(lambda: StdioConnector(misbehaving(fixture_server)))


async def test_child_environment_is_the_allowlist_plus_spec_env_only(
    fixture_server: Argv, tmp_path: Path
) -> None:
    # LANG is set so that the child's Python does not add LC_CTYPE itself (PEP 538).
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": "/home/broker",
        "LANG": "C.UTF-8",
        "SECRET_TOKEN": "x",
        "USER": "b",
    }
    command, *args = fixture_server("minimal")
    spec = StdioSpec(
        id="minimal",
        command=command,
        args=tuple(args),
        env={"DOWNSTREAM_KEY": "k"},
        cwd=str(tmp_path),
    )
    async with StdioConnector(spec, environ=environ) as connector:
        with anyio.fail_after(30):
            result = await connector.call_tool("environment", {})
    assert result.structured_content is not None
    assert result.structured_content["names"] == ["DOWNSTREAM_KEY", "HOME", "LANG", "PATH"]
    assert result.structured_content["cwd"] == str(tmp_path)


async def test_child_stderr_goes_to_the_stdio_logger_line_by_line(
    fixture_server: Argv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connectors.stdio")
    command, *args = fixture_server("minimal")
    async with StdioConnector(StdioSpec(id="minimal", command=command, args=tuple(args))):
        pass
    lines = [r for r in caplog.records if r.getMessage() == "minimal server ready"]
    assert len(lines) == 1
    assert lines[0].connector == "minimal"  # pyright: ignore[reportAttributeAccessIssue]


async def test_restarts_stop_after_max_restarts_and_calls_then_fail_broken(
    fixture_server: Argv,
) -> None:
    command, *args = fixture_server("minimal")
    spec = StdioSpec(id="minimal", command=command, args=tuple(args), max_restarts=0)
    async with StdioConnector(spec) as connector:
        with anyio.fail_after(5), pytest.raises(ConnectorBroken):
            await connector.call_tool("crash", {"code": 1})
        with anyio.fail_after(5), pytest.raises(ConnectorBroken, match="gave up"):
            await connector.call_tool("echo", {"text": "x"})


async def test_a_command_that_cannot_start_fails_start_with_connector_broken(
    tmp_path: Path,
) -> None:
    connector = StdioConnector(StdioSpec(id="ghost", command=str(tmp_path / "missing")))
    with anyio.fail_after(10), pytest.raises(ConnectorBroken, match="failed to start"):
        await connector.start()
    await connector.aclose()


def test_an_empty_command_is_a_config_error() -> None:
    with pytest.raises(ConnectorConfigError):
        StdioConnector(StdioSpec(id="empty", command=""))


async def test_fifty_start_stop_cycles_leave_no_child_process(
    fixture_server: Argv, procs: type
) -> None:
    command, *args = fixture_server("minimal")
    # -S: the stdlib-only server needs no site-packages, and starts faster without them.
    spec = StdioSpec(id="cycle", command=command, args=("-S", *args, "--grandchild"))
    before = procs.children_of(os.getpid())
    with anyio.fail_after(90):
        for _ in range(50):
            connector = StdioConnector(spec)
            await connector.start()
            group = connector.pid
            assert group is not None
            result = await connector.call_tool("echo", {"text": "hi"})
            assert not result.is_error
            await connector.aclose()
            assert not procs.alive(group)
            # SIGKILL to the group is sent; the orphaned grandchild takes a moment to vanish.
            while procs.group(group):  # noqa: ASYNC110 - nothing to wait on but /proc
                await anyio.sleep(0.01)
    assert procs.children_of(os.getpid()) - before == set()


async def test_cancelling_the_task_that_owns_the_connector_still_kills_the_child(
    fixture_server: Argv, procs: type
) -> None:
    command, *args = fixture_server("minimal")
    spec = StdioSpec(id="owned", command=command, args=tuple(args))
    pids: list[int] = []

    async def owner(task_status: anyio.abc.TaskStatus[None]) -> None:
        connector = StdioConnector(spec)
        try:
            await connector.start()
            assert connector.pid is not None
            pids.append(connector.pid)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            await connector.aclose()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(owner)
            tg.cancel_scope.cancel()
    assert not procs.alive(pids[0])


async def test_calls_after_close_raise_connector_closed_without_spawning(
    fixture_server: Argv,
) -> None:
    connector = StdioConnector(misbehaving(fixture_server))
    await connector.aclose()
    with pytest.raises(ConnectorClosed):
        await connector.list_tools()
    assert connector.pid is None


async def _ignore_progress(progress: float, total: float | None, message: str | None) -> None:
    pass


@pytest.mark.parametrize("progress", [None, _ignore_progress], ids=["direct", "sdk"])
async def test_a_refusal_and_a_malformed_result_raise_downstream_error_on_either_path(
    fixture_server: Argv, progress: ProgressCallback | None
) -> None:
    """A call without progress skips the SDK session; what the caller sees must not change."""
    command, *args = fixture_server("minimal")
    async with StdioConnector(StdioSpec(id="minimal", command=command, args=tuple(args))) as c:
        with anyio.fail_after(30):
            with pytest.raises(DownstreamError) as refused:
                await c.call_tool("refuse", {}, progress=progress)
            with pytest.raises(DownstreamError) as malformed:
                await c.call_tool("not_a_result", {}, progress=progress)
            after = await c.call_tool("echo", {"text": "still here"}, progress=progress)
    assert (refused.value.code, str(refused.value)) == (-32602, "refused: the text is too long")
    assert str(malformed.value) == "stdio server 'minimal' sent an invalid tools/call result"
    assert after.content == [types.TextContent(type="text", text="still here")]


@pytest.mark.parametrize("tool", ["garbled_error", "nan"])
async def test_an_answer_that_is_not_json_rpc_or_not_json_is_an_invalid_result(
    fixture_server: Argv, tool: str
) -> None:
    command, *args = fixture_server("minimal")
    async with StdioConnector(StdioSpec(id="minimal", command=command, args=tuple(args))) as c:
        with anyio.fail_after(30), pytest.raises(DownstreamError, match="invalid tools/call"):
            await c.call_tool(tool, {})


async def test_an_error_without_code_or_message_is_still_a_named_refusal(
    fixture_server: Argv,
) -> None:
    command, *args = fixture_server("minimal")
    async with StdioConnector(StdioSpec(id="minimal", command=command, args=tuple(args))) as c:
        with anyio.fail_after(30), pytest.raises(DownstreamError) as refused:
            await c.call_tool("vague_error", {})
    assert (refused.value.code, str(refused.value)) == (-32603, "the server refused the call")


async def test_concurrent_calls_each_get_their_own_answer(fixture_server: Argv) -> None:
    command, *args = fixture_server("minimal")
    texts = [f"call {n}" for n in range(40)]
    seen: dict[str, object] = {}
    async with StdioConnector(StdioSpec(id="minimal", command=command, args=tuple(args))) as c:

        async def call(text: str) -> None:
            seen[text] = (await c.call_tool("echo", {"text": text})).content

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for text in texts:
                    tg.start_soon(call, text)
            tools = await c.list_tools()
    assert seen == {t: [types.TextContent(type="text", text=t)] for t in texts}
    assert "echo" in {tool.name for tool in tools}
