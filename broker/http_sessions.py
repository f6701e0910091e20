"""The SDK's stateful streamable HTTP sessions, as the broker needs to see and steer them.

Shell module, and the one place that reaches into `StreamableHTTPSessionManager` and
`StreamableHTTPServerTransport` internals: the SDK (2.3) has no public way to end a session, to
ask who opened one, or to keep one alive while a request is served beside the transport. These
few accessors are pinned by ``mcp>=2.3,<2.4`` in ``pyproject.toml`` and covered by tests
(`tests/test_tool_call_lane.py`, `tests/test_quarantine_e2e.py`), so an SDK upgrade that moves
them fails loudly instead of silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import anyio
from mcp.server.auth.provider import AccessToken, principal_components
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

__all__ = [
    "live_session",
    "owned_by",
    "serving",
    "session_instances",
    "terminate_http_session",
]


def session_instances(manager: StreamableHTTPSessionManager) -> Mapping[str, Any]:
    """The live sessions by ``mcp-session-id``."""
    return manager._server_instances  # pyright: ignore[reportPrivateUsage]


async def terminate_http_session(manager: StreamableHTTPSessionManager, session_id: str) -> bool:
    """Drop one stateful HTTP session; False when it is already gone."""
    transport = session_instances(manager).get(session_id)
    if transport is None:
        return False
    await manager._discard_session(session_id, transport)  # pyright: ignore[reportPrivateUsage]
    return True


def live_session(
    manager: StreamableHTTPSessionManager, session_id: str
) -> StreamableHTTPServerTransport | None:
    """The session's transport while it can still serve a request, else None.

    None for an unknown id, a terminated session and one whose idle period already ran out
    (the SDK is ending it).
    """
    transport = session_instances(manager).get(session_id)
    if not isinstance(transport, StreamableHTTPServerTransport) or transport.is_terminated:
        return None
    idle = transport.idle_scope
    if idle is not None and idle.cancel_called:
        return None
    return transport


def owned_by(manager: StreamableHTTPSessionManager, session_id: str, token: AccessToken) -> bool:
    """Whether ``token`` names the principal that opened the session (as the SDK decides it).

    The SDK refuses a session used with another credential's principal (404, "Session not
    found"); a request served beside the SDK must refuse it too.
    """
    owners: Mapping[str, Any] = manager._session_owners  # pyright: ignore[reportPrivateUsage]
    owner = owners.get(session_id)
    if owner is None:
        return False
    client_id, issuer, subject = principal_components(token)
    return (owner.get("client_id"), owner.get("issuer"), owner.get("subject")) == (
        client_id,
        issuer,
        subject,
    )


@contextmanager
def serving(transport: StreamableHTTPServerTransport) -> Iterator[None]:
    """Count a request served beside ``transport`` as in flight on its session.

    The SDK expires a session after ``idle_timeout`` with no request in flight; a session whose
    calls all take the direct path must not expire while it is busy, nor right after.
    """
    idle = transport.idle_scope
    timeout: float | None = transport._idle_timeout  # pyright: ignore[reportPrivateUsage]
    if idle is None or timeout is None:
        yield
        return
    transport._requests_in_flight += 1  # pyright: ignore[reportPrivateUsage]
    idle.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1  # pyright: ignore[reportPrivateUsage]
        if not transport._requests_in_flight:  # pyright: ignore[reportPrivateUsage]
            idle.deadline = anyio.current_time() + timeout
