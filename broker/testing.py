"""Helpers shipped for tests (ours and integrators'): a real uvicorn server on a loopback port.

`serve_app(app)` binds 127.0.0.1:0 before the server starts (no port races), runs uvicorn in the
current event loop, waits for start-up under a bound, and shuts it down on exit. `LateApp` lets
an app be built once that URL is known (the broker's issuer is its public URL). `served_broker`
is a real broker built by `create_app` from a ``broker.toml``-shaped config, served that way,
every pinned tool approved.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.agents import register_agent
from broker.app import Services, create_app
from broker.config import BrokerConfig, ConnectorConfig, ServerConfig, StoreConfig, TokenConfig
from broker.core.identity import Agent
from broker.store.testing import sqlite_url

__all__ = ["DEMO", "DEMO_SCOPES", "LateApp", "ServedBroker", "serve_app", "served_broker"]


@asynccontextmanager
async def serve_app(app: ASGIApp, *, startup_timeout: float = 10.0) -> AsyncIterator[str]:
    """Serve ``app`` on a fresh loopback port; yields the base URL ``http://127.0.0.1:PORT``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                with anyio.fail_after(startup_timeout):
                    while not server.started:
                        if server.should_exit:
                            raise RuntimeError("uvicorn exited during start-up (see the log)")
                        await anyio.sleep(0.01)
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


DEMO = ConnectorConfig(id="demo", kind="native", target="broker.demo_tools:toolset")
DEMO_SCOPES = """\
[[scope]]
name = "demo:use"
description = "The broker's built-in demo tools"
[[scope.grant]]
connector = "demo"
tools = ["*"]
"""


class LateApp:
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
        if secret is None:  # pragma: no cover - an agent without a public key gets a secret
            raise RuntimeError(f"agent {name!r} was registered without a client secret")
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
    record: bool = True,
) -> AsyncIterator[ServedBroker]:
    """A broker from `create_app`, served on loopback, with every tool approved.

    ``record=False`` builds it not to record (`create_app`'s bench-only switch).
    """
    scope_file = tmp_path / "scopes.toml"
    scope_file.write_text(scopes_toml, encoding="utf-8")
    late = LateApp()
    async with serve_app(late) as url:
        config = BrokerConfig(
            server=ServerConfig(public_url=url),
            store=StoreConfig(url=sqlite_url(tmp_path)),
            tokens=TokenConfig(keys_dir=tmp_path / "keys", **dict(tokens or {})),
            scope_files=(scope_file,),
            connectors=tuple(connectors),
            base_dir=tmp_path,
        )
        app = create_app(config, environ={"PATH": os.environ.get("PATH", "")}, record=record)
        async with app.router.lifespan_context(app):
            broker = ServedBroker(url, app, app.state.services)
            await broker.approve_all()
            late.app = app
            yield broker
