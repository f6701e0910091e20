"""The direct tool-call lane, through a served broker: same answers as the SDK path, fewer costs.

Every test drives a real broker (`create_app`, uvicorn on loopback) with real HTTP requests:
the `mcp.Client` where the SDK's behaviour is the point, raw JSON-RPC where the headers are.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.config import ConnectorConfig
from broker.core.decision import Reason
from broker.mediation import DECISION_META
from broker.testing import DEMO, DEMO_SCOPES, ServedBroker, served_broker
from connectors import ToolSet

lane_tools = ToolSet()
cancelled: list[str] = []
waiting = anyio.Event()
gone = anyio.Event()


@lane_tools.tool
async def wait(label: str) -> str:
    """Wait until cancelled (records the cancellation)."""
    waiting.set()
    try:
        await anyio.sleep(60)
    except anyio.get_cancelled_exc_class():
        cancelled.append(label)
        gone.set()
        raise
    return label


@lane_tools.tool
async def shout(text: str) -> str:
    """Upper-case ``text``."""
    return text.upper()


LANE = ConnectorConfig(id="lane", kind="native", target="tests.test_tool_call_lane:lane_tools")
SCOPES = (
    DEMO_SCOPES
    + """
[[scope]]
name = "lane:use"
[[scope.grant]]
connector = "lane"
tools = ["*"]
"""
)
VERSION = "2025-11-25"


@asynccontextmanager
async def _broker(tmp_path: Path) -> AsyncIterator[tuple[ServedBroker, str]]:
    async with served_broker(tmp_path, connectors=(DEMO, LANE), scopes_toml=SCOPES) as broker:
        agent, _ = await broker.add_agent("lane-agent", ["demo:use", "lane:use"])
        yield broker, await broker.mint(agent, "demo:use lane:use")


def _served(broker: ServedBroker) -> int:
    return broker.services.front.http_app().served


@asynccontextmanager
async def _client(broker: ServedBroker, token: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(broker.mcp_url, http_client=http), mode="legacy") as client,
    ):
        yield client


class RawSession:
    """A 2025-era session driven with hand-made JSON-RPC, to control every header."""

    def __init__(self, http: httpx2.AsyncClient, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.session_id = ""

    def headers(self, **over: str) -> dict[str, str]:
        base = {
            "Authorization": f"Bearer {self.token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "mcp-session-id": self.session_id,
            "mcp-protocol-version": VERSION,
        }
        if not self.session_id:
            del base["mcp-session-id"]
        return {**base, **over}

    async def open(self) -> None:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": VERSION,
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        }
        response = await self.http.post(self.url, json=init, headers=self.headers())
        assert response.status_code == 200, response.text
        self.session_id = response.headers["mcp-session-id"]
        done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await self.post(json.dumps(done))).status_code == 202
        # The front learns a session from its first request after initialize (SDK path).
        await self.post(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))

    async def post(self, body: str, **headers: str) -> httpx2.Response:
        return await self.http.post(self.url, content=body, headers=self.headers(**headers))

    async def call(self, name: str, arguments: dict[str, Any], id_: int = 7, **headers: str) -> Any:
        body = {
            "jsonrpc": "2.0",
            "id": id_,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
        return await self.post(json.dumps(body), **headers)


@asynccontextmanager
async def _raw(broker: ServedBroker, token: str) -> AsyncIterator[RawSession]:
    async with httpx2.AsyncClient(timeout=30) as http:
        session = RawSession(http, broker.mcp_url, token)
        await session.open()
        yield session


def _sse_result(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of a response, whether sent as JSON or as an SSE event."""
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            return json.loads(line.removeprefix("data: "))
    raise AssertionError(f"no JSON-RPC message in {response.text!r}")


async def test_calls_after_the_first_take_the_lane_with_the_same_answers(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token), _client(broker, token) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"demo__echo", "lane__shout"} <= names
        before = _served(broker)
        results = [await client.call_tool("lane__shout", {"text": f"hi {i}"}) for i in range(3)]
        assert [r.content for r in results] == [
            [types.TextContent(type="text", text=f"HI {i}")] for i in range(3)
        ]
        assert all(not r.is_error and r.meta and r.meta.get(DECISION_META) for r in results)
        assert _served(broker) - before == 3
        # Every call the lane answered is recorded like any other.
        ids = [r.meta[DECISION_META] for r in results if r.meta]
        for decision_id in ids:
            event = await broker.services.store.find_event_by_decision(decision_id)
            assert event.kind == "decision"
            assert event.payload["tool"] == "lane__shout"
            assert event.payload["allowed"] is True


async def test_a_denied_call_on_the_lane_names_reasons_and_decision_only(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, _):
        agent, _ = await broker.add_agent("narrow", ["demo:use"])
        narrow = await broker.mint(agent, "demo:use")
        async with _client(broker, narrow) as client:
            await client.list_tools()
            before = _served(broker)
            forbidden = await client.call_tool("lane__shout", {"text": "x"})
            unknown = await client.call_tool("nope__nothing", {})
        assert _served(broker) - before == 2
        for result in (forbidden, unknown):
            assert result.is_error
            [content] = result.content
            assert isinstance(content, types.TextContent)
            assert content.text.startswith(f"denied ({Reason.SCOPE_MISSING}); decision dec_")


async def test_a_token_of_another_principal_never_uses_the_session(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token), _raw(broker, token) as raw:
        other, _ = await broker.add_agent("other", ["demo:use", "lane:use"])
        stolen = await broker.mint(other, "demo:use lane:use")
        before = _served(broker)
        response = await raw.call("lane__shout", {"text": "x"}, Authorization=f"Bearer {stolen}")
        assert response.status_code == 404  # the SDK's own answer: "Session not found"
        assert _served(broker) == before


async def test_a_revoked_token_gets_the_sdk_401(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token), _raw(broker, token) as raw:
        ok = await raw.call("lane__shout", {"text": "x"})
        assert ok.status_code == 200
        assert ok.json()["result"]["content"][0]["text"] == "X"
        claims = broker.services.verifier.verify_claims(token)
        await broker.services.tokens.revoke_token(claims.jti, reason="test", actor="test")
        refused = await raw.call("lane__shout", {"text": "x"}, id_=8)
        assert refused.status_code == 401
        assert "resource_metadata" in refused.headers["www-authenticate"]


async def test_a_body_with_a_duplicate_key_is_refused_by_name(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token), _raw(broker, token) as raw:
        body = (
            '{"jsonrpc":"2.0","id":3,"method":"tools/call",'
            '"params":{"name":"lane__shout","arguments":{"text":"a","text":"b"}}}'
        )
        response = await raw.post(body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == -32700
        assert "duplicate key 'text'" in error["message"]
        nested = await raw.post("[" * 100_000 + "]" * 100_000)
        assert nested.status_code == 400
        assert nested.json()["error"]["code"] == -32700  # the SDK's parse error, not a crash
        nan = await raw.post(
            '{"jsonrpc":"2.0","id":4,"method":"tools/call",'
            '"params":{"name":"demo__add","arguments":{"a":NaN,"b":1}}}'
        )
        assert nan.status_code == 400
        assert "NaN is not JSON" in nan.json()["error"]["message"]


async def test_what_the_lane_cannot_serve_goes_to_the_sdk(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token), _raw(broker, token) as raw:
        before = _served(broker)
        progress = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {
                "name": "lane__shout",
                "arguments": {"text": "p"},
                "_meta": {"progressToken": 1},
            },
        }
        sdk = await raw.post(json.dumps(progress))
        assert sdk.status_code == 200
        assert sdk.headers["content-type"].startswith("text/event-stream")
        assert _sse_result(sdk)["result"]["content"][0]["text"] == "P"
        foreign_host = await raw.call("lane__shout", {"text": "x"}, Host="evil.example")
        assert foreign_host.status_code == 421
        # Another era's header on a 2025 session: the SDK decides what that means, not the lane.
        await raw.post(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 11,
                    "method": "tools/call",
                    "params": {"name": "lane__shout", "arguments": {"text": "x"}},
                }
            ),
            **{"mcp-protocol-version": "2026-07-28"},
        )
        assert _served(broker) == before


async def test_cancelling_a_lane_call_cancels_it_downstream(tmp_path: Path) -> None:
    global waiting
    cancelled.clear()
    waiting = anyio.Event()
    async with _broker(tmp_path) as (broker, token), _raw(broker, token) as raw:
        answer: list[httpx2.Response] = []

        async def call() -> None:
            answer.append(await raw.call("lane__wait", {"label": "first"}, id_=21))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(10):
                await waiting.wait()
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": 21, "reason": "user gave up"},
            }
            assert broker.services.front.http_app().in_flight() == 1
            accepted = await raw.post(json.dumps(note))
            assert accepted.status_code == 202
        [response] = answer
        assert response.json()["error"] == {"code": -32800, "message": "Request cancelled"}
        assert cancelled == ["first"]


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
async def test_a_client_that_does_not_accept_both_gets_the_sdk_406(
    tmp_path: Path, accept: str
) -> None:
    async with _broker(tmp_path) as (broker, token), _raw(broker, token) as raw:
        response = await raw.call("lane__shout", {"text": "x"}, Accept=accept)
        assert response.status_code == 406


# -- the 2026-07-28 era: stateless requests ------------------------------------------------------

MODERN = "2026-07-28"


def _modern_call(name: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
    envelope = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw-2026", "version": "1"},
        **(meta or {}),
    }
    params = {"name": name, "arguments": arguments, "_meta": envelope}
    return json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params})


def _modern_headers(token: str, name: str, **over: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": name,
        **over,
    }


async def test_2026_calls_take_the_lane_and_carry_the_servers_stamp(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token):
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(streamable_http_client(broker.mcp_url, http_client=http), mode=MODERN) as sdk,
        ):
            before = _served(broker)
            result = await sdk.call_tool("lane__shout", {"text": "modern"})
            assert _served(broker) - before == 1
        assert result.content == [types.TextContent(type="text", text="MODERN")]
        assert result.meta is not None
        assert result.meta[DECISION_META].startswith("dec_")
        async with httpx2.AsyncClient(timeout=30) as http:
            raw = await http.post(
                broker.mcp_url,
                content=_modern_call("lane__shout", {"text": "x"}),
                headers=_modern_headers(token, "lane__shout"),
            )
        assert raw.status_code == 200
        assert "mcp-session-id" not in raw.headers
        stamp = raw.json()["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]
        assert stamp["name"] == "mcp-authz-broker"


async def test_2026_requests_the_lane_does_not_own_get_the_sdks_answers(tmp_path: Path) -> None:
    async with _broker(tmp_path) as (broker, token), httpx2.AsyncClient(timeout=30) as http:
        before = _served(broker)
        mismatch = await http.post(
            broker.mcp_url,
            content=_modern_call("lane__shout", {"text": "x"}),
            headers=_modern_headers(token, "demo__echo"),
        )
        assert mismatch.status_code == 400
        assert mismatch.json()["error"]["code"] == -32020  # the SDK's HEADER_MISMATCH
        logging_on = await http.post(
            broker.mcp_url,
            content=_modern_call(
                "lane__shout", {"text": "x"}, {"io.modelcontextprotocol/logLevel": "info"}
            ),
            headers=_modern_headers(token, "lane__shout"),
        )
        assert _sse_result(logging_on)["result"]["content"][0]["text"] == "X"
        assert _served(broker) == before


async def test_a_2026_agent_that_goes_away_cancels_its_call_downstream(tmp_path: Path) -> None:
    global waiting, gone
    cancelled.clear()
    waiting, gone = anyio.Event(), anyio.Event()
    async with _broker(tmp_path) as (broker, token):

        async def call() -> None:
            async with httpx2.AsyncClient(timeout=30) as http:
                await http.post(
                    broker.mcp_url,
                    content=_modern_call("lane__wait", {"label": "modern"}),
                    headers=_modern_headers(token, "lane__wait"),
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(10):
                await waiting.wait()
            assert broker.services.front.http_app().in_flight() == 1
            tg.cancel_scope.cancel()  # the agent closes its connection
        with anyio.fail_after(10):
            await gone.wait()
        assert cancelled == ["modern"]
