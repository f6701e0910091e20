"""The store: the only package that imports SQLAlchemy. SQLite by default, PostgreSQL by URL.

``open_store(url)`` gives a `SqlStore` implementing `broker.ports.Store`; ``await
store.migrate()`` applies the packaged Alembic migrations (``migrations/versions``, written by
hand to match ``tables.py``). Rows never leave the package: callers get ``broker.core`` values.
Failures: `broker.errors.StoreUnavailable` (fail closed), `broker.errors.NotFound`, and
`Conflict` for duplicates, forks and stale approvals. ``broker.store.testing`` gives tests a
real store on both backends.
"""

from __future__ import annotations

from broker.store.errors import Conflict
from broker.store.sql import REVOCATION_CHANNEL, SqlStore, open_store

__all__ = ["REVOCATION_CHANNEL", "Conflict", "SqlStore", "open_store"]
