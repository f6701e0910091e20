"""Durable batched event appends on a connection of their own: the recorder's hot path.

Every mediated tool call appends twice (its decision before forwarding, its result before
answering) and waits until each append is durable, so the append's latency is the broker's. On
the store's ORM path one append costs 2-3 ms: a session, a pool checkout with its pre-ping, a
greenlet, and on SQLite one aiosqlite thread hop per statement. An appender keeps one connection
of its own, opened on the first append and re-opened after any failure (so a database that comes
back is written again), and writes one batch as one transaction:

* SQLite: ``BEGIN IMMEDIATE``; one executemany ``UPDATE`` advancing every session's chain head
  only where it is the expected one (existing, not sealed, ``event_count`` and ``last_hash`` as
  the batch says); one executemany ``INSERT``; ``COMMIT``. The connection gets the store's
  PRAGMAs (WAL, ``synchronous=FULL``), so the batch is on disk when the commit returns; a batch
  appended with ``durable=False`` is committed under ``synchronous=NORMAL`` (in the WAL, not yet
  synced). A batch that waits for the disk runs as one job on a dedicated worker thread (one
  thread hop per batch); one that does not, on the event loop (see `SqliteAppender`).
* PostgreSQL: one statement, so one round trip and one implicit transaction, committed under the
  server's ``synchronous_commit`` like any other. A data-modifying CTE advances the guarded heads
  and the ``INSERT`` takes each event's ``session_id`` from the advanced row: an event whose
  session was not advanced gets a NULL primary-key column, which PostgreSQL always refuses, so one
  failed guard aborts the whole statement and nothing is written. A ``durable=False`` batch uses
  the same statement with ``synchronous_commit`` set off for its own transaction only.

Values pass through the columns' own SQLAlchemy bind processors, so a row reads back through the
ORM path as the ORM would have stored it; the one exception is a payload handed in as its
canonical JSON text (`PreEncoded`), written as it is, which reads back as the same value.
`append` answers False, having written nothing, when a guard or a constraint refused the batch;
the store then redoes the batch on its checked path, which finds out and names the conflict.
Driver errors are raised unchanged for the store to map (after the connection has been
discarded).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import Column, Dialect, Table
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.store.tables import EventRow

__all__ = [
    "Advance",
    "Appender",
    "PostgresAppender",
    "PreEncoded",
    "SqliteAppender",
    "open_appender",
]

_EVENT_COLUMNS: Sequence[Column[Any]] = list(cast(Table, EventRow.__table__).columns)
_EVENT_NAMES = ", ".join(c.name for c in _EVENT_COLUMNS)
# asyncpg.connect keywords that SQLAlchemy's asyncpg adapter consumes itself.
_ADAPTER_ONLY = (
    "async_creator_fn",
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
)
_CLOSE_TIMEOUT = 10
_CHECKPOINT_EVERY = 256
"""SQLite commits between two WAL checkpoints (see `SqliteAppender`)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Advance:
    """Move a session's chain head from ``(count, last_hash)`` to ``(new_count, new_hash)``.

    The guard: the session exists, is not sealed, has recorded ``count`` events, and (when
    ``count`` > 0) its last one hashes to ``last_hash``.
    """

    session_id: str
    count: int
    last_hash: str
    new_count: int
    new_hash: str


@dataclass(frozen=True, slots=True)
class PreEncoded:
    """A column value already in the form the column's bind processor would give it.

    Used for an event's payload, whose canonical JSON text `broker.core.recording.seal_event`
    made for the hash anyway: written as it is instead of being serialised a second time. It
    reads back through the JSON column as the same value (key order aside, which the hash does
    not depend on).
    """

    value: Any


class Appender(Protocol):
    async def append(
        self,
        advances: Sequence[Advance],
        events: Sequence[Mapping[str, Any]],
        *,
        durable: bool = True,
        alone: bool = False,
    ) -> bool:
        """Advance every head and insert every event (column values by name) durably, or nothing.

        Returns False, having written nothing, when a guard or a constraint refused the batch.
        ``durable=False``: committed without waiting for the flush; ``alone``: the caller is
        the only work in progress (both: see `broker.ports.Store.append_events`).

        Raises:
            ValueError: a value the columns refuse (a naive datetime); nothing was written.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection (and thread); a later append opens them again."""
        ...


def open_appender(
    engine: AsyncEngine,
    *,
    sqlite_setup: Callable[[sqlite3.Connection], None],
    sqlite_timeout: float,
    postgres_connect_args: Mapping[str, Any],
) -> Appender | None:
    """The appender for ``engine``'s database; None where appends keep the store's own path.

    SQLite needs a plain file (an in-memory database is private to one connection, and URL
    options are left to the store's engine); ``sqlite_setup`` prepares a new connection exactly
    as the store's engine does.
    """
    url = engine.url
    if engine.dialect.name == "sqlite":
        path = url.database or ""
        if path in ("", ":memory:") or path.startswith("file:") or url.query:
            return None
        return SqliteAppender(path, engine.dialect, setup=sqlite_setup, timeout=sqlite_timeout)
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg":
        _, params = engine.dialect.create_connect_args(url)
        params = {k: v for k, v in params.items() if k not in _ADAPTER_ONLY}
        return PostgresAppender(params | dict(postgres_connect_args), engine.dialect)
    return None


def _encoders(dialect: Dialect) -> list[Callable[[Any], Any] | None]:
    """Each events column's bind processor for ``dialect``: what SQLAlchemy itself applies."""
    return [c.type.dialect_impl(dialect).bind_processor(dialect) for c in _EVENT_COLUMNS]


def _encode(
    encoders: Sequence[Callable[[Any], Any] | None], events: Sequence[Mapping[str, Any]]
) -> list[tuple[Any, ...]]:
    named = list(zip([c.name for c in _EVENT_COLUMNS], encoders, strict=True))
    rows: list[tuple[Any, ...]] = []
    for e in events:
        row: list[Any] = []
        for name, encode in named:
            value = e[name]
            if type(value) is PreEncoded:
                row.append(value.value)
            else:
                row.append(value if encode is None else encode(value))
        rows.append(tuple(row))
    return rows


class SqliteAppender:
    """Appends on one SQLite connection of its own: flushed batches on a worker thread.

    A durable batch waits for the disk (0.2 to 0.4 ms per flush here), so it is written on a
    worker thread: the loop serves other calls meanwhile, and the events handed in meanwhile
    gather into the next batch (group commit). The thread hop itself costs about 0.2 ms of
    waking two threads, though, so a batch is written on the calling thread, the event loop's,
    when it does not wait for the disk (``durable=False``: a commit costs about 0.03 ms), or
    when the caller says it is alone (``alone=True``: no other call waits to be served
    meanwhile).

    Written on the loop, a batch never waits for SQLite's write lock: with another connection
    holding it (a store transaction, driven by this same loop, or another process), ``BEGIN
    IMMEDIATE`` fails at once and the batch goes to the worker thread, which waits for the lock
    up to ``timeout``. A lock (`threading.Lock`) keeps the two from using the connection at once.

    Nor does a write on the loop checkpoint the WAL (copying it into the database file and
    syncing that: milliseconds). The connection's automatic checkpoint is off, and every
    ``_CHECKPOINT_EVERY`` commits a passive checkpoint is queued on the worker thread instead;
    a write arriving meanwhile finds the connection busy and queues behind it.
    """

    _ADVANCE = (
        "UPDATE sessions SET event_count = ?, last_hash = ? "
        "WHERE id = ? AND event_count = ? AND ended_at IS NULL "
        "AND (event_count = 0 OR last_hash = ?)"
    )
    # Only our own column names go into these strings; every value is a bound parameter.
    _INSERT = f"INSERT INTO events ({_EVENT_NAMES}) VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})"  # noqa: S608

    def __init__(
        self,
        path: str,
        dialect: Dialect,
        *,
        setup: Callable[[sqlite3.Connection], None],
        timeout: float,
    ) -> None:
        self._path = path
        self._setup = setup
        self._timeout = timeout
        self._encoders = _encoders(dialect)
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        """Held by whichever thread uses the connection; the state below goes with it."""
        self._conn: sqlite3.Connection | None = None
        self._synced = True
        """The connection's ``synchronous`` is FULL (else NORMAL)."""
        self._patient = True
        """The connection's busy timeout is ``timeout`` (else zero)."""
        self._commits = 0
        """Commits since the last checkpoint was queued."""

    async def append(
        self,
        advances: Sequence[Advance],
        events: Sequence[Mapping[str, Any]],
        *,
        durable: bool = True,
        alone: bool = False,
    ) -> bool:
        heads = [(a.new_count, a.new_hash, a.session_id, a.count, a.last_hash) for a in advances]
        rows = _encode(self._encoders, events)
        if (alone or not durable) and self._lock.acquire(blocking=False):
            try:
                written = self._write(heads, rows, durable, patient=False)
            finally:
                self._lock.release()
            if written is not None:
                self._checkpoint_when_due()
                return written
        written = await asyncio.wrap_future(
            self._thread().submit(self._write_waiting, heads, rows, durable)
        )
        self._checkpoint_when_due()
        return written

    def _thread(self) -> ThreadPoolExecutor:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="broker-appender")
        return self._worker

    def _checkpoint_when_due(self) -> None:
        if self._commits >= _CHECKPOINT_EVERY:
            self._commits = 0
            self._thread().submit(self._checkpoint)

    def _checkpoint(self) -> None:
        """A passive checkpoint on the worker thread: it never waits for readers or writers."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                # The next write finds out whether the connection is still usable.
                logger.warning("WAL checkpoint failed", exc_info=True)

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            with self._lock:
                self._discard()
            return
        try:
            await asyncio.wrap_future(worker.submit(self._discard_locked))
        finally:
            worker.shutdown(wait=True)

    def _write_waiting(
        self, heads: list[tuple[Any, ...]], rows: list[tuple[Any, ...]], durable: bool
    ) -> bool:
        with self._lock:
            written = self._write(heads, rows, durable, patient=True)
        if written is None:  # pragma: no cover - a patient write waits for the lock or raises
            raise sqlite3.OperationalError("database is locked")
        return written

    def _write(
        self,
        heads: list[tuple[Any, ...]],
        rows: list[tuple[Any, ...]],
        durable: bool,
        *,
        patient: bool,
    ) -> bool | None:
        """One transaction, under ``self._lock``; None when impatient and the database is locked."""
        try:
            conn = self._conn or self._connect()
            if patient != self._patient:
                timeout_ms = int(self._timeout * 1000) if patient else 0
                conn.execute(f"PRAGMA busy_timeout={timeout_ms}")
                self._patient = patient
            if durable != self._synced:
                conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                self._synced = durable
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if patient or exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                return None
            try:
                advanced = conn.executemany(self._ADVANCE, heads).rowcount == len(heads)
                if advanced:
                    conn.executemany(self._INSERT, rows)
            except sqlite3.IntegrityError:
                advanced = False
            conn.execute("COMMIT" if advanced else "ROLLBACK")
            self._commits += advanced
        except BaseException:
            # Closing rolls back whatever the failure left open.
            self._discard()
            raise
        return advanced

    def _connect(self) -> sqlite3.Connection:
        # Used by the loop thread and the worker thread in turn, never at once (`self._lock`).
        conn = sqlite3.connect(self._path, timeout=self._timeout, check_same_thread=False)
        self._setup(conn)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        self._conn = conn
        self._synced = True
        self._patient = True
        return conn

    def _discard_locked(self) -> None:
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()


class PostgresAppender:
    """Appends on one asyncpg connection of its own, one statement (round trip) per batch."""

    def __init__(self, connect_args: Mapping[str, Any], dialect: Dialect) -> None:
        self._connect_args = dict(connect_args)
        self._encoders = _encoders(dialect)
        self._statement = _postgres_statement(dialect, durable=True)
        self._relaxed = _postgres_statement(dialect, durable=False)
        self._lock = asyncio.Lock()
        self._conn: asyncpg.Connection | None = None

    async def append(
        self,
        advances: Sequence[Advance],
        events: Sequence[Mapping[str, Any]],
        *,
        durable: bool = True,
        alone: bool = False,
    ) -> bool:
        heads = [
            [a.session_id for a in advances],
            [a.count for a in advances],
            [a.last_hash for a in advances],
            [a.new_count for a in advances],
            [a.new_hash for a in advances],
        ]
        columns = [list(column) for column in zip(*_encode(self._encoders, events), strict=True)]
        async with self._lock:
            try:
                conn = self._conn
                if conn is None or conn.is_closed():
                    # Seen to close while idle (a restart, a terminated backend): reconnect
                    # before writing, as a pre-ping would, instead of failing this batch.
                    conn = await self._connect()
                statement = self._statement if durable else self._relaxed
                await conn.execute(statement, *heads, *columns)
            except asyncpg.IntegrityConstraintViolationError:
                return False
            except BaseException:
                # Cancelled or failed mid-statement: the connection's state is unknown.
                self._discard()
                raise
        return True

    async def aclose(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                await conn.close(timeout=_CLOSE_TIMEOUT)
            except BaseException:
                conn.terminate()
                raise

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(**self._connect_args)
        self._conn = conn
        return conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _postgres_statement(dialect: Dialect, *, durable: bool) -> str:
    """The one statement of a PostgreSQL batch: $1-$5 the heads, then one array per column.

    Not ``durable``: a first CTE turns ``synchronous_commit`` off for this transaction only
    (``set_config(..., true)``); the head update joins it, so it is evaluated before the commit.
    Only our own column names and types go into the text; every value is a bound parameter.
    """
    arrays = ", ".join(
        f"${n}::{c.type.compile(dialect=dialect)}[]" for n, c in enumerate(_EVENT_COLUMNS, 6)
    )
    values = ", ".join(
        "advanced.id" if c.name == "session_id" else f"batch.{c.name}" for c in _EVENT_COLUMNS
    )
    relax, relaxed = (
        ("", "")
        if durable
        else ("relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), ", ", relaxed")
    )
    return (
        f"WITH {relax}advanced AS ("  # noqa: S608
        " UPDATE sessions AS s SET event_count = h.new_count, last_hash = h.new_hash"
        " FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::text[])"
        f" AS h(id, count, last_hash, new_count, new_hash){relaxed}"
        " WHERE s.id = h.id AND s.event_count = h.count AND s.ended_at IS NULL"
        " AND (h.count = 0 OR s.last_hash = h.last_hash)"
        " RETURNING s.id)"
        f" INSERT INTO events ({_EVENT_NAMES})"
        f" SELECT {values} FROM unnest({arrays}) AS batch({_EVENT_NAMES})"
        " LEFT JOIN advanced ON advanced.id = batch.session_id"
    )
