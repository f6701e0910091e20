"""StdioConnector behaviours observed on one shared child (spawning an SDK server costs seconds).

The tests share a module event loop and one connector to the misbehaving fixture server; the
server appends what it saw (calls, cancellations) to a marker file each test starts empty.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import mcp.types as types
import pytest
import pytest_asyncio

from connectors import CallTimeout, ChangeKind, ConnectorBroken, StdioConnector, StdioSpec

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "servers" / "misbehaving.py"
HARD_MAXIMUM = 2.0


@dataclass
class Child:
    connector: StdioConnector
    marker: Path
    changes: list[ChangeKind] = field(default_factory=list[ChangeKind])
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def wait_for_line(self, line: str, limit: float = 10.0) -> None:
        """Poll the marker file (no event crosses the process boundary)."""
        marker = anyio.Path(self.marker)
        with anyio.fail_after(limit):
            while line not in (await marker.read_text()).splitlines():  # noqa: ASYNC110
                await anyio.sleep(0.02)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Child]:
    marker = tmp_path_factory.mktemp("shared") / "marker"
    spec = StdioSpec(
        id="unruly",
        command=sys.executable,
        args=(str(SERVER), "--marker", str(marker)),
        max_call_timeout=HARD_MAXIMUM,
    )
    connector = StdioConnector(spec)
    child = Child(connector, marker)

    async def listener(kind: ChangeKind) -> None:
        child.changes.append(kind)
        child.changed.set()

    connector.add_change_listener(listener)
    async with connector:
        yield child


@pytest_asyncio.fixture(loop_scope="module")
async def child(shared: Child) -> Child:
    shared.marker.write_text("")
    shared.changes.clear()
    shared.changed = anyio.Event()
    return shared


async def test_deadline_cancels_the_call_downstream_and_raises_call_timeout(child: Child) -> None:
    with anyio.fail_after(10), pytest.raises(CallTimeout):
        await child.connector.call_tool("hang", {}, timeout=0.3)
    await child.wait_for_line("cancelled hang")


async def test_hard_maximum_fires_while_progress_keeps_arriving(child: Child) -> None:
    steps: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append(progress)

    started = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(CallTimeout):
        await child.connector.call_tool(
            "progress_forever", {"interval": 0.05}, progress=on_progress, timeout=600
        )
    assert anyio.current_time() - started < HARD_MAXIMUM + 2.0
    await child.wait_for_line("cancelled progress_forever")
    assert len(steps) >= 5


async def test_cancelling_the_caller_cancels_the_call_downstream(child: Child) -> None:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(child.connector.call_tool, "hang", {})
            await child.wait_for_line("called hang")
            tg.cancel_scope.cancel()
        await child.wait_for_line("cancelled hang")
        result = await child.connector.call_tool("echo", {"text": "after"})
    assert not result.is_error


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("tools", ChangeKind.TOOLS),
        ("resources", ChangeKind.RESOURCES),
        ("prompts", ChangeKind.PROMPTS),
    ],
)
async def test_list_changed_notifications_reach_listeners(
    child: Child, kind: str, expected: ChangeKind
) -> None:
    before = {tool.name for tool in await child.connector.list_tools()}
    with anyio.fail_after(10):
        await child.connector.call_tool("change", {"kind": kind})
        await child.changed.wait()
    after = {tool.name for tool in await child.connector.list_tools()}
    assert child.changes == [expected]
    grown = after - before
    assert len(grown) == (1 if kind == "tools" else 0)
    assert all(name.startswith("grown_") for name in grown)


async def test_a_child_that_dies_mid_call_fails_the_call_then_restarts(child: Child) -> None:
    first_pid = child.connector.pid
    started = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(ConnectorBroken) as broken:
        await child.connector.call_tool("crash", {"code": 3})
    assert anyio.current_time() - started < 3.0
    assert str(broken.value) == "stdio server 'unruly' exited with code 3"
    with anyio.fail_after(30):
        await child.changed.wait()
        result = await child.connector.call_tool("echo", {"text": "back"})
    assert child.connector.pid not in (None, first_pid)
    assert child.changes == [ChangeKind.RESTARTED]
    assert result.content == [types.TextContent(type="text", text="back")]
