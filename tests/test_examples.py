"""The runnable agents under ``examples/agents/``, each run as a subprocess against a served broker.

Also home of `served_broker`: a real broker built by `create_app` from a ``broker.toml``-shaped
config, served by uvicorn on a loopback port whose URL is the issuer, every pinned tool
approved. The other real-process tests (stdio shim, inspector-cli, conformance) import it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.agents import register_agent
from broker.app import Services, create_app
from broker.config import BrokerConfig, ConnectorConfig, ServerConfig, StoreConfig, TokenConfig
from broker.core.identity import Agent
from broker.store.testing import sqlite_url
from broker.testing import serve_app

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEMO = ConnectorConfig(id="demo", kind="native", target="broker.demo_tools:toolset")
DEMO_SCOPES = """\
[[scope]]
name = "demo:use"
description = "The broker's built-in demo tools"
[[scope.grant]]
connector = "demo"
tools = ["*"]
"""


class _LateApp:
    """Answers uvicorn's lifespan itself and forwards requests to ``app`` once it is set.

    The broker's issuer is its public URL, known only once the port is bound, so the app is
    built after the server starts listening.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if self.app is None:  # pragma: no cover - requests come only after the app is set
            raise RuntimeError("app not ready")
        await self.app(scope, receive, send)


@dataclass
class ServedBroker:
    url: str
    app: Starlette
    services: Services

    @property
    def mcp_url(self) -> str:
        return self.url + "/mcp"

    async def add_agent(
        self, name: str, scopes: Sequence[str], *, max_ttl: int = 600
    ) -> tuple[Agent, str]:
        agent, secret = await register_agent(
            self.services.store,
            name=name,
            owner="ops@example.com",
            scopes=scopes,
            max_ttl=max_ttl,
            now=datetime.now(UTC),
        )
        assert secret is not None
        return agent, secret

    async def mint(self, agent: Agent, scope: str) -> str:
        """A task token, as ``broker token mint`` would issue it."""
        response = await self.services.tokens.mint_for(agent.id, scope=scope, purpose="test")
        return response.access_token

    async def approve_all(self) -> None:
        store, registry = self.services.store, self.services.registry
        for pin in await store.list_pins():
            if pin.approved_digest != pin.digest:
                await store.approve_pin(
                    pin.connector_id, pin.tool_name, pin.digest, "test", datetime.now(UTC)
                )
        await registry.reload_pins()


@asynccontextmanager
async def served_broker(
    tmp_path: Path,
    *,
    connectors: Sequence[ConnectorConfig] = (DEMO,),
    scopes_toml: str = DEMO_SCOPES,
    tokens: Mapping[str, Any] | None = None,
) -> AsyncIterator[ServedBroker]:
    """A broker from `create_app`, served on loopback, with every tool approved."""
    scope_file = tmp_path / "scopes.toml"
    scope_file.write_text(scopes_toml, encoding="utf-8")
    late = _LateApp()
    async with serve_app(late) as url:
        config = BrokerConfig(
            server=ServerConfig(public_url=url),
            store=StoreConfig(url=sqlite_url(tmp_path)),
            tokens=TokenConfig(keys_dir=tmp_path / "keys", **dict(tokens or {})),
            scope_files=(scope_file,),
            connectors=tuple(connectors),
            base_dir=tmp_path,
        )
        app = create_app(config, environ={"PATH": os.environ.get("PATH", "")})
        async with app.router.lifespan_context(app):
            broker = ServedBroker(url, app, app.state.services)
            await broker.approve_all()
            late.app = app
            yield broker


# -- tests -------------------------------------------------------------------------------------


async def test_quickstart_agent_lists_and_calls_a_tool_through_a_served_broker(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("quickstart", ["demo:use"])
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "BROKER_URL": broker.url,
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": secret,
        }
        command = [
            sys.executable,
            str(REPO / "examples" / "agents" / "quickstart.py"),
            "--tool",
            "demo__echo",
            "--args",
            '{"text": "hello from the quickstart"}',
        ]
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    assert "3 tools reachable" in out
    assert "  demo__echo: Return the text unchanged." in out
    assert "demo__echo -> hello from the quickstart" in out
    assert secret not in out + err


async def test_quickstart_agent_without_credentials_says_what_to_set(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "examples" / "agents" / "quickstart.py")]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    with anyio.fail_after(30):
        done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    assert done.returncode == 2
    assert "set BROKER_CLIENT_ID" in done.stderr.decode()


async def test_quickstart_agent_with_a_wrong_secret_fails_without_printing_it(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, _secret = await broker.add_agent("quickstart", ["demo:use"])
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "BROKER_URL": broker.url,
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": "wrong-secret-value",
        }
        command = [sys.executable, str(REPO / "examples" / "agents" / "quickstart.py")]
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    assert done.returncode != 0
    assert "wrong-secret-value" not in done.stdout.decode() + done.stderr.decode()
