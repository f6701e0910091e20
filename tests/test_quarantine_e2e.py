"""Quarantine end to end, through a served broker: a detector quarantines an agent and it holds.

Also home of `detector_broker`: `tests.test_examples.served_broker` with ``[detectors]`` and
``[alerts]`` settings and native test connectors; the scenario and alert tests import it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.config import (
    AlertsConfig,
    BrokerConfig,
    ConnectorConfig,
    ServerConfig,
    StoreConfig,
    TokenConfig,
)
from broker.core.detectors import DetectorsConfig
from broker.core.identity import AgentStatus
from broker.core.recording import EventKind
from broker.store.testing import sqlite_url
from broker.testing import serve_app
from connectors import ToolSet
from tests.test_examples import REPO, ServedBroker, _LateApp  # pyright: ignore[reportPrivateUsage]

slow_tools = ToolSet()
cancelled: list[str] = []
started = anyio.Event()


@slow_tools.tool
async def slow(label: str) -> str:
    """Wait a long time (records its cancellation)."""
    global started
    started.set()
    try:
        await anyio.sleep(60)
    except anyio.get_cancelled_exc_class():
        cancelled.append(label)
        raise
    return label


@slow_tools.tool
async def quick(text: str) -> str:
    """Answer at once."""
    return text


@slow_tools.tool
async def wipe(path: str) -> str:
    """A tool no test token is granted."""
    return path


SLOW = ConnectorConfig(id="slow", kind="native", target="tests.test_quarantine_e2e:slow_tools")
SLOW_SCOPES = """\
[[scope]]
name = "slow:use"
[[scope.grant]]
connector = "slow"
tools = ["slow", "quick"]
"""


@asynccontextmanager
async def detector_broker(
    tmp_path: Path,
    *,
    connectors: Sequence[ConnectorConfig] = (SLOW,),
    scopes_toml: str = SLOW_SCOPES,
    detectors: Mapping[str, Any] | None = None,
    alerts: AlertsConfig | None = None,
    clock: Any = None,
) -> AsyncIterator[ServedBroker]:
    """A broker from `create_app` with the given detector and alert settings, served on loopback."""
    scope_file = tmp_path / "scopes.toml"
    scope_file.write_text(scopes_toml, encoding="utf-8")
    late = _LateApp()
    async with serve_app(late) as url:
        config = BrokerConfig(
            server=ServerConfig(public_url=url),
            store=StoreConfig(url=sqlite_url(tmp_path)),
            tokens=TokenConfig(keys_dir=tmp_path / "keys"),
            scope_files=(scope_file,),
            connectors=tuple(connectors),
            detectors=DetectorsConfig.model_validate(dict(detectors or {})),
            alerts=alerts or AlertsConfig(),
            base_dir=tmp_path,
        )
        from broker.app import create_app

        app = create_app(config, clock=clock, environ={"PATH": os.environ.get("PATH", "")})
        async with app.router.lifespan_context(app):
            broker = ServedBroker(url, app, app.state.services)
            await broker.approve_all()
            late.app = app
            yield broker


@asynccontextmanager
async def mcp_session(
    broker: ServedBroker, token: str, *, mode: str = "legacy", name: str = "test-agent"
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0)) as http,
        Client(
            streamable_http_client(broker.mcp_url, http_client=http),
            mode=mode,  # pyright: ignore[reportArgumentType]
            client_info=types.Implementation(name=name, version="1.0"),
        ) as client,
    ):
        yield client


def text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def token_request(broker: ServedBroker, auth: tuple[str, str], form: dict[str, str]) -> Any:
    async with httpx2.AsyncClient(timeout=30.0) as http:
        return await http.post(f"{broker.url}/oauth/token", data=form, auth=auth)


async def test_a_quarantined_agent_is_cut_off_everywhere_until_an_admin_releases_it(
    tmp_path: Path,
) -> None:
    global started
    started = anyio.Event()
    cancelled.clear()
    burst = {"denials": {"burst": 3, "window_seconds": 60}}
    async with detector_broker(tmp_path, detectors=burst) as broker:
        parent, parent_secret = await broker.add_agent("parent", ["slow:use"])
        child, _ = await broker.add_agent("child", ["slow:use"])
        token = await broker.mint(parent, "slow:use")
        exchanged = await token_request(
            broker,
            (parent.id, parent_secret),
            {
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "actor": child.id,
                "scope": "slow:use",
            },
        )
        assert exchanged.status_code == 200, exchanged.text
        child_token = exchanged.json()["access_token"]

        outcome: dict[str, str] = {}
        async with mcp_session(broker, token) as victim_session:

            async def long_call() -> None:
                try:
                    result = await victim_session.call_tool("slow__slow", {"label": "long"})
                except Exception:
                    # The session was closed before the answer could travel back on it.
                    outcome["slow"] = "session-closed"
                else:
                    outcome["slow"] = text(result)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(long_call)
                    await started.wait()
                    answers = await probe(broker, token, 3)
                    assert "scope-missing" in answers[0], answers
                    # The third denial makes the burst: that very answer says what followed
                    # (the session may also close before the exit of the probing client).
                    assert "agent-quarantined" in answers[2], answers
            # The long call was cancelled downstream; it never produced its answer.
            assert cancelled == ["long"]
            assert outcome["slow"] == "session-closed" or "agent-quarantined" in outcome["slow"]
            # Its open session was closed: the next request on it fails.
            with anyio.fail_after(10):
                try:
                    after = await victim_session.call_tool("slow__quick", {"text": "x"})
                except Exception:
                    closed = True
                else:
                    closed = after.is_error
            assert closed

        agent = await broker.services.store.get_agent(parent.id)
        assert agent.status is AgentStatus.QUARANTINED
        assert await mcp_status(broker, child_token) == 401
        assert await mcp_status(broker, token) == 401
        denied = await token_request(
            broker, (parent.id, parent_secret), {"grant_type": "client_credentials"}
        )
        assert denied.status_code in (400, 403)
        assert denied.json()["error"] == "access_denied"

        sessions = await broker.services.store.list_sessions(agent_id=parent.id)
        kinds = {e.kind for s in sessions for e in await broker.services.store.session_events(s.id)}
        assert EventKind.DETECTOR_SIGNAL in kinds

        release = await _cli(
            tmp_path, broker, ["agents", "release", parent.id, "--reason", "reviewed: test"]
        )
        assert release.returncode == 0, release.stderr.decode()
        await broker.services.revocations.refresh()
        granted = await token_request(
            broker,
            (parent.id, parent_secret),
            {"grant_type": "client_credentials", "scope": "slow:use"},
        )
        assert granted.status_code == 200, granted.text
        with anyio.fail_after(10):
            async with mcp_session(broker, granted.json()["access_token"]) as again:
                ok = await again.call_tool("slow__quick", {"text": "back"})
        assert not ok.is_error
        assert text(ok) == "back"


async def mcp_status(broker: ServedBroker, token: str) -> int:
    """The HTTP status of an ``initialize`` sent with ``token``."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test-agent", "version": "1.0"},
        },
    }
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
    }
    async with httpx2.AsyncClient(timeout=10.0) as http:
        response = await http.post(broker.mcp_url, json=body, headers=headers)
    return response.status_code


async def probe(broker: ServedBroker, token: str, calls: int) -> list[str]:
    """Call a tool the token does not reach; stops when the broker closes the session."""
    answers: list[str] = []
    try:
        async with mcp_session(broker, token) as prober:
            for n in range(calls):
                refused = await prober.call_tool("slow__wipe", {"path": f"/etc/{n}"})
                assert refused.is_error
                answers.append(text(refused))
    except Exception as exc:
        answers.append(f"session-closed {exc!r}")
    return answers


async def _cli(tmp_path: Path, broker: ServedBroker, args: list[str]) -> Any:
    config = tmp_path / "broker-cli.toml"
    config.write_text(
        f'[store]\nurl = "{sqlite_url(tmp_path)}"\n[tokens]\nkeys_dir = "{tmp_path / "keys"}"\n'
        f'[server]\npublic_url = "{broker.url}"\n',
        encoding="utf-8",
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "broker", *args, "--config", str(config)],
            env=env,
            cwd=REPO,
            check=False,
        )
