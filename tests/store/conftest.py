"""A real, migrated store per test on each backend: SQLite in tmp_path, PostgreSQL in a fresh
database (marked ``postgres``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url, temporary_postgres_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database's URL (not migrated) on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        async with temporary_postgres_url() as url:
            yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    async with migrated_store(store_url) as s:
        yield s
