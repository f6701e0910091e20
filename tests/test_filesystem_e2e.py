"""Path constraints end to end: npm ``@modelcontextprotocol/server-filesystem`` behind the broker.

The server runs as a stdio connector through the tee shim (`tests/fixtures/servers/tee.py`),
which logs every JSON-RPC line the server receives: a refused call is proven never to have
reached it, and an allowed one to have arrived in canonical form. The connector is marked local
(same host), so ``within`` paths are also checked after resolving symlinks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
import pytest
from mcp import Client
from mcp.server import ServerRequestContext

from broker.mcp_front import McpFront
from broker.principal import Principal
from broker.registry import Registry
from broker.store.testing import migrated_store, sqlite_url
from connectors import StdioSpec, open_connector
from scopes.definitions import parse_scope_toml

pytestmark = pytest.mark.servers

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / ".tools/npm/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js"
AGENT = Principal(
    agent_id="agent-1", client_id="agent-1", scopes=frozenset({"fs:ws"}), token_id="t" * 22
)


@dataclass
class Setup:
    front: McpFront
    ws: Path
    outside: Path
    log: Path

    def received_calls(self) -> list[dict[str, Any]]:
        """Every ``tools/call`` the filesystem server was sent: name and arguments."""
        calls: list[dict[str, Any]] = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            message = json.loads(line)
            if message.get("method") == "tools/call":
                calls.append(message["params"])
        return calls


def scopes_for(ws: Path) -> str:
    root = json.dumps(str(ws))
    return f"""
[[scope]]
name = "fs:ws"
[[scope.grant]]
connector = "fs"
tools = ["read_text_file", "list_directory", "get_file_info"]
args = {{ path = {{ within = {root} }} }}
[[scope.grant]]
connector = "fs"
tools = ["read_multiple_files"]
args = {{ "paths[*]" = {{ within = {root} }} }}
[[scope.grant]]
connector = "fs"
tools = ["move_file"]
args = {{ source = {{ within = {root} }}, destination = {{ within = {root} }} }}
"""


def make_workspace(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``ws`` with files, a sibling ``ws_evil``, ``outside``, and symlinks from ws to outside."""
    base = tmp_path.resolve()
    ws = base / "ws"
    outside = base / "outside"
    evil = base / "ws_evil"
    for folder in (ws / "sub", outside, evil):
        folder.mkdir(parents=True)
    (ws / "a.txt").write_text("alpha")
    (ws / "sub" / "b.txt").write_text("beta")
    (outside / "secret.txt").write_text("outside secret")
    (evil / "secret.txt").write_text("sibling secret")
    os.symlink(outside, ws / "link")
    os.symlink(outside / "secret.txt", ws / "innocent.txt")
    return base, ws, outside


@asynccontextmanager
async def filesystem_behind_broker(tmp_path: Path) -> AsyncIterator[Setup]:
    if shutil.which("node") is None or not SERVER.is_file():
        pytest.skip("server-filesystem is not installed: run `make tools`")
    base, ws, outside = make_workspace(tmp_path)
    log = base / "received.jsonl"
    spec = StdioSpec(
        id="fs",
        command=sys.executable,
        # The server may serve its parent: the broker's constraint is what keeps calls inside ws.
        args=("-m", "tests.fixtures.servers.tee", str(log), "--", "node", str(SERVER), str(base)),
        cwd=str(REPO),
        env_allowlist=("PATH", "HOME"),
    )
    definitions = parse_scope_toml(scopes_for(ws), source="test")

    def lookup(_ctx: ServerRequestContext[Any, Any]) -> Principal:
        return AGENT

    async with migrated_store(sqlite_url(tmp_path)) as store:
        registry = Registry(store, pin_poll_interval=60)
        registry.add(open_connector(spec), prefix="")
        async with registry:
            for pin in await store.list_pins():
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "t", NOW)
            await registry.reload_pins()
            front = McpFront(
                registry, definitions, principal_lookup=lookup, local_connectors=["fs"]
            )
            yield Setup(front, ws, outside, log)


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


def refused_cases(ws: Path) -> list[tuple[str, str, dict[str, Any]]]:
    w = str(ws)
    return [
        ("traversal", "read_text_file", {"path": f"{w}/../outside/secret.txt"}),
        ("deep traversal", "read_text_file", {"path": f"{w}/sub/../../outside/secret.txt"}),
        ("sibling prefix", "read_text_file", {"path": f"{w}_evil/secret.txt"}),
        ("encoded dots", "read_text_file", {"path": f"{w}/%2e%2e/outside/secret.txt"}),
        ("encoded slash", "read_text_file", {"path": f"{w}/..%2foutside/secret.txt"}),
        ("backslash", "read_text_file", {"path": f"{w}\\..\\outside\\secret.txt"}),
        ("NUL", "read_text_file", {"path": f"{w}/a.txt\x00.png"}),
        ("symlinked folder out", "read_text_file", {"path": f"{w}/link/secret.txt"}),
        ("symlinked file out", "read_text_file", {"path": f"{w}/innocent.txt"}),
        ("symlink itself", "list_directory", {"path": f"{w}/link"}),
        ("relative", "read_text_file", {"path": "a.txt"}),
        ("dot relative", "read_text_file", {"path": "./ws/a.txt"}),
        ("home", "read_text_file", {"path": "~/a.txt"}),
        ("root", "list_directory", {"path": "/"}),
        ("missing", "read_text_file", {}),
        ("not a string", "read_text_file", {"path": ["/etc/passwd"]}),
        (
            "one bad path among many",
            "read_multiple_files",
            {"paths": [f"{w}/a.txt", f"{w}/../outside/secret.txt"]},
        ),
        ("paths not a list", "read_multiple_files", {"paths": f"{w}/a.txt"}),
        (
            "move out",
            "move_file",
            {"source": f"{w}/a.txt", "destination": f"{w}/../outside/a.txt"},
        ),
        (
            "move in from outside",
            "move_file",
            {"source": f"{w}/link/secret.txt", "destination": f"{w}/stolen.txt"},
        ),
        ("move without destination", "move_file", {"source": f"{w}/a.txt"}),
        ("write is not granted", "write_file", {"path": f"{w}/new.txt", "content": "x"}),
    ]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_every_path_trick_is_refused_and_never_reaches_the_filesystem_server(
    tmp_path: Path, mode: str
) -> None:
    async with filesystem_behind_broker(tmp_path) as setup:
        cases = refused_cases(setup.ws)
        async with Client(setup.front.server, mode=mode) as agent:  # pyright: ignore[reportArgumentType]
            with anyio.fail_after(60):
                answers = {
                    label: await agent.call_tool(tool, arguments)
                    for label, tool, arguments in cases
                }
                # A call after them all: once it is logged, anything sent before would be too.
                ok = await agent.call_tool("get_file_info", {"path": str(setup.ws / "a.txt")})
        assert not ok.is_error
        for label, result in answers.items():
            assert result.is_error, label
            expected = "scope-missing" if label == "write is not granted" else "constraint-violated"
            assert text_of(result).startswith(f"denied ({expected}); decision dec_"), label
        assert [c["name"] for c in setup.received_calls()] == ["get_file_info"]
        assert "outside secret" not in json.dumps([text_of(r) for r in answers.values()])


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_legitimate_reads_work_and_reach_the_server_in_canonical_form(
    tmp_path: Path, mode: str
) -> None:
    async with filesystem_behind_broker(tmp_path) as setup:
        w = str(setup.ws)
        async with Client(setup.front.server, mode=mode) as agent:  # pyright: ignore[reportArgumentType]
            with anyio.fail_after(60):
                single = await agent.call_tool("read_text_file", {"path": f"{w}/sub/.//../a.txt"})
                many = await agent.call_tool(
                    "read_multiple_files", {"paths": [f"{w}/a.txt", f"{w}/sub/./b.txt"]}
                )
                listing = await agent.call_tool("list_directory", {"path": f"{w}/sub/"})
        assert text_of(single) == "alpha"
        assert "alpha" in text_of(many)
        assert "beta" in text_of(many)
        assert "b.txt" in text_of(listing)
        received = setup.received_calls()
        assert [c["arguments"] for c in received] == [
            {"path": f"{w}/a.txt"},
            {"paths": [f"{w}/a.txt", f"{w}/sub/b.txt"]},
            {"path": f"{w}/sub"},
        ]


async def test_a_move_inside_the_workspace_is_forwarded_with_both_paths_canonical(
    tmp_path: Path,
) -> None:
    async with filesystem_behind_broker(tmp_path) as setup:
        w = str(setup.ws)
        async with Client(setup.front.server, mode="legacy") as agent:
            with anyio.fail_after(60):
                moved = await agent.call_tool(
                    "move_file", {"source": f"{w}/sub/../a.txt", "destination": f"{w}/sub/c.txt"}
                )
        assert not moved.is_error, text_of(moved)
        assert (setup.ws / "sub" / "c.txt").read_text() == "alpha"
        assert setup.received_calls()[-1]["arguments"] == {
            "source": f"{w}/a.txt",
            "destination": f"{w}/sub/c.txt",
        }
