"""A bounded in-memory event store for the front's streamable HTTP sessions (SSE resumability).

With an event store the SDK primes every POST SSE stream with an event id (and a ``retry``
hint), stores each message it sends there, and replays what a client missed when it reconnects
with ``Last-Event-ID``. The SDK passes *one* store to every session's transport, but it names
streams by JSON-RPC request id (``"1"``, ``"2"``, ... and one key for the GET stream), which
collide across sessions. A shared store could therefore replay one session's messages into
another. So every session gets its own store (`per_session_event_stores`), and event ids are
unguessable random tokens: a ``Last-Event-ID`` from elsewhere finds nothing.

Each store keeps at most `MAX_EVENTS` events and `MAX_BYTES` of message JSON, oldest dropped
first; a session's store goes away with its transport.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.types import JSONRPCMessage

__all__ = ["MAX_BYTES", "MAX_EVENTS", "BoundedEventStore", "per_session_event_stores"]

MAX_EVENTS = 256
MAX_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Event:
    stream_id: str
    message: JSONRPCMessage | None
    size: int


class BoundedEventStore(EventStore):
    """One session's events, in order, bounded by count and bytes."""

    def __init__(self, *, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES) -> None:
        self._events: OrderedDict[str, _Event] = OrderedDict()
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes

    @property
    def count(self) -> int:
        """Events held now. (No ``__len__``: the SDK tests the store for truth.)"""
        return len(self._events)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = secrets.token_urlsafe(16)
        size = 0 if message is None else len(message.model_dump_json(by_alias=True))
        self._events[event_id] = _Event(str(stream_id), message, size)
        self._bytes += size
        while self._events and (
            len(self._events) > self._max_events or self._bytes > self._max_bytes
        ):
            _, dropped = self._events.popitem(last=False)
            self._bytes -= dropped.size
        return event_id

    async def replay_events_after(
        self, last_event_id: str, send_callback: EventCallback
    ) -> str | None:
        start = self._events.get(last_event_id)
        if start is None:
            return None
        after = False
        for event_id, event in list(self._events.items()):
            if event_id == last_event_id:
                after = True
                continue
            if after and event.stream_id == start.stream_id and event.message is not None:
                await send_callback(EventMessage(event.message, event_id))
        return start.stream_id


def per_session_event_stores(
    manager: StreamableHTTPSessionManager, factory: type[BoundedEventStore] = BoundedEventStore
) -> None:
    """Give each new stateful session of ``manager`` its own store (see the module docstring).

    SDK 2.3 builds a session's transport in the private ``_admit_session`` from the manager's one
    ``event_store``; this wraps it to hand each transport a fresh store instead. The manager must
    have been built with some ``event_store`` (so the SDK enables priming and replay at all).
    """
    admit: Any = manager._admit_session  # pyright: ignore[reportPrivateUsage]

    def admit_with_own_store(requestor: Any) -> Any:
        transport = admit(requestor)
        if transport is not None:
            transport._event_store = factory()  # pyright: ignore[reportPrivateUsage]
        return transport

    manager._admit_session = admit_with_own_store  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
