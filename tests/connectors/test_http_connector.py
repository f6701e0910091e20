"""HttpConnector against the test-owned server, served in-process by uvicorn on a loopback port.

In-process so that stopping and restarting the server takes milliseconds instead of a fresh
interpreter; the connector still talks to it over a real socket.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from connectors import (
    ChangeKind,
    ConnectorBroken,
    ConnectorConfigError,
    HttpConnector,
    HttpSpec,
)
from connectors.testing import check_connector
from tests.fixtures.servers.misbehaving import build


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def serving(port: int = 0) -> AsyncIterator[int]:
    """Serve a fresh fixture server on ``port`` (0: any free one) until the block ends."""
    server = build(None)
    mcp_app = server.streamable_http_app(host="127.0.0.1")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    app = Starlette(routes=[Mount("/", app=mcp_app)], lifespan=lifespan)
    sock = listening_socket(port)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    try:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await uv.serve(sockets=[sock])

            tg.start_soon(run)
            with anyio.fail_after(10):
                while not uv.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                    await anyio.sleep(0.01)
            try:
                yield sock.getsockname()[1]
            finally:
                uv.should_exit = True
                uv.force_exit = True
    finally:
        sock.close()  # on every exit, a failed start-up included


def spec_for(port: int, **fields: Any) -> HttpSpec:
    return HttpSpec(id="remote", url=f"http://127.0.0.1:{port}/mcp", **fields)


async def test_http_connector_passes_the_conformance_suite() -> None:
    async with serving() as port:
        await check_connector(lambda: HttpConnector(spec_for(port)))


async def test_requests_carry_the_brokers_own_headers() -> None:
    async with serving() as port:
        spec = spec_for(port, headers={"Authorization": "Bearer broker-own"})
        async with HttpConnector(spec) as connector:
            with anyio.fail_after(10):
                result = await connector.call_tool("headers", {})
    assert result.structured_content is not None
    assert result.structured_content["headers"]["authorization"] == "Bearer broker-own"


async def test_tools_list_changed_over_http_reaches_listeners() -> None:
    told = anyio.Event()

    async def listener(kind: ChangeKind) -> None:
        if kind is ChangeKind.TOOLS:
            told.set()

    async with serving() as port, HttpConnector(spec_for(port)) as connector:
        connector.add_change_listener(listener)
        with anyio.fail_after(10):
            await connector.call_tool("change", {"kind": "tools"})
            await told.wait()


async def test_a_server_that_goes_away_fails_calls_then_the_connector_reconnects() -> None:
    restarted = anyio.Event()

    async def listener(kind: ChangeKind) -> None:
        if kind is ChangeKind.RESTARTED:
            restarted.set()

    async with serving() as port:
        connector = HttpConnector(spec_for(port))
        await connector.start()
    try:
        connector.add_change_listener(listener)
        with anyio.fail_after(10), pytest.raises(ConnectorBroken):
            await connector.call_tool("echo", {"text": "nobody home"})
        async with serving(port):
            with anyio.fail_after(30):
                await restarted.wait()
                result = await connector.call_tool("echo", {"text": "back"})
        assert not result.is_error
    finally:
        await connector.aclose()


async def test_a_server_restarted_between_calls_costs_at_most_one_broken_call() -> None:
    async with serving() as port:
        connector = HttpConnector(spec_for(port))
        with anyio.fail_after(10):
            await connector.call_tool("echo", {"text": "first"})
    try:
        async with serving(port):
            outcomes: list[str] = []
            with anyio.fail_after(30):
                while outcomes[-1:] != ["ok"]:
                    try:
                        await connector.call_tool("echo", {"text": "again"})
                        outcomes.append("ok")
                    except ConnectorBroken:
                        outcomes.append("broken")
        assert outcomes.count("broken") <= 1
    finally:
        await connector.aclose()


def test_a_non_http_url_is_a_config_error() -> None:
    with pytest.raises(ConnectorConfigError):
        HttpConnector(HttpSpec(id="remote", url="file:///etc/passwd"))
