"""`broker stdio`: MCP on stdin/stdout, relayed to a broker's streamable HTTP ``/mcp``.

For MCP clients that can only launch a subprocess. The shim is a message relay, not a second
MCP server: every JSON-RPC message read from stdin is posted to the broker unchanged, and every
message the broker sends (responses, progress, list_changed, server requests) is written to
stdout unchanged. So whatever the broker serves (tools, resources, templates, prompts,
completion, subscriptions, progress both ways, cancellation) passes through without the shim
knowing the methods, and the client's protocol era is the era spoken upstream:

- 2025-era clients (``initialize``): the broker's session id and ``MCP-Protocol-Version`` (the
  negotiated version, read from the ``initialize`` result) ride on every later POST; the
  standalone GET stream carries list_changed; leaving ends the session (DELETE).
- 2026-era clients (``_meta`` on every request, ``server/discover``): each request gets the
  headers that era requires over HTTP (``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name``,
  and ``Mcp-Param-*`` for tools whose schema declares ``x-mcp-header``, learned from the
  ``tools/list`` results relayed back); ``notifications/cancelled`` aborts the request's POST.

Credentials come from the environment only (`ShimSettings.from_environ`). `TaskTokenAuth`
obtains a task token with client credentials before the relay starts, renews it before it
expires, and on a 401 renews once and retries. Tokens and secrets are never logged; stdout
carries only MCP.

One shim run is one task. When the client ends the relay (EOF on stdin), the shim closes its
task at the broker (``/oauth/revoke`` with ``close_task=true``), within `CLOSE_TIMEOUT`, so a
token of it that leaked is refused and its use recorded from then on. A failed close is logged
and the shim still exits cleanly: the tokens expire on their own. A relay that ends in an error
leaves the task open (the client may not be done).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx2
import mcp.types as types
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
    mcp_param_headers,
    x_mcp_header_map,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

__all__ = [
    "BrokerUnreachable",
    "CredentialsRefused",
    "EraHeaders",
    "ShimError",
    "ShimSettings",
    "TaskToken",
    "TaskTokenAuth",
    "TokenClient",
    "relay",
    "run_shim",
]

logger = logging.getLogger("broker.stdio")

_META_VERSION = "io.modelcontextprotocol/protocolVersion"
_RENEW_MARGIN = 60.0
"""Seconds before expiry a token is renewed (at most a quarter of its lifetime)."""
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
CLOSE_TIMEOUT = 1.5
"""Seconds the shim spends closing its task on exit (an MCP client waits 2 s for it to exit)."""


class ShimError(Exception):
    """Base of the shim's own errors; ``str()`` is one line fit for stderr (no secrets)."""


class ShimConfigError(ShimError):
    """The environment lacks a variable or holds an unusable value (the user's to fix)."""


class CredentialsRefused(ShimError):
    """The broker's token endpoint refused the client credentials or the requested scope."""


class BrokerUnreachable(ShimError):
    """No usable answer from the broker (connection refused, timeout, not a broker)."""


@dataclass(frozen=True, slots=True)
class ShimSettings:
    """What the shim needs, read from the environment (never from argv: argv is world-readable)."""

    broker_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    purpose: str | None = None

    @property
    def mcp_url(self) -> str:
        return f"{self.broker_url}/mcp"

    @property
    def token_url(self) -> str:
        return f"{self.broker_url}/oauth/token"

    @property
    def revoke_url(self) -> str:
        return f"{self.broker_url}/oauth/revoke"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ShimSettings:
        """Read ``BROKER_URL``, ``BROKER_CLIENT_ID``, ``BROKER_CLIENT_SECRET`` (or
        ``BROKER_CLIENT_SECRET_FILE``), ``BROKER_SCOPE`` and ``BROKER_TASK_PURPOSE``.

        Raises:
            ShimConfigError: a required variable is missing or a value is unusable.
        """
        url = environ.get("BROKER_URL", "").strip().rstrip("/")
        if not url:
            raise ShimConfigError(
                "set BROKER_URL to the broker's base URL, e.g. http://127.0.0.1:8765"
            )
        if not url.startswith(("http://", "https://")):
            raise ShimConfigError(f"BROKER_URL must be an http(s) URL, got {url!r}")
        client_id = environ.get("BROKER_CLIENT_ID", "").strip()
        if not client_id:
            raise ShimConfigError("set BROKER_CLIENT_ID to the agent's id (`broker agents add`)")
        secret = environ.get("BROKER_CLIENT_SECRET", "")
        secret_file = environ.get("BROKER_CLIENT_SECRET_FILE", "")
        if secret and secret_file:
            raise ShimConfigError("set BROKER_CLIENT_SECRET or BROKER_CLIENT_SECRET_FILE, not both")
        if secret_file:
            try:
                secret = Path(secret_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ShimConfigError(
                    f"BROKER_CLIENT_SECRET_FILE {secret_file}: {exc.strerror or 'unreadable'}"
                ) from None
        if not secret:
            raise ShimConfigError(
                "set BROKER_CLIENT_SECRET or BROKER_CLIENT_SECRET_FILE to the agent's secret"
            )
        scope = " ".join(environ.get("BROKER_SCOPE", "").replace(",", " ").split()) or None
        purpose = environ.get("BROKER_TASK_PURPOSE", "").strip() or None
        return cls(url, client_id, secret, scope, purpose)


# -- task tokens -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskToken:
    value: str = field(repr=False)
    renew_at: float
    """Clock reading after which the token is renewed before use."""


class TokenClient:
    """Client-credentials requests to the broker's token endpoint, one task id per shim run."""

    def __init__(
        self,
        settings: ShimSettings,
        http: httpx2.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.task_id = f"stdio-{secrets.token_hex(8)}"

    async def fetch(self) -> TaskToken:
        """A fresh task token.

        Raises:
            CredentialsRefused: the broker answered with an OAuth error.
            BrokerUnreachable: no answer, or one that is not a token response.
        """
        s = self.settings
        form = {"grant_type": "client_credentials", "task": self.task_id}
        if s.scope:
            form["scope"] = s.scope
        if s.purpose:
            form["purpose"] = s.purpose
        started = self.clock()
        try:
            response = await self.http.post(
                s.token_url, data=form, auth=httpx2.BasicAuth(s.client_id, s.client_secret)
            )
        except httpx2.HTTPError as exc:
            raise BrokerUnreachable(
                f"cannot reach the broker at {s.broker_url}: {type(exc).__name__}"
            ) from None
        body = _json_object(response)
        if response.status_code != 200:
            error = body.get("error")
            if isinstance(error, str):
                detail = body.get("error_description")
                described = f": {detail}" if isinstance(detail, str) and detail else ""
                raise CredentialsRefused(
                    f"the broker refused a token for {s.client_id} ({error}{described})"
                )
            raise BrokerUnreachable(
                f"{s.token_url} answered HTTP {response.status_code}; is BROKER_URL a broker?"
            )
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires_in, int | float):
            raise BrokerUnreachable(f"{s.token_url} did not answer with a token")
        margin = min(_RENEW_MARGIN, expires_in / 4)
        logger.info("task token obtained", extra={"task_id": self.task_id, "ttl": expires_in})
        return TaskToken(token, renew_at=started + expires_in - margin)

    async def close_task(self, token: str) -> bool:
        """Close this run's task with ``token`` (one of its tokens); True when the broker did.

        Never raises: the outcome is logged (without the token).
        """
        s = self.settings
        form = {"token": token, "close_task": "true"}
        try:
            response = await self.http.post(
                s.revoke_url, data=form, auth=httpx2.BasicAuth(s.client_id, s.client_secret)
            )
        except httpx2.HTTPError as exc:
            logger.warning("closing the task failed: %s", type(exc).__name__)
            return False
        if response.status_code != 200:
            error = _json_object(response).get("error", f"HTTP {response.status_code}")
            logger.warning("closing the task failed: %s", error)
            return False
        logger.info("task closed", extra={"task_id": self.task_id})
        return True


def _json_object(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}  # pyright: ignore[reportUnknownVariableType]


class TaskTokenAuth(httpx2.Auth):
    """Sets the current task token on each request; renews it when due, and once on a 401.

    A failed renewal is logged and the request goes out with the token held, so the broker
    answers 401 and the client sees an error for that one message, not a dead relay.
    """

    requires_request_body = True

    def __init__(self, tokens: TokenClient) -> None:
        self.tokens = tokens
        self._token: TaskToken | None = None
        self._lock = anyio.Lock()
        self.renewals = 0

    async def start(self) -> None:
        """Obtain the first token (errors propagate: the shim cannot start without one)."""
        self._token = await self.tokens.fetch()

    async def close_task(self) -> bool:
        """Close the task with the token held (see `TokenClient.close_task`)."""
        if self._token is None:
            return False
        return await self.tokens.close_task(self._token.value)

    async def _current(self, *, stale: TaskToken | None = None) -> TaskToken | None:
        async with self._lock:
            token = self._token
            due = token is None or token is stale or self.tokens.clock() >= token.renew_at
            if due:
                try:
                    token = self._token = await self.tokens.fetch()
                    self.renewals += 1
                except ShimError as exc:
                    logger.warning("task token renewal failed: %s", exc)
            return token

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response]:
        raise RuntimeError("TaskTokenAuth renews tokens asynchronously: use httpx2.AsyncClient")

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        token = await self._current()
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code != 401 or token is None:
            return
        renewed = await self._current(stale=token)
        if renewed is None or renewed is token:
            return
        request.headers["Authorization"] = f"Bearer {renewed.value}"
        yield request


# -- the relay ---------------------------------------------------------------------------------


class EraHeaders:
    """The per-message HTTP headers the broker's era routing needs, learned from the traffic.

    Pure bookkeeping over the messages passing through, in both directions.
    """

    def __init__(self) -> None:
        self.handshake_version: str | None = None
        self._pending: dict[types.RequestId, str] = {}
        self._param_headers: dict[str, dict[tuple[str, ...], str]] = {}

    def outbound(self, message: types.JSONRPCMessage) -> dict[str, str] | None:
        """Headers for a client message about to be posted (None: the transport's defaults)."""
        if isinstance(message, types.JSONRPCRequest):
            self._pending[message.id] = message.method
            params: dict[str, Any] = message.params or {}
            meta = params.get("_meta")
            version = meta.get(_META_VERSION) if isinstance(meta, dict) else None
            if version in MODERN_PROTOCOL_VERSIONS:
                return self._modern(str(version), message.method, params)
            if message.method == "initialize":
                self.handshake_version = None
                return None
        if self.handshake_version is not None:
            return {MCP_PROTOCOL_VERSION_HEADER: self.handshake_version}
        return None

    def _modern(self, version: str, method: str, params: dict[str, Any]) -> dict[str, str]:
        headers = {MCP_PROTOCOL_VERSION_HEADER: version, MCP_METHOD_HEADER: method}
        name_key = NAME_BEARING_METHODS.get(method)
        name = params.get(name_key) if name_key is not None else None
        if isinstance(name, str):
            headers[MCP_NAME_HEADER] = encode_header_value(name)
        if method == "tools/call" and isinstance(name, str):
            header_map = self._param_headers.get(name)
            arguments = params.get("arguments")
            if header_map and isinstance(arguments, dict):
                headers.update(mcp_param_headers(header_map, arguments))  # pyright: ignore[reportUnknownArgumentType]
        return headers

    def inbound(self, message: types.JSONRPCMessage) -> None:
        """Learn from a broker message about to be written to the client."""
        if not isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
            return
        method = self._pending.pop(message.id, None) if message.id is not None else None
        if not isinstance(message, types.JSONRPCResponse):
            return
        result = message.result
        if method == "initialize":
            version = result.get("protocolVersion")
            self.handshake_version = version if isinstance(version, str) else None
        elif method == "tools/list":
            for tool in result.get("tools") or ():
                if isinstance(tool, dict) and isinstance(name := tool.get("name"), str):  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
                    header_map = x_mcp_header_map(tool.get("inputSchema"))  # pyright: ignore[reportUnknownMemberType]
                    if header_map:
                        self._param_headers[name] = header_map
                    else:
                        self._param_headers.pop(name, None)


Incoming = AsyncIterable[SessionMessage | Exception]


class Outgoing(Protocol):
    async def send(self, item: SessionMessage, /) -> None: ...


async def relay(
    client_in: Incoming, client_out: Outgoing, broker_in: Incoming, broker_out: Outgoing
) -> None:
    """Pass messages both ways until the client closes its side (EOF on stdin) or the broker's."""
    era = EraHeaders()

    async def client_to_broker() -> None:
        async for item in client_in:
            if isinstance(item, Exception):
                # A line that is not JSON-RPC: answer as a server would, id unknown.
                error = types.ErrorData(code=types.PARSE_ERROR, message="Parse error")
                reply = types.JSONRPCError(jsonrpc="2.0", id=None, error=error)
                await client_out.send(SessionMessage(reply))
                continue
            headers = era.outbound(item.message)
            metadata = ClientMessageMetadata(headers=headers) if headers else None
            await broker_out.send(SessionMessage(item.message, metadata=metadata))

    async def broker_to_client() -> None:
        async for item in broker_in:
            if isinstance(item, Exception):
                logger.warning("dropped an unreadable message from the broker")
                continue
            era.inbound(item.message)
            await client_out.send(SessionMessage(item.message))

    async with anyio.create_task_group() as tg:

        async def until_done(side: Callable[[], Any]) -> None:
            await side()
            tg.cancel_scope.cancel()

        tg.start_soon(until_done, client_to_broker)
        tg.start_soon(until_done, broker_to_client)


async def run_shim(
    settings: ShimSettings,
    *,
    stdio: Callable[[], Any] = stdio_server,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Obtain a first token, relay the process's stdin/stdout to the broker until EOF, then
    close the task.

    Raises:
        ShimConfigError, CredentialsRefused, BrokerUnreachable: before any MCP is relayed.
        httpx2.HTTPError (in an ExceptionGroup): the broker went away mid-session.
    """
    async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT) as token_http:
        auth = TaskTokenAuth(TokenClient(settings, token_http, clock=clock))
        await auth.start()
        async with (
            httpx2.AsyncClient(auth=auth, timeout=HTTP_TIMEOUT) as http,
            streamable_http_client(settings.mcp_url, http_client=http) as (broker_in, broker_out),
            stdio() as (client_in, client_out),
        ):
            await relay(client_in, client_out, broker_in, broker_out)
            # Ends stdio's writer, so the shim exits on its own rather than being terminated.
            await client_out.aclose()
        with anyio.move_on_after(CLOSE_TIMEOUT):
            await auth.close_task()
