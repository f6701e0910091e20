"""HttpConnector against the test-owned server in streamable HTTP mode."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from connectors import (
    ChangeKind,
    ConnectorBroken,
    ConnectorConfigError,
    HttpConnector,
    HttpSpec,
)
from connectors.testing import check_connector

SERVER = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "servers" / "misbehaving.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int) -> subprocess.Popen[bytes]:
    """Start the fixture server on ``port`` and poll until it accepts (bounded)."""
    child = subprocess.Popen(
        [sys.executable, str(SERVER), "--http", str(port)],
        env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return child
        except OSError:
            if time.monotonic() > deadline or child.poll() is not None:
                stop_server(child)
                raise
            time.sleep(0.05)


def stop_server(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait(timeout=10)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    port = free_port()
    child = start_server(port)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_server(child)


async def test_http_connector_passes_the_conformance_suite(server_url: str) -> None:
    await check_connector(lambda: HttpConnector(HttpSpec(id="remote", url=server_url)))


async def test_requests_carry_the_brokers_own_headers(server_url: str) -> None:
    spec = HttpSpec(id="remote", url=server_url, headers={"Authorization": "Bearer broker-own"})
    async with HttpConnector(spec) as connector:
        with anyio.fail_after(10):
            result = await connector.call_tool("headers", {})
    assert result.structured_content is not None
    assert result.structured_content["headers"]["authorization"] == "Bearer broker-own"


async def test_tools_list_changed_over_http_reaches_listeners(server_url: str) -> None:
    told = anyio.Event()

    async def listener(kind: ChangeKind) -> None:
        if kind is ChangeKind.TOOLS:
            told.set()

    async with HttpConnector(HttpSpec(id="remote", url=server_url)) as connector:
        connector.add_change_listener(listener)
        with anyio.fail_after(10):
            await connector.call_tool("change", {"kind": "tools"})
            await told.wait()


async def test_a_server_that_goes_away_fails_calls_then_the_connector_reconnects() -> None:
    port = free_port()
    child = start_server(port)
    restarted = anyio.Event()

    async def listener(kind: ChangeKind) -> None:
        if kind is ChangeKind.RESTARTED:
            restarted.set()

    connector = HttpConnector(HttpSpec(id="remote", url=f"http://127.0.0.1:{port}/mcp"))
    try:
        async with connector:
            connector.add_change_listener(listener)
            stop_server(child)
            with anyio.fail_after(10), pytest.raises(ConnectorBroken):
                await connector.call_tool("echo", {"text": "nobody home"})
            child = await anyio.to_thread.run_sync(start_server, port)
            with anyio.fail_after(30):
                await restarted.wait()
                result = await connector.call_tool("echo", {"text": "back"})
            assert not result.is_error
    finally:
        stop_server(child)


async def test_a_server_restarted_between_calls_costs_one_broken_call_then_works() -> None:
    port = free_port()
    child = start_server(port)
    connector = HttpConnector(HttpSpec(id="remote", url=f"http://127.0.0.1:{port}/mcp"))
    try:
        async with connector:
            with anyio.fail_after(10):
                await connector.call_tool("echo", {"text": "first"})
            stop_server(child)
            child = await anyio.to_thread.run_sync(start_server, port)
            outcomes: list[str] = []
            with anyio.fail_after(30):
                while not outcomes or outcomes[-1] != "ok":
                    try:
                        await connector.call_tool("echo", {"text": "again"})
                        outcomes.append("ok")
                    except ConnectorBroken:
                        outcomes.append("broken")
            assert outcomes[-1] == "ok"
            assert outcomes.count("broken") <= 1
    finally:
        stop_server(child)


def test_a_non_http_url_is_a_config_error() -> None:
    with pytest.raises(ConnectorConfigError):
        HttpConnector(HttpSpec(id="remote", url="file:///etc/passwd"))
