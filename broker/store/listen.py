"""PostgreSQL ``LISTEN``: one dedicated asyncpg connection that turns notifications into callbacks.

Part of the store package (the only place that knows the store's URL and driver). `PgListener`
keeps one connection outside the SQLAlchemy pool, ``LISTEN``s on its channels and calls the
channel's callback with each payload. It pings the connection every ``keepalive`` seconds (a
half-open TCP connection delivers nothing and reports nothing), and when the connection is lost
it reconnects with capped, jittered exponential backoff. Notifications sent while it was away
are lost, so ``on_connected`` runs after every (re)connection: the owner re-reads what it may
have missed. A listener is only an accelerator; the owner keeps polling (fail-safe fallback).

`listener_for(store, ...)` builds one for a PostgreSQL `SqlStore`, and None for SQLite.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus
from sqlalchemy.engine import make_url

__all__ = ["PgListener", "libpq_url", "listener_for"]

logger = logging.getLogger(__name__)

NotificationCallback = Callable[[str], None]


def libpq_url(url: str) -> str:
    """``postgresql+asyncpg://...`` (a SQLAlchemy URL) as the plain URL asyncpg connects to."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def listener_for(
    store: object, channels: Mapping[str, NotificationCallback], **options: Any
) -> PgListener | None:
    """A `PgListener` on ``store``'s database when it is a PostgreSQL `SqlStore`, else None."""
    from broker.store.sql import SqlStore

    if not isinstance(store, SqlStore) or store.dialect != "postgresql":
        return None
    url = store._engine.url.render_as_string(hide_password=False)  # pyright: ignore[reportPrivateUsage] - same package
    return PgListener(libpq_url(url), channels, **options)


class PgListener:
    """Listens on ``channels`` over its own connection until cancelled; see the module docstring.

    ``listening`` says whether notifications are arriving right now. Callbacks run in the event
    loop and must not block; an exception in one is logged and does not stop the listener.
    """

    def __init__(
        self,
        dsn: str,
        channels: Mapping[str, NotificationCallback],
        *,
        on_connected: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        keepalive: float = 2.0,
        connect_timeout: float = 5.0,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.channels = dict(channels)
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.listening = False
        self.connections = 0
        """How many times a connection was established (1 + reconnections)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, reconnecting forever. Reports started after the first attempt, good or bad,
        so a database that is down at start-up does not hold the broker's start-up."""
        backoff = self.min_backoff
        started = False

        def report() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            before = self.connections
            try:
                await self._session(report)
            except Exception as exc:
                logger.warning(
                    "revocation listener disconnected", extra={"error_type": type(exc).__name__}
                )
            finally:
                if self.listening:
                    self.listening = False
                    self._call(self.on_lost)
            report()
            if self.connections > before:
                backoff = self.min_backoff  # it was up: retry soon, then back off again
            await anyio.sleep(backoff * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            backoff = min(self.max_backoff, backoff * 2)

    async def _session(self, report_started: Callable[[], None]) -> None:
        """One connection's life: connect, LISTEN, ping until something fails."""
        with anyio.fail_after(self.connect_timeout):
            conn: asyncpg.Connection = await asyncpg.connect(self._dsn)
        lost = anyio.Event()
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            for channel, callback in self.channels.items():
                await conn.add_listener(channel, _adapter(channel, callback))
            self.listening = True
            self.connections += 1
            logger.info("revocation listener connected", extra={"channels": sorted(self.channels)})
            # Anything announced while not listening was missed: the owner catches up now.
            self._call(self.on_connected)
            report_started()
            while not lost.is_set():
                with anyio.move_on_after(self.keepalive):
                    await lost.wait()
                if lost.is_set():
                    break
                with anyio.fail_after(self.connect_timeout):
                    await conn.fetchval("SELECT 1")
            raise ConnectionError("the listening connection was closed")
        finally:
            conn.terminate()

    def _call(self, callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            logger.exception("revocation listener callback failed")


def _adapter(channel: str, callback: NotificationCallback) -> Callable[..., None]:
    def on_notification(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            callback(str(payload))
        except Exception:
            logger.exception("notification callback failed", extra={"channel": channel})

    return on_notification
