from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

from broker.store import SqlStore, open_store
from broker.store.tables import Base


async def test_migrate_creates_every_table_and_a_second_run_changes_nothing(
    store_url: str,
) -> None:
    store = open_store(store_url)
    try:
        assert await store.schema_revision() is None
        await store.migrate()
        first = await store.schema_revision()
        await store.migrate()
        assert await store.schema_revision() == first == "0004"
        async with store._engine.connect() as conn:  # pyright: ignore[reportPrivateUsage]
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
    finally:
        await store.aclose()


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


async def test_the_hand_written_migration_matches_the_declared_tables(store: SqlStore) -> None:
    async with store._engine.connect() as conn:  # pyright: ignore[reportPrivateUsage]
        diff = await conn.run_sync(_diff)
    assert diff == []
