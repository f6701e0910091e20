"""Real stores for tests, on SQLite and on PostgreSQL; no fakes here.

    async with temporary_postgres_url() as url:      # a fresh database, dropped afterwards
        async with migrated_store(url) as store: ...

    async with migrated_store(sqlite_url(tmp_path)) as store: ...

The PostgreSQL server is ``BROKER_TEST_POSTGRES_URL`` when set, else
``postgresql://postgres@127.0.0.1:5432/test`` (trust auth); a database is created next to it.
"""

from __future__ import annotations

import os
import secrets
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
    "make_agent",
    "migrated_store",
    "postgres_admin_url",
    "sqlite_url",
    "temporary_postgres_url",
]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_admin_url() -> str:
    """The libpq-style URL of an existing database the test may create databases from."""
    return os.environ.get("BROKER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def sqlite_url(tmp_path: Path) -> str:
    """A store URL for a SQLite file ``broker.db`` inside ``tmp_path``."""
    return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"


@asynccontextmanager
async def temporary_postgres_url(admin_url: str | None = None) -> AsyncIterator[str]:
    """Create ``broker_test_<random>``, yield its ``postgresql+asyncpg://`` URL, then drop it.

    The database is dropped ``WITH (FORCE)`` even when the body fails or leaks connections.
    """
    admin = (admin_url or postgres_admin_url()).replace("postgresql+asyncpg://", "postgresql://")
    name = f"broker_test_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin)
    url = urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))
    try:
        yield url
    finally:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


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
