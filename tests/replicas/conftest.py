"""Shared by the replica tests: a migrated PostgreSQL template, made once per run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.store.testing import create_migrated_template, drop_postgres_database


@pytest.fixture(scope="session")
def replicas_template() -> Iterator[str]:
    """The name of a migrated database to copy; made in a thread of its own, once per run."""
    with ThreadPoolExecutor(1) as pool:
        url = pool.submit(asyncio.run, create_migrated_template()).result(timeout=60)
        try:
            yield url.rsplit("/", 1)[1]
        finally:
            pool.submit(asyncio.run, drop_postgres_database(url)).result(timeout=60)
