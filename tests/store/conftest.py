"""A real, migrated store per test on each backend: SQLite in tmp_path, PostgreSQL in a fresh
database (marked ``postgres``) copied from a migrated template made once per run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broker.store import SqlStore
from broker.store.testing import (
    create_migrated_template,
    drop_postgres_database,
    migrated_store,
    sqlite_url,
    temporary_postgres_url,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """The name of a migrated database; made lazily, in a thread of its own, once per run."""
    with ThreadPoolExecutor(1) as pool:
        url = pool.submit(asyncio.run, create_migrated_template()).result(timeout=60)
        try:
            yield url.rsplit("/", 1)[1]
        finally:
            pool.submit(asyncio.run, drop_postgres_database(url)).result(timeout=60)


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database's URL (not migrated) on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        async with temporary_postgres_url() as url:
            yield url


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """A migrated store on each backend."""
    if request.param == "sqlite":
        async with migrated_store(sqlite_url(tmp_path)) as s:
            yield s
    else:
        template: str = request.getfixturevalue("postgres_template")
        async with (
            temporary_postgres_url(template=template) as url,
            migrated_store(url) as s,
        ):
            yield s
