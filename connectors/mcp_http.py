"""HttpConnector: an MCP server over streamable HTTP. Imports mcp, anyio, httpx2; never `broker`.

Requests carry the broker's own headers (``spec.headers``, resolved by the broker) and nothing
from the agent. A session that fails (connection refused, server gone, session expired) is
dropped and reopened by the supervisor with the restart backoff of `connectors._mcp`; calls in
flight fail with `ConnectorBroken`, calls made while it reconnects wait within their deadline.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx2
from mcp import MCPError
from mcp.client.streamable_http import streamable_http_client

from connectors._mcp import Link, McpConnector
from connectors.base import HttpSpec
from connectors.errors import ConnectorConfigError

__all__ = ["HttpConnector"]

INVALID_REQUEST = -32600
_SESSION_GONE = frozenset({"Session terminated", "Session not found"})

RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)
"""HttpSpec has no backoff fields; this schedule is used, and restarts are never given up."""


class HttpConnector(McpConnector):
    """An MCP server reached over streamable HTTP, reconnected with backoff when it fails."""

    kind = "http"

    def __init__(self, spec: HttpSpec) -> None:
        """Raises:
        ConnectorConfigError: the URL is not http(s).
        """
        if not spec.url.startswith(("http://", "https://")):
            raise ConnectorConfigError(f"http connector '{spec.id}' needs an http(s) URL")
        super().__init__(spec)
        self.spec = spec

    def _describe(self) -> str:
        return f"http server '{self.id}'"

    @property
    def _connect_timeout(self) -> float:
        return self.spec.connect_timeout

    @property
    def _backoff(self) -> tuple[float, ...]:
        return RESTART_BACKOFF

    @property
    def _max_restarts(self) -> int:
        return 1_000_000_000

    async def _open(self, stack: AsyncExitStack) -> Link:
        http = await stack.enter_async_context(
            httpx2.AsyncClient(
                headers=dict(self.spec.headers),
                # Reads stay open for as long as the longest call may run; our scope ends it.
                timeout=httpx2.Timeout(self.spec.connect_timeout, read=self.spec.max_call_timeout),
                follow_redirects=False,
            )
        )
        client = self._client(streamable_http_client(self.spec.url, http_client=http))
        link = Link(client)
        await stack.enter_async_context(client)
        return link

    def _session_lost(self, error: MCPError) -> bool:
        # A 404 for our session id (the server restarted or expired it): the SDK client says
        # "Session terminated", an SDK server's body says "Session not found".
        return error.code == INVALID_REQUEST and error.error.message in _SESSION_GONE
