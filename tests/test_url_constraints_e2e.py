"""URL constraints end to end: a native fetch-style tool behind a ``url`` constraint.

The tool only records the URL it was given, so each refused trick is proven never to have
reached it, and each allowed URL to have arrived in canonical form.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
from connectors import NativeConnector, ToolSet
from scopes.definitions import parse_scope_toml

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ERAS = ["legacy", "2026-07-28"]

SCOPES = parse_scope_toml(
    """
[[scope]]
name = "web:docs"
[[scope.grant]]
connector = "web"
tools = ["fetch"]
[scope.grant.args.url.url]
hosts = ["docs.example.com", "*.example.org", "xn--bcher-kva.example"]

[[scope]]
name = "web:public"
[[scope.grant]]
connector = "web"
tools = ["fetch"]
args = { url = { url = { hosts = ["*"], schemes = ["http", "https"], allow_ip_literals = true } } }
""",
    source="test",
)

# Refused under "web:docs": (label, url).
DOCS_TRICKS = [
    ("userinfo before the allowed host", "https://user:pw@docs.example.com/"),
    ("allowed host as userinfo", "https://docs.example.com@evil.com/"),
    ("backslash-at", "https://evil.com\\@docs.example.com/"),
    ("backslash-at to loopback", "http://127.0.0.1\\@docs.example.com/"),
    ("backslash as separator", "https://docs.example.com\\..\\evil"),
    ("leading whitespace", " https://docs.example.com/"),
    ("trailing newline", "https://docs.example.com/\n"),
    ("tab in the host", "https://docs.exa\tmple.com/"),
    ("space in the host", "https://docs.exa mple.com/"),
    ("allowed host as a subdomain of another", "https://docs.example.com.evil.com/"),
    ("suffix without a dot", "https://evildocs.example.com/"),
    ("wildcard does not cover the apex", "https://example.org/"),
    ("another scheme", "http://docs.example.com/"),
    ("file scheme", "file:///etc/passwd"),
    ("javascript scheme", "javascript:alert(1)"),
    ("an explicit non-default port", "https://docs.example.com:8443/"),
    ("a homoglyph host", "https://docs.ex\u0430mple.com/"),
    ("fullwidth letters", "https://\uff44\uff4f\uff43\uff53.example.com/"),
    ("a Unicode IDNA host", "https://b\u00fccher.example/"),
    ("a different punycode host", "https://xn--dcs-tma.example.com/"),
    ("two trailing dots", "https://docs.example.com../"),
    ("an IP literal", "https://93.184.216.34/"),
    ("loopback", "https://127.0.0.1/"),
    ("not a string", ["https://docs.example.com/"]),
    ("no scheme", "docs.example.com/path"),
    ("scheme-relative", "//docs.example.com/"),
]

# Refused even under "web:public" (any host, IP literals allowed, private ranges not).
PRIVATE_TRICKS = [
    ("loopback dotted", "http://127.0.0.1/"),
    ("loopback hex", "http://0x7f000001/"),
    ("loopback decimal", "http://2130706433/"),
    ("loopback short", "http://127.1/"),
    ("loopback octal", "http://0177.0.0.1/"),
    ("loopback IPv4-mapped", "http://[::ffff:127.0.0.1]/"),
    ("loopback IPv4-mapped hex", "http://[::ffff:7f00:1]/"),
    ("loopback IPv6", "http://[::1]/"),
    ("unspecified", "http://0.0.0.0/"),
    ("private 10/8", "http://10.0.0.1/"),
    ("private 192.168/16", "http://192.168.1.1/"),
    ("private 172.16/12", "http://172.16.5.4/"),
    ("unique local IPv6", "http://[fd00::1]/"),
    ("link-local", "http://169.254.1.1/"),
    ("link-local IPv6", "http://[fe80::1]/"),
    ("cloud metadata", "http://169.254.169.254/latest/meta-data/"),
    ("cloud metadata hex", "http://0xa9fea9fe/"),
    ("carrier-grade NAT", "http://100.64.0.1/"),
    ("localhost name", "http://localhost/"),
    ("a name under localhost", "http://api.localhost/"),
]


@dataclass
class Setup:
    front: McpFront
    received: list[str]
    caller: list[Principal]


def agent(scope: str) -> Principal:
    return Principal(
        agent_id="agent-1", client_id="agent-1", scopes=frozenset({scope}), token_id="t" * 22
    )


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    received: list[str] = []
    tools = ToolSet()

    @tools.tool
    async def fetch(url: str) -> str:
        """Fetch a URL (here: only remember it)."""
        received.append(url)
        return f"fetched {url}"

    caller = [agent("web:docs")]

    def lookup(_ctx: ServerRequestContext[Any, Any]) -> Principal:
        return caller[0]

    async with migrated_store(sqlite_url(tmp_path)) as store:
        registry = Registry(store, pin_poll_interval=60)
        registry.add(NativeConnector.from_toolset("web", tools), prefix="")
        async with registry:
            for pin in await store.list_pins():
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "t", NOW)
            await registry.reload_pins()
            yield Setup(McpFront(registry, SCOPES, principal_lookup=lookup), received, caller)


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def refused_labels(setup: Setup, mode: str, cases: list[tuple[str, Any]]) -> list[str]:
    """The labels of the cases that were NOT refused with constraint-violated."""
    passed: list[str] = []
    async with Client(setup.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(30):
            for label, url in cases:
                result = await client.call_tool("fetch", {"url": url})
                if not text_of(result).startswith("denied (constraint-violated); decision dec_"):
                    passed.append(label)
    return passed


@pytest.mark.parametrize("mode", ERAS)
async def test_every_url_trick_is_refused_and_never_reaches_the_tool(
    setup: Setup, mode: str
) -> None:
    assert await refused_labels(setup, mode, DOCS_TRICKS) == []
    assert setup.received == []


@pytest.mark.parametrize("mode", ERAS)
async def test_private_loopback_link_local_and_metadata_addresses_are_refused_in_every_encoding(
    setup: Setup, mode: str
) -> None:
    setup.caller[0] = agent("web:public")
    assert await refused_labels(setup, mode, PRIVATE_TRICKS) == []
    assert setup.received == []


@pytest.mark.parametrize("mode", ERAS)
async def test_allowed_urls_reach_the_tool_in_canonical_form(setup: Setup, mode: str) -> None:
    allowed = [
        ("https://DOCS.Example.COM./a/../b?q=1#frag", "https://docs.example.com/b?q=1#frag"),
        ("HTTPS://docs.example.com:443", "https://docs.example.com/"),
        ("https://api.example.org/v1/./items", "https://api.example.org/v1/items"),
        ("https://xn--bcher-kva.example/", "https://xn--bcher-kva.example/"),
    ]
    async with Client(setup.front.server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(30):
            for url, _ in allowed:
                result = await client.call_tool("fetch", {"url": url})
                assert not result.is_error, (url, text_of(result))
    assert setup.received == [canonical for _, canonical in allowed]


async def test_a_public_address_passes_where_ip_literals_are_allowed(setup: Setup) -> None:
    setup.caller[0] = agent("web:public")
    async with Client(setup.front.server, mode="legacy") as client:
        result = await client.call_tool("fetch", {"url": "http://93.184.216.34/index.html"})
    assert not result.is_error
    assert setup.received == ["http://93.184.216.34/index.html"]
