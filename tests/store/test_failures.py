"""Real failures, no mocks: each must surface as StoreUnavailable with the cause chained."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from broker.errors import StoreUnavailable
from broker.store import open_store
from broker.store.testing import (
    make_agent,
    migrated_store,
    postgres_admin_url,
    sqlite_url,
    temporary_postgres_url,
)

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _replace_with_garbage(folder: Path) -> None:
    for leftover in folder.glob("broker.db*"):
        leftover.unlink()
    (folder / "broker.db").write_bytes(os.urandom(8192))


async def test_a_database_file_replaced_by_garbage_is_unavailable(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    async with migrated_store(url) as store:
        await store.create_agent(make_agent("a"), secret_hash=None)
    _replace_with_garbage(tmp_path)
    store = open_store(url)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.get_agent("ag_a")
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreUnavailable):
            await store.consume_budget("j", 5)
    finally:
        await store.aclose()


async def test_a_database_whose_directory_cannot_exist_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'not-a-dir' / 'broker.db'}")
    try:
        with pytest.raises(StoreUnavailable):
            await store.migrate()
        with pytest.raises(StoreUnavailable):
            await store.list_agents()
    finally:
        await store.aclose()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
async def test_a_database_in_an_unwritable_directory_is_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    store = open_store(sqlite_url(folder))
    try:
        with pytest.raises(StoreUnavailable):
            await store.migrate()
    finally:
        await store.aclose()
        folder.chmod(0o700)


async def test_a_store_used_before_migration_is_unavailable(tmp_path: Path) -> None:
    store = open_store(sqlite_url(tmp_path))
    try:
        with pytest.raises(StoreUnavailable):
            await store.get_agent("ag_a")
    finally:
        await store.aclose()


@pytest.mark.postgres
async def test_a_postgres_server_that_refuses_connections_is_unavailable() -> None:
    store = open_store("postgresql+asyncpg://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(StoreUnavailable):
            await store.list_agents()
    finally:
        await store.aclose()


@pytest.mark.postgres
async def test_a_postgres_database_dropped_under_the_store_is_unavailable() -> None:
    async with temporary_postgres_url() as url, migrated_store(url) as store:
        await store.create_agent(make_agent("a"), secret_hash=None)
        admin = await asyncpg.connect(postgres_admin_url())
        try:
            await admin.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        finally:
            await admin.close()
        with pytest.raises(StoreUnavailable) as caught:
            await store.get_agent("ag_a")
        assert caught.value.__cause__ is not None
