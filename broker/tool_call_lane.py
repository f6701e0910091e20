"""The direct lane for ``tools/call`` over HTTP, both eras: no SDK server path, no check skipped.

Shell adapter (ASGI). Every tool call is mediated by the same `Mediator.call_tool` whichever way
it arrives; this module only decides *how the HTTP request reaches it*. The SDK's streamable
HTTP server spends about 2-4 ms of CPU per request on this machine (routing through a session
task, pydantic validation of every message, an SSE stream with a priming event), which is more
than the whole mediation pipeline. So a POST that is unambiguously one ``tools/call`` the lane
can serve is served here and answered with one plain JSON response, which the streamable HTTP
spec allows for any POST. Everything else passes to the SDK app, byte for byte (the body is
replayed), and so does anything this lane is not sure about: the SDK then answers it with its
own errors.

The lane serves a request only when all of these hold (checked in this order, cheapest first):

- ``POST`` to the MCP path, ``Content-Type: application/json``, an ``Accept`` naming both
  ``application/json`` and ``text/event-stream`` (what the SDK requires), a Bearer token, and
  either a 2025-era ``MCP-Protocol-Version`` with an ``mcp-session-id``, or the 2026-07-28
  version with no session id and no ``Mcp-Param-*`` header;
- Host and Origin pass the same `TransportSecuritySettings` the SDK enforces;
- the body fits ``max_body`` and is one JSON-RPC request ``tools/call`` with an id, ``params``
  of only ``name``, ``arguments`` and ``_meta``, and no ``progressToken`` (progress needs the
  request's own SSE stream); on 2026 ``_meta`` holds the envelope only (protocol version,
  client info and capabilities: a log level needs the SDK's stream too);
- 2026: the SDK's own request ladder passes (`mcp.shared.inbound.classify_inbound_request`:
  envelope, ``Mcp-Method``/``Mcp-Name``/version headers agree with the body, no duplicated
  routing header), and the tool's schema maps no argument to an ``Mcp-Param-*`` header;
- the token verifies (a refused token goes to the SDK, which answers 401 with
  ``WWW-Authenticate``);
- 2025: the session is live, was opened by the same principal (the SDK's own ownership rule)
  and has already been seen by the front (its first request after ``initialize`` takes the SDK
  path).

Strict JSON: a body that parses but repeats a key or carries NaN/Infinity is refused here with
400 and a JSON-RPC parse error naming the problem (design, "What must hold" 4), since the SDK's
parser would silently keep the last value.

2025 era: while a call is served here it counts as a request in flight on its session (the SDK
must not expire a busy session), and a ``notifications/cancelled`` for it (the agent gave up)
cancels it like the SDK would, answered ``-32800 Request cancelled``. Downstream log messages
and sampling/elicitation requests during such a call reach the agent on its session's
standalone stream (there is no per-request stream). A client that disconnects mid-call does not
cancel it (the spec lets it resume); the result is recorded and dropped, as on the SDK path. A
call whose session ended while it ran (quarantine closes the agent's sessions) is answered 404
"Session not found", as the SDK answers anything on a session that is gone.

2026 era: a client cancels by closing its connection, so the lane watches for the disconnect
and cancels the call downstream, answering nothing. Results carry the ``serverInfo`` stamp in
``_meta`` as the SDK's own path adds it. There is no stream to the agent: downstream log
messages are dropped and sampling/elicitation refused, as on the SDK's path for a request that
did not opt in to logging.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import anyio
import mcp.types as types
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import (
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
)
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.http_sessions import serving

__all__ = ["LaneBackend", "LaneSession", "ToolCallLane"]

logger = logging.getLogger(__name__)

REQUEST_CANCELLED = -32800
"""The SDK's answer to a cancelled 2025-era request (LSP's RequestCancelled)."""
PARSE_ERROR = -32700
_PARAMS = frozenset({"name", "arguments", "_meta"})
_MODERN_META = frozenset(
    {PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY}
)
"""The 2026 envelope; anything more (a log level, a progress token) needs the SDK's stream."""
_PARAM_HEADER = "mcp-param-"


@dataclass(frozen=True, slots=True)
class LaneSession:
    """A live 2025-era session the caller owns, as the front knows it."""

    session_id: str
    transport: StreamableHTTPServerTransport
    protocol_version: str
    session: Any
    """The agent's `ServerSession` (proxy): where downstream traffic for the agent goes."""
    client_info: Mapping[str, Any]


class LaneBackend(Protocol):
    """What the lane needs from the MCP front (`broker.mcp_front.McpFront`)."""

    async def lane_token(self, raw: str) -> AccessToken | None: ...

    def lane_session(self, session_id: str, token: AccessToken) -> LaneSession | None: ...

    def lane_call(
        self,
        lane: LaneSession,
        token: AccessToken,
        name: str,
        arguments: Mapping[str, Any] | None,
        peer: str | None,
    ) -> Awaitable[types.CallToolResult]: ...

    def lane_modern_ready(self, name: str) -> bool: ...

    def lane_modern_call(
        self,
        token: AccessToken,
        route: InboundModernRoute,
        name: str,
        arguments: Mapping[str, Any] | None,
        peer: str | None,
    ) -> Awaitable[types.CallToolResult]: ...

    @property
    def server_info_stamp(self) -> dict[str, Any]: ...


class _NotStrict(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _NotStrict(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise _NotStrict(f"{name} is not JSON")


def _strict_json(body: bytes) -> Any:
    """Parse ``body``; `_NotStrict` for what only a lax parser accepts, ValueError if not JSON."""
    return json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


@dataclass(frozen=True, slots=True)
class _Call:
    request_id: str | int
    name: str
    arguments: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: str | int


@dataclass(frozen=True, slots=True)
class _Gate:
    """What the headers say: the caller's bearer token, and its 2025 session (None on 2026)."""

    token: str
    session_id: str | None


class ToolCallLane:
    """ASGI wrapper around the SDK's streamable HTTP app (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        backend: LaneBackend,
        *,
        security: TransportSecuritySettings,
        max_body: int,
        path: str = "/mcp",
    ) -> None:
        self.app = app
        self.backend = backend
        self.path = path
        self.max_body = max_body
        self._security = TransportSecurityMiddleware(security)
        self._inflight: dict[tuple[str, str | int], anyio.CancelScope] = {}
        """Calls being served: 2025 ones by (session, request id), 2026 ones by ("", object id)."""
        self.served = 0
        """Calls answered by the lane (for tests and metrics)."""

    def in_flight(self) -> int:
        """Calls being served by the lane right now."""
        return len(self._inflight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        gate = _gate(headers, self.max_body)
        if gate is None:
            await self.app(scope, receive, send)
            return
        if await self._security.validate_request(Request(scope), is_post=True) is not None:
            await self.app(scope, receive, send)
            return
        body, replay = await _read_body(receive, self.max_body)
        if body is None:
            await self.app(scope, replay, send)
            return
        modern = gate.session_id is None
        try:
            decoded = _strict_json(body)
        except _NotStrict as exc:
            refusal = _error(None, PARSE_ERROR, f"Parse error: {exc}")
            await _send_json(send, 400, refusal, gate.session_id)
            return
        except (ValueError, RecursionError):
            decoded = None  # not JSON at all (or nested past Python's limit): the SDK names it
        message = _classify(decoded, modern=modern)
        if gate.session_id is not None and isinstance(message, _Cancel):
            await self._cancel(scope, replay, send, gate.session_id, message)
            return
        if not isinstance(message, _Call):
            await self.app(scope, replay, send)
            return
        if gate.session_id is None:
            route = _modern_route(decoded, scope)
            if route is None or not self.backend.lane_modern_ready(message.name):
                await self.app(scope, replay, send)
                return
            token = await self.backend.lane_token(gate.token)
            if token is None:
                await self.app(scope, replay, send)
                return
            await self._serve_modern(receive, send, token, route, message, _peer(scope))
            return
        token = await self.backend.lane_token(gate.token)
        lane = self.backend.lane_session(gate.session_id, token) if token is not None else None
        key = (gate.session_id, message.request_id)
        if token is None or lane is None or key in self._inflight:
            await self.app(scope, replay, send)
            return
        await self._serve(send, lane, token, message, key, _peer(scope))

    async def _serve(
        self,
        send: Send,
        lane: LaneSession,
        token: AccessToken,
        call: _Call,
        key: tuple[str, str | int],
        peer: str | None,
    ) -> None:
        result: types.CallToolResult | None = None
        with serving(lane.transport), anyio.CancelScope() as cancel:
            self._inflight[key] = cancel
            try:
                result = await self.backend.lane_call(lane, token, call.name, call.arguments, peer)
            finally:
                self._inflight.pop(key, None)
        self.served += 1
        if lane.transport.is_terminated:
            # The session ended while the call ran (quarantine closes an agent's sessions):
            # answer as the SDK answers any request on a session that is gone.
            await _send_json(send, 404, _error(None, -32600, "Session not found"), lane.session_id)
            return
        if result is None:
            body = _error(call.request_id, REQUEST_CANCELLED, "Request cancelled")
        else:
            body = (
                b'{"jsonrpc":"2.0","id":'
                + json.dumps(call.request_id).encode()
                + b',"result":'
                + result.model_dump_json(by_alias=True, exclude_none=True).encode()
                + b"}"
            )
        await _send_json(send, 200, body, lane.session_id)

    async def _serve_modern(
        self,
        receive: Receive,
        send: Send,
        token: AccessToken,
        route: InboundModernRoute,
        call: _Call,
        peer: str | None,
    ) -> None:
        """A 2026-era call: the agent cancels it by going away, as the spec says."""
        result: types.CallToolResult | None = None
        key = ("", id(call))
        async with anyio.create_task_group() as group:
            self._inflight[key] = group.cancel_scope

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            try:
                result = await self.backend.lane_modern_call(
                    token, route, call.name, call.arguments, peer
                )
            finally:
                self._inflight.pop(key, None)
                group.cancel_scope.cancel()
        self.served += 1
        if result is None:
            return  # the agent went away: the 2026 wire answers nothing to a cancelled request
        wire = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        meta = wire.get("_meta")
        if isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
            wire["_meta"] = {**meta, SERVER_INFO_META_KEY: self.backend.server_info_stamp}
        elif meta is None:
            wire["_meta"] = {SERVER_INFO_META_KEY: self.backend.server_info_stamp}
        body = json.dumps(
            {"jsonrpc": "2.0", "id": call.request_id, "result": wire}, separators=(",", ":")
        ).encode()
        await _send_json(send, 200, body, None)

    async def _cancel(
        self, scope: Scope, replay: Receive, send: Send, session_id: str, cancel: _Cancel
    ) -> None:
        """Cancel a call this lane serves; any other cancellation is the SDK's."""
        running = self._inflight.get((session_id, cancel.request_id))
        if running is None:
            await self.app(scope, replay, send)
            return
        # Only the session's owner may cancel its calls: the same checks as a call.
        gate = _gate(Headers(scope=scope), self.max_body)
        token = await self.backend.lane_token(gate.token) if gate else None
        if token is None or self.backend.lane_session(session_id, token) is None:
            await self.app(scope, replay, send)
            return
        running.cancel()
        await _send_json(send, 202, b"", session_id)


def _gate(headers: Headers, max_body: int) -> _Gate | None:
    """The token (and 2025 session) when the headers allow the lane, else None."""
    version = headers.get("mcp-protocol-version")
    session_id = headers.get("mcp-session-id")
    if version in HANDSHAKE_PROTOCOL_VERSIONS:
        if not session_id:
            return None
    elif version in MODERN_PROTOCOL_VERSIONS:
        # Stateless: a session id or Mcp-Param-* headers are the SDK's to judge.
        if session_id is not None or any(k.startswith(_PARAM_HEADER) for k in headers):
            return None
    else:
        return None
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() != "bearer ":
        return None
    if not headers.get("content-type", "").lower().startswith("application/json"):
        return None
    accept = [part.split(";")[0].strip().lower() for part in headers.get("accept", "").split(",")]
    if "application/json" not in accept or "text/event-stream" not in accept:
        return None
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body):
        return None
    token = authorization[7:].strip()
    return _Gate(token, session_id) if token else None


def _modern_route(decoded: Any, scope: Scope) -> InboundModernRoute | None:
    """The SDK's own 2026 request ladder (envelope, routing headers, version); None if refused."""
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    if find_duplicated_routing_header(raw) is not None:
        return None
    route = classify_inbound_request(decoded, headers={k.lower(): v for k, v in raw})
    return route if isinstance(route, InboundModernRoute) else None


async def _read_body(receive: Receive, limit: int) -> tuple[bytes | None, Receive]:
    """The whole body (None past ``limit``) and a ``receive`` that replays what was read."""
    chunks: list[Message] = []
    size = 0
    more = True
    while more:
        message = await receive()
        chunks.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if size > limit:
            break
    pending = list(chunks)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    if more or size > limit or chunks[-1]["type"] != "http.request":
        return None, replay
    return b"".join(m.get("body", b"") for m in chunks), replay


def _classify(message: Any, *, modern: bool) -> _Call | _Cancel | None:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None
    method = message.get("method")
    params = message.get("params")
    if not isinstance(params, dict):
        return None
    if method == "notifications/cancelled":
        request_id = params.get("requestId")
        if "id" in message or not _is_id(request_id):
            return None
        return _Cancel(request_id)
    if method != "tools/call" or set(message) != {"jsonrpc", "id", "method", "params"}:
        return None
    request_id = message["id"]
    name = params.get("name")
    arguments = params.get("arguments")
    meta = params.get("_meta")
    if (
        not _is_id(request_id)
        or not isinstance(name, str)
        or not _PARAMS.issuperset(params)
        or (arguments is not None and not isinstance(arguments, dict))
        or (meta is not None and not isinstance(meta, dict))
    ):
        return None
    allowed_meta = _MODERN_META if modern else None
    if meta is not None and (
        "progressToken" in meta or (allowed_meta is not None and not allowed_meta.issuperset(meta))
    ):
        return None
    return _Call(request_id, name, arguments)


def _is_id(value: Any) -> TypeGuard[str | int]:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def _error(request_id: str | int | None, code: int, message: str) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}},
        separators=(",", ":"),
    ).encode()


async def _send_json(send: Send, status: int, body: bytes, session_id: str | None) -> None:
    headers = [] if session_id is None else [(b"mcp-session-id", session_id.encode("latin-1"))]
    if body:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    else:
        headers.append((b"content-length", b"0"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
