"""Alembic environment for the broker's store; run by `SqlStore.migrate()`.

The caller hands over an open synchronous connection (from ``AsyncConnection.run_sync``) in
``config.attributes["connection"]``, already inside the transaction the caller commits.
"""

from __future__ import annotations

from alembic import context

from broker.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the broker's migrations through SqlStore.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
