"""Real stores for tests, on SQLite and on PostgreSQL; no fakes here.

    async with temporary_postgres_url() as url:      # a fresh database, dropped afterwards
        async with migrated_store(url) as store: ...

    async with migrated_store(sqlite_url(tmp_path)) as store: ...

    if can_make_unwritable(url, tmp_path):
        async with unwritable(url): ...              # the database refuses writes, for real

The PostgreSQL server is ``BROKER_TEST_POSTGRES_URL`` when set, else
``postgresql://postgres@127.0.0.1:5432/test`` (trust auth); a database is created next to it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from broker.core.identity import Agent, AgentStatus
from broker.store.sql import SqlStore, open_store

__all__ = [
    "DEFAULT_POSTGRES_URL",
    "can_make_unwritable",
    "unwritable",
    "make_agent",
    "create_migrated_template",
    "create_postgres_database",
    "drop_postgres_database",
    "migrated_store",
    "postgres_admin_url",
    "sqlite_url",
    "temporary_postgres_url",
]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_TIMEOUT = 60
"""Bound on each administrative step (connect, CREATE/DROP DATABASE, close): a loaded machine
makes them slow (DROP DATABASE waits for a checkpoint), but none may wait forever."""


def postgres_admin_url() -> str:
    """The libpq-style URL of an existing database the test may create databases from."""
    return os.environ.get("BROKER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def sqlite_url(tmp_path: Path) -> str:
    """A store URL for a SQLite file ``broker.db`` inside ``tmp_path``."""
    return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"


@asynccontextmanager
async def temporary_postgres_url(
    admin_url: str | None = None, *, template: str | None = None
) -> AsyncIterator[str]:
    """Create ``broker_test_<random>``, yield its ``postgresql+asyncpg://`` URL, then drop it.

    ``template`` names a database to copy (see `create_migrated_template`); nobody may be
    connected to it meanwhile. The database is dropped ``WITH (FORCE)`` even when the body fails
    or leaks connections.
    """
    url = await create_postgres_database(admin_url, template=template)
    try:
        yield url
    finally:
        await drop_postgres_database(url, admin_url)


async def create_postgres_database(
    admin_url: str | None = None, *, template: str | None = None
) -> str:
    """Create ``broker_test_<random>`` (a copy of ``template`` if given); return its store URL."""
    admin = _libpq(admin_url or postgres_admin_url())
    name = f"broker_test_{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{template}"' if template else ""
    conn = await asyncpg.connect(admin, timeout=ADMIN_TIMEOUT)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"{copy}', timeout=ADMIN_TIMEOUT)
    finally:
        await _close(conn)
    return _database_url(admin, name)


async def drop_postgres_database(url: str, admin_url: str | None = None) -> None:
    """Drop the database ``url`` names, forcing its connections closed; absent is fine."""
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(_libpq(admin_url or postgres_admin_url()), timeout=ADMIN_TIMEOUT)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=ADMIN_TIMEOUT)
    finally:
        await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    """Close ``conn`` politely within a bound, else cut it (never an unbounded wait)."""
    try:
        await conn.close(timeout=10)
    except TimeoutError:
        conn.terminate()
    except BaseException:
        conn.terminate()
        raise


async def create_migrated_template(admin_url: str | None = None) -> str:
    """Create and migrate a database to pass as ``template=``; returns its store URL.

    Copying it skips migrating each test's database. Drop it with `drop_postgres_database`.
    """
    url = await create_postgres_database(admin_url)
    try:
        async with migrated_store(url, pool_size=1, max_overflow=0):
            pass
    except BaseException:
        await drop_postgres_database(url, admin_url)
        raise
    return url


def _libpq(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _database_url(admin: str, name: str) -> str:
    parts = urlsplit(admin)
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))


@asynccontextmanager
async def migrated_store(
    url: str, *, pool_size: int = 5, max_overflow: int = 10
) -> AsyncIterator[SqlStore]:
    """An opened, migrated `SqlStore` for ``url``, closed on exit."""
    store = open_store(url, pool_size=pool_size, max_overflow=max_overflow)
    try:
        await store.migrate()
        yield store
    finally:
        await store.aclose()


def make_agent(
    name: str = "agent-one",
    *,
    created_at: datetime | None = None,
    status: AgentStatus = AgentStatus.ACTIVE,
    scopes: tuple[str, ...] = ("files:read",),
) -> Agent:
    """A plausible active agent whose id is derived from ``name``."""
    return Agent(
        id=f"ag_{name}",
        name=name,
        owner="ops@example.com",
        status=status,
        allowed_scopes=scopes,
        max_ttl_seconds=600,
        auth_method="client_secret",
        created_at=created_at or datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
    )


# -- a store that refuses writes ----------------------------------------------------------------


def _chattr(flag: str, paths: list[Path]) -> None:
    chattr = shutil.which("chattr") or "chattr"
    subprocess.run([chattr, flag, *map(str, paths)], check=True, capture_output=True)  # noqa: S603 - fixed argv, our own paths


def _sqlite_files(store_url: str) -> list[Path]:
    db = Path(store_url.split("///", 1)[1])
    return [db, db.with_name(db.name + "-wal")]


def can_make_unwritable(store_url: str, scratch: Path) -> bool:
    """Whether `unwritable` works here: always on PostgreSQL; on SQLite only where ``chattr +i``
    does (root on a filesystem that supports it; ``scratch`` is a folder to probe in)."""
    if not store_url.startswith("sqlite"):
        return True
    if shutil.which("chattr") is None:
        return False
    probe = scratch / "chattr-probe"
    probe.write_text("x")
    try:
        _chattr("+i", [probe])
    except subprocess.CalledProcessError:
        return False
    _chattr("-i", [probe])
    return True


@asynccontextmanager
async def unwritable(store_url: str) -> AsyncIterator[None]:
    """Make the database refuse writes for real, and give them back afterwards.

    SQLite: the database file and its write-ahead log become immutable (``chattr +i``; root
    obeys it; the memory-mapped ``-shm`` index is left alone, as writing an immutable mapping
    kills the process with SIGBUS). PostgreSQL: the database turns read-only and every session
    is cut (the recorder's own connection included), so reconnections come back read-only.
    """
    if store_url.startswith("sqlite"):
        paths = _sqlite_files(store_url)
        _chattr("+i", paths)
        try:
            yield
        finally:
            _chattr("-i", paths)
        return
    name = store_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_admin_url(), timeout=ADMIN_TIMEOUT)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await _cut_sessions(admin, name)
        try:
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await _cut_sessions(admin, name)
    finally:
        await admin.close()


async def _cut_sessions(admin: asyncpg.Connection, name: str) -> None:
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )
