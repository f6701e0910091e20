"""The first agent: a stock MCP SDK client that finds the broker and gets a task token by itself.

It uses only the SDK's `ClientCredentialsOAuthProvider`: the first request to /mcp answers 401,
the provider follows the protected-resource metadata to the broker's authorization-server
metadata, obtains a capability token with client credentials for the scopes this task needs, and
retries. Then it lists the tools its token reaches and calls one.

The SDK's provider sends no ``scope`` when the broker advertises none (it replaces its configured
scope with the advertised list), so the token carries the agent's registered scopes that need no
human approval. An agent that wants a narrower task token asks for it explicitly: see
``task_agent.py``.

    BROKER_URL=http://127.0.0.1:8765 BROKER_CLIENT_ID=agt_... BROKER_CLIENT_SECRET=... \\
        python examples/agents/quickstart.py [--tool NAME --args JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken


class MemoryTokenStorage(TokenStorage):
    """Tokens live only in this process: a task token is short-lived and never written to disk."""

    def __init__(self) -> None:
        self._tokens: OAuthToken | None = None
        self._client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self._tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self._tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self._client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self._client = client_info


async def run(
    base_url: str,
    client_id: str,
    secret: str,
    tool: str | None,
    arguments: dict[str, object],
) -> int:
    auth = ClientCredentialsOAuthProvider(
        server_url=f"{base_url}/mcp",
        storage=MemoryTokenStorage(),
        client_id=client_id,
        client_secret=secret,
        issuer=base_url,
    )
    async with (
        httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30.0, read=120.0)) as http,
        Client(streamable_http_client(f"{base_url}/mcp", http_client=http)) as client,
    ):
        tools = (await client.list_tools()).tools
        print(f"{len(tools)} tools reachable:")
        for t in tools:
            print(f"  {t.name}: {(t.description or '').splitlines()[0] if t.description else ''}")
        if tool is None:
            tool = tools[0].name if tools else None
        if tool is None:
            print("no tool to call")
            return 1
        result = await client.call_tool(tool, arguments)
        text = " ".join(c.text for c in result.content if c.type == "text")
        print(f"{tool} -> {'error: ' if result.is_error else ''}{text}")
        return 1 if result.is_error else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tool", default=None)
    parser.add_argument("--args", default="{}", help="tool arguments as a JSON object")
    ns = parser.parse_args()
    try:
        base = os.environ.get("BROKER_URL", "http://127.0.0.1:8765").rstrip("/")
        client_id = os.environ["BROKER_CLIENT_ID"]
        secret = os.environ["BROKER_CLIENT_SECRET"]
    except KeyError as missing:
        print(f"set {missing.args[0]} (see `broker agents add --help`)", file=sys.stderr)
        return 2
    return anyio.run(run, base, client_id, secret, ns.tool, json.loads(ns.args))


if __name__ == "__main__":
    sys.exit(main())
