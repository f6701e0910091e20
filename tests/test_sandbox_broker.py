"""Issue 8 through the real broker: a stdio connector configured like ``broker.toml`` runs
jailed, `connectors show` prints its jail, its egress attempts are recorded, and a change to
what it runs disables its tools until the new provenance is approved."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx2
import mcp.types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.config import ConnectorConfig, EgressConfig
from broker.core.recording import EventKind
from broker.mediation import DECISION_META
from broker.sandboxing import connector_session_id
from broker.store.testing import migrated_store
from broker.testing import ServedBroker, served_broker
from connectors import PROVENANCE_PIN_NAME, StdioConnector, probe_sandbox
from tests.cli.test_connectors_cli import invoke

pytestmark = pytest.mark.skipif(
    not probe_sandbox().available, reason=f"no sandbox here: {probe_sandbox().reason}"
)

SERVER = '''\
"""A stdlib MCP stdio server: read (a file), fetch (a URL through the proxies in its env)."""
import json
import sys
import urllib.request

TOOLS = [
    {"name": "read", "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}}},
    {"name": "fetch", "inputSchema": {"type": "object", "properties": {"url": {"type": "string"}}}},
]


def call(name, arguments):
    try:
        if name == "read":
            with open(arguments["path"], encoding="utf-8") as handle:
                return handle.read(), False
        with urllib.request.urlopen(arguments["url"], timeout=5) as response:
            return f"status {response.status}", False
    except Exception as exc:
        return f"failed: {type(exc).__name__}", True


for line in sys.stdin:
    request = json.loads(line)
    if "id" not in request:
        continue
    method = request.get("method")
    if method == "initialize":
        result = {
            "protocolVersion": request["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "box", "version": "1.0"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        params = request["params"]
        text, failed = call(params["name"], params.get("arguments") or {})
        result = {"content": [{"type": "text", "text": text}], "isError": failed}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}), flush=True)
'''

SCOPES = """\
[[scope]]
name = "box:use"
[[scope.grant]]
connector = "box"
tools = ["read"]
args = {{ path = {{ within = "{workspace}" }} }}
[[scope.grant]]
connector = "box"
tools = ["fetch"]
"""


@dataclass
class Box:
    broker: ServedBroker
    script: Path
    workspace: Path
    token: str
    agent_id: str

    async def call(self, tool: str, arguments: dict[str, str]) -> types.CallToolResult:
        headers = {"authorization": f"Bearer {self.token}"}
        with anyio.fail_after(30):
            async with (
                httpx2.AsyncClient(headers=headers, timeout=20) as http,
                Client(streamable_http_client(self.broker.mcp_url, http_client=http)) as client,
            ):
                return await client.call_tool(tool, arguments)


def text(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


def layout(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "app" / "server.py"
    script.parent.mkdir()
    script.write_text(SERVER, encoding="utf-8")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "note.txt").write_text("inside the workspace", encoding="utf-8")
    return script, workspace


def box_config(script: Path) -> ConnectorConfig:
    return ConnectorConfig(
        id="box",
        kind="stdio",
        command=sys.executable,
        args=(str(script),),
        sandbox="required",
        egress=EgressConfig(hosts=("example.com",)),
    )


@asynccontextmanager
async def served_box(tmp_path: Path) -> AsyncIterator[Box]:
    script, workspace = layout(tmp_path)
    async with served_broker(
        tmp_path,
        connectors=(box_config(script),),
        scopes_toml=SCOPES.format(workspace=workspace),
    ) as broker:
        agent, _secret = await broker.add_agent("boxer", ["box:use"])
        yield Box(broker, script, workspace, await broker.mint(agent, "box:use"), agent.id)


async def test_a_sandboxed_stdio_connector_from_the_config_serves_its_tools(
    tmp_path: Path,
) -> None:
    async with served_box(tmp_path) as box:
        connector = box.broker.services.registry.connector("box")
        result = await box.call("box__read", {"path": str(box.workspace / "note.txt")})

    assert isinstance(connector, StdioConnector)
    assert connector.sandboxed
    assert connector.spec.sandbox is not None
    assert connector.spec.sandbox.read_paths == (str(box.workspace),)
    assert str(tmp_path / "keys") in connector.spec.sandbox.deny_paths
    assert not result.is_error, text(result)
    assert text(result) == "inside the workspace"


async def test_an_egress_attempt_by_a_sandboxed_connector_is_recorded_in_its_session(
    tmp_path: Path,
) -> None:
    async with served_box(tmp_path) as box:
        result = await box.call("box__fetch", {"url": "http://127.0.0.1:1/"})
        store = box.broker.services.store
        events = await store.session_events(connector_session_id("box"))
        [agent_session] = await store.list_sessions(agent_id=box.agent_id)
        agent_events = await store.session_events(agent_session.id)

    assert result.is_error
    egress = [e for e in events if e.kind == EventKind.EGRESS]
    assert len(egress) == 1
    assert egress[0].payload["connector"] == "box"
    assert egress[0].payload["allowed"] is False
    assert egress[0].payload["host"] == "127.0.0.1"
    assert egress[0].payload["reason"] == "host-not-allowed"
    # The only call in flight made it: the attempt is also in the agent's session, under the
    # call's decision id.
    decision_id = (result.meta or {})[DECISION_META]
    assert egress[0].payload["calls"] == [decision_id]
    in_agents = [e for e in agent_events if e.kind == EventKind.EGRESS]
    assert [e.decision_id for e in in_agents] == [decision_id]
    assert in_agents[0].payload["reason"] == "host-not-allowed"
    assert "calls" not in in_agents[0].payload


async def test_a_changed_connector_script_disables_its_tools_until_the_change_is_approved(
    tmp_path: Path,
) -> None:
    note = {"path": ""}
    async with served_box(tmp_path) as box:
        note["path"] = str(box.workspace / "note.txt")
        registry, store = box.broker.services.registry, box.broker.services.store
        with box.script.open("a", encoding="utf-8") as handle:
            handle.write("# changed after approval\n")
        await registry.refresh("box")  # what a restart or list_changed triggers
        refused = await box.call("box__read", note)
        listed = [r.name for r in registry.snapshot.listed]

        pin = next(p for p in await store.get_pins("box") if p.tool_name == PROVENANCE_PIN_NAME)
        await store.approve_pin("box", PROVENANCE_PIN_NAME, pin.digest, "admin", datetime.now(UTC))
        await registry.reload_pins()
        served = await box.call("box__read", note)
        rebuilt = registry.connector("box")

    assert refused.is_error
    assert text(refused).startswith("denied (tool-definition-changed)")
    assert listed == []
    assert not served.is_error, text(served)
    assert text(served) == "inside the workspace"
    assert isinstance(rebuilt, StdioConnector)
    assert rebuilt.spec.expected_provenance is not None


def test_connectors_show_prints_the_sandbox_in_force(tmp_path: Path) -> None:
    script, workspace = layout(tmp_path)
    (tmp_path / "scopes.toml").write_text(SCOPES.format(workspace=workspace), encoding="utf-8")
    config = tmp_path / "broker.toml"
    config.write_text(
        f'scope_files = ["scopes.toml"]\n[store]\nurl = "sqlite+aiosqlite:///{tmp_path}/b.db"\n\n'
        f'[[connectors]]\nid = "box"\nkind = "stdio"\ncommand = "{sys.executable}"\n'
        f'args = ["{script}"]\nsandbox = "required"\n'
        '[connectors.egress]\nhosts = ["example.com"]\n',
        encoding="utf-8",
    )

    async def migrate() -> None:
        async with migrated_store(f"sqlite+aiosqlite:///{tmp_path}/b.db"):
            pass

    anyio.run(migrate)
    code, out, err = invoke(config, "connectors", "show", "box")

    assert code == 0, err
    assert "sandbox mode: required" in out
    assert "argv: " in out
    assert "bwrap" in out
    assert f"ro {workspace} (scope path)" in out
    assert "network: egress proxy only" in out
    assert "egress hosts: example.com" in out
