"""SqlStore: `broker.ports.Store` over SQLAlchemy async, SQLite by default, PostgreSQL by URL.

Rows never leave this module: every method returns core values. One session per operation with
an explicit commit. Every database or driver failure becomes `StoreUnavailable` (cause chained),
a missing row `NotFound`, a duplicate or a broken chain `Conflict`.

SQLite: every connection gets WAL, ``synchronous=FULL``, ``foreign_keys=ON`` and a busy timeout;
the driver's implicit transactions are replaced by our own ``BEGIN`` (``BEGIN IMMEDIATE`` for
writes, so read-then-write transactions queue on the busy timeout instead of failing on a lock
upgrade). PostgreSQL: revocations are serialised by a transaction-level advisory lock so their
``seq`` order is also their commit order, and each one is announced with ``NOTIFY``.

Event appends (two per tool call, each awaited until durable) take a faster road: a connection
of their own in `broker.store.appender`, falling back to the checked path here only to name a
conflict.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import ColumnElement, Connection, delete, event, func, insert, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from broker.core.approvals import (
    Approval,
    ApprovalKind,
    ApprovalRefused,
    ApprovalStatus,
    Problem,
)
from broker.core.approvals import consume as consume_approval
from broker.core.approvals import decide as decide_approval
from broker.core.approvals import expire as expire_approval
from broker.core.identity import AdminRole, AdminToken, Agent, AgentStatus
from broker.core.pinning import PinStatus, ToolPin
from broker.core.recording import RecordedEvent, SessionRecord
from broker.core.revocation import IssuedToken, Revocation, RevocationKind
from broker.errors import NotFound, StoreError, StoreUnavailable
from broker.ports import ReviewLoginRecord, SigningKeyRecord, StoredConnector
from broker.store.appender import Advance, PreEncoded, open_appender
from broker.store.errors import Conflict
from broker.store.tables import (
    AdminTokenRow,
    AgentRow,
    ApprovalRow,
    AssertionJtiRow,
    ConnectorRow,
    EventRow,
    IssuedTokenRow,
    ReviewLoginRow,
    RevocationRow,
    SessionRow,
    SigningKeyRow,
    TokenBudgetRow,
    ToolPinRow,
)

__all__ = ["REVOCATION_CHANNEL", "SqlStore", "open_store"]

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
REVOCATION_CHANNEL = "broker_revocations"
"""PostgreSQL NOTIFY channel; the payload is the new revocation's seq."""
SQLITE_BUSY_TIMEOUT_MS = 10_000
_POSTGRES_CONNECT_ARGS = {"timeout": 10, "command_timeout": 30}
_REVOCATION_LOCK = 0x6272_6F6B  # advisory lock id serialising revocation inserts
_MIGRATION_LOCK = 0x6272_6F6D  # advisory lock id serialising migrations of replicas
_WRITE = "broker_write"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # raised raw by the appender's driver connection
    OSError,
    TimeoutError,
)


def open_store(url: str, *, pool_size: int = 5, max_overflow: int = 10) -> SqlStore:
    """Create a store for ``url`` (``sqlite+aiosqlite:///PATH`` or ``postgresql+asyncpg://...``).

    Connects lazily: nothing touches the database until the first operation.
    """
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_timeout": 10}
    if url.startswith("sqlite"):
        if ":memory:" not in url and url.rstrip("/") != "sqlite+aiosqlite:":
            options |= {"pool_size": pool_size, "max_overflow": max_overflow}
        options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    else:
        options |= {
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "connect_args": dict(_POSTGRES_CONNECT_ARGS),
        }
    engine = create_async_engine(url, **options)
    return SqlStore(engine)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transactions out of the driver's hands (see _sqlite_begin); PRAGMAs need autocommit.
    dbapi_connection.isolation_level = None
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()
    except BaseException:
        # The pool does not close a connection its connect hook failed on; aiosqlite's worker
        # thread would outlive the event loop.
        dbapi_connection.close()
        raise


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class SqlStore:
    """`broker.ports.Store` on an async SQLAlchemy engine. Build it with `open_store`.

    Event appends, the recorder's hot path, go through an appender holding a connection of its
    own (`broker.store.appender`); the ORM path below remains for what it cannot do.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._postgres = engine.dialect.name == "postgresql"
        if self._sqlite:
            event.listen(engine.sync_engine, "connect", _sqlite_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
        self._read = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        self._write = async_sessionmaker(
            engine.execution_options(**{_WRITE: True}), expire_on_commit=False, autoflush=False
        )
        self._appender = open_appender(
            engine,
            sqlite_setup=lambda conn: _sqlite_connect(conn, None),
            sqlite_timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            postgres_connect_args=_POSTGRES_CONNECT_ARGS,
        )

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    async def aclose(self) -> None:
        """Close the appender's connection and every pooled connection."""
        try:
            if self._appender is not None:
                await self._appender.aclose()
        finally:
            await self._engine.dispose()

    @asynccontextmanager
    async def _tx(self, *, write: bool, conflict: str = "") -> AsyncIterator[AsyncSession]:
        """One session, one transaction, committed explicitly; errors mapped to the tree."""
        maker = self._write if write else self._read
        with self._translated(conflict):
            async with maker() as session:
                yield session
                await session.commit()

    @contextmanager
    def _translated(self, conflict: str = "") -> Iterator[None]:
        """Map database and driver errors onto the tree in `broker.errors`."""
        try:
            yield
        except sa_exc.IntegrityError as exc:
            raise Conflict(conflict or "the write breaks a uniqueness or reference rule") from exc
        except _UNAVAILABLE as exc:
            logger.warning("store operation failed", extra={"error_type": type(exc).__name__})
            raise StoreUnavailable(
                f"the {self.dialect} store cannot be read or written ({type(exc).__name__})"
            ) from exc
        except sa_exc.StatementError as exc:
            # A value refused while binding (a naive datetime): the caller's bug, not the store's.
            if isinstance(exc.orig, ValueError):
                raise exc.orig from exc
            raise

    # schema

    async def migrate(self) -> None:
        """Apply the packaged Alembic migrations up to head; nothing happens when up to date.

        Raises:
            StoreUnavailable: the database cannot be reached or written.
            StoreError: the database is at a revision this broker does not know.
        """
        try:
            async with self._engine.execution_options(**{_WRITE: True}).begin() as conn:
                if self._postgres:
                    await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                await conn.run_sync(_upgrade_to_head)
        except CommandError as exc:
            raise StoreError(f"cannot migrate the store: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"the {self.dialect} store cannot be migrated ({type(exc).__name__})"
            ) from exc

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None before the first migration)."""
        try:
            async with self._engine.connect() as conn:
                return await conn.run_sync(_current_revision)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"the {self.dialect} store cannot be read") from exc

    # agents

    async def create_agent(self, agent: Agent, *, secret_hash: str | None) -> None:
        row = AgentRow(
            id=agent.id,
            name=agent.name,
            owner=agent.owner,
            status=agent.status.value,
            allowed_scopes=list(agent.allowed_scopes),
            max_ttl_seconds=agent.max_ttl_seconds,
            auth_method=agent.auth_method,
            public_jwk=agent.public_jwk,
            max_delegation_depth=agent.max_delegation_depth,
            status_reason=agent.status_reason,
            status_changed_at=agent.created_at,
            created_at=agent.created_at,
            secret_hash=secret_hash,
        )
        async with self._tx(write=True, conflict=f"agent {agent.name!r} already exists") as s:
            s.add(row)

    async def get_agent(self, agent_id: str) -> Agent:
        async with self._tx(write=False) as s:
            row = await s.get(AgentRow, agent_id)
        if row is None:
            raise NotFound(f"no agent with id {agent_id!r}")
        return _agent(row)

    async def find_agent(self, name_or_id: str) -> Agent:
        query = select(AgentRow).where(or_(AgentRow.id == name_or_id, AgentRow.name == name_or_id))
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        if not rows:
            raise NotFound(f"no agent with id or name {name_or_id!r}")
        by_id = [r for r in rows if r.id == name_or_id]
        return _agent(by_id[0] if by_id else rows[0])

    async def list_agents(self) -> Sequence[Agent]:
        async with self._tx(write=False) as s:
            rows = (await s.scalars(select(AgentRow).order_by(AgentRow.name))).all()
        return [_agent(r) for r in rows]

    async def agent_secret_hash(self, agent_id: str) -> str | None:
        query = select(AgentRow.secret_hash).where(AgentRow.id == agent_id)
        async with self._tx(write=False) as s:
            found = (await s.execute(query)).one_or_none()
        if found is None:
            raise NotFound(f"no agent with id {agent_id!r}")
        return found[0]

    async def set_agent_secret_hash(self, agent_id: str, secret_hash: str | None) -> None:
        query = (
            update(AgentRow)
            .where(AgentRow.id == agent_id)
            .values(secret_hash=secret_hash)
            .returning(AgentRow.id)
        )
        async with self._tx(write=True) as s:
            if (await s.execute(query)).one_or_none() is None:
                raise NotFound(f"no agent with id {agent_id!r}")

    async def set_agent_status(
        self, agent_id: str, status: AgentStatus, *, reason: str, actor: str, at: datetime
    ) -> Agent:
        async with self._tx(write=True) as s:
            row = await s.get(AgentRow, agent_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no agent with id {agent_id!r}")
            previous = row.status
            row.status = status.value
            row.status_reason = reason
            row.status_changed_at = at
            if status is not AgentStatus.ACTIVE and previous != status.value:
                await self._insert_revocation(s, RevocationKind.AGENT, agent_id, reason, actor, at)
            agent = _agent(row)
        return agent

    async def agent_statuses_since(
        self, at: datetime
    ) -> Sequence[tuple[str, AgentStatus, datetime]]:
        query = (
            select(AgentRow.id, AgentRow.status, AgentRow.status_changed_at)
            .where(AgentRow.status_changed_at > at)
            .order_by(AgentRow.status_changed_at, AgentRow.id)
        )
        async with self._tx(write=False) as s:
            rows = (await s.execute(query)).all()
        return [(r[0], AgentStatus(r[1]), r[2]) for r in rows]

    # admin tokens

    async def create_admin_token(self, token: AdminToken, *, secret_hash: str) -> None:
        row = AdminTokenRow(
            id=token.id,
            name=token.name,
            role=token.role.value,
            secret_hash=secret_hash,
            created_at=token.created_at,
            revoked_at=token.revoked_at,
        )
        async with self._tx(write=True, conflict=f"admin token {token.id!r} already exists") as s:
            s.add(row)

    async def get_admin_token(self, token_id: str) -> tuple[AdminToken, str]:
        async with self._tx(write=False) as s:
            row = await s.get(AdminTokenRow, token_id)
        if row is None:
            raise NotFound(f"no admin token with id {token_id!r}")
        return _admin_token(row), row.secret_hash

    async def list_admin_tokens(self) -> Sequence[AdminToken]:
        query = select(AdminTokenRow).order_by(AdminTokenRow.created_at, AdminTokenRow.id)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_admin_token(r) for r in rows]

    async def revoke_admin_token(self, token_id: str, at: datetime) -> AdminToken:
        async with self._tx(write=True) as s:
            row = await s.get(AdminTokenRow, token_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no admin token with id {token_id!r}")
            if row.revoked_at is None:
                row.revoked_at = at
            token = _admin_token(row)
        return token

    # review-page logins

    async def create_review_login(self, login: ReviewLoginRecord, *, keep: int) -> None:
        row = ReviewLoginRow(
            id_hash=login.id_hash,
            token_id=login.token_id,
            created_at=login.created_at,
            last_seen=login.last_seen,
        )
        count = select(func.count()).select_from(ReviewLoginRow)
        newest = (
            select(ReviewLoginRow.id_hash)
            .order_by(ReviewLoginRow.last_seen.desc(), ReviewLoginRow.id_hash)
            .limit(keep)
        )
        async with self._tx(write=True, conflict="that review login already exists") as s:
            s.add(row)
            await s.flush()
            if (await s.scalar(count) or 0) > keep:
                await s.execute(
                    delete(ReviewLoginRow).where(ReviewLoginRow.id_hash.not_in(newest)),
                    execution_options={"synchronize_session": False},
                )

    async def get_review_login(self, id_hash: str) -> ReviewLoginRecord:
        async with self._tx(write=False) as s:
            row = await s.get(ReviewLoginRow, id_hash)
        if row is None:
            raise NotFound("no such review login")
        return ReviewLoginRecord(
            id_hash=row.id_hash,
            token_id=row.token_id,
            created_at=row.created_at,
            last_seen=row.last_seen,
        )

    async def touch_review_login(self, id_hash: str, at: datetime) -> None:
        query = (
            update(ReviewLoginRow)
            .where(ReviewLoginRow.id_hash == id_hash)
            .values(last_seen=at)
            .returning(ReviewLoginRow.id_hash)
        )
        async with self._tx(write=True) as s:
            if (await s.execute(query)).one_or_none() is None:
                raise NotFound("no such review login")

    async def delete_review_login(self, id_hash: str) -> bool:
        query = (
            delete(ReviewLoginRow)
            .where(ReviewLoginRow.id_hash == id_hash)
            .returning(ReviewLoginRow.id_hash)
        )
        async with self._tx(write=True) as s:
            gone = (await s.execute(query)).all()
        return bool(gone)

    async def delete_review_logins_of(self, token_id: str) -> int:
        query = (
            delete(ReviewLoginRow)
            .where(ReviewLoginRow.token_id == token_id)
            .returning(ReviewLoginRow.id_hash)
        )
        async with self._tx(write=True) as s:
            gone = (await s.execute(query)).all()
        return len(gone)

    async def prune_review_logins(self, *, seen_before: datetime, created_before: datetime) -> int:
        query = (
            delete(ReviewLoginRow)
            .where(
                or_(
                    ReviewLoginRow.last_seen < seen_before,
                    ReviewLoginRow.created_at < created_before,
                )
            )
            .returning(ReviewLoginRow.id_hash)
        )
        async with self._tx(write=True) as s:
            gone = (await s.execute(query)).all()
        return len(gone)

    # signing keys

    async def add_signing_key(self, kid: str, public_jwk: dict[str, Any], at: datetime) -> None:
        row = SigningKeyRow(kid=kid, public_jwk=dict(public_jwk), created_at=at, retired_at=None)
        async with self._tx(write=True, conflict=f"signing key {kid!r} already exists") as s:
            s.add(row)

    async def list_signing_keys(self) -> Sequence[SigningKeyRecord]:
        query = select(SigningKeyRow).order_by(SigningKeyRow.created_at, SigningKeyRow.kid)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [
            SigningKeyRecord(
                kid=r.kid, public_jwk=r.public_jwk, created_at=r.created_at, retired_at=r.retired_at
            )
            for r in rows
        ]

    async def retire_signing_key(self, kid: str, at: datetime) -> None:
        query = (
            update(SigningKeyRow)
            .where(SigningKeyRow.kid == kid)
            .values(retired_at=func.coalesce(SigningKeyRow.retired_at, at))
            .returning(SigningKeyRow.kid)
        )
        async with self._tx(write=True) as s:
            if (await s.execute(query)).one_or_none() is None:
                raise NotFound(f"no signing key with kid {kid!r}")

    # issued tokens and revocations

    async def record_token(self, token: IssuedToken) -> None:
        row = IssuedTokenRow(
            jti=token.jti,
            agent_id=token.agent_id,
            task_id=token.task_id,
            purpose=token.purpose,
            scopes=list(token.scopes),
            issued_at=token.issued_at,
            expires_at=token.expires_at,
            parent_jti=token.parent_jti,
            chain=list(token.chain),
            budget=token.budget,
        )
        conflict = f"token {token.jti!r} already recorded or agent {token.agent_id!r} unknown"
        async with self._tx(write=True, conflict=conflict) as s:
            s.add(row)

    async def get_token(self, jti: str) -> IssuedToken:
        async with self._tx(write=False) as s:
            row = await s.get(IssuedTokenRow, jti)
        if row is None:
            raise NotFound(f"no token with jti {jti!r}")
        return _token(row)

    async def list_tokens(
        self,
        *,
        agent_id: str | None = None,
        task_id: str | None = None,
        active_at: datetime | None = None,
    ) -> Sequence[IssuedToken]:
        query = select(IssuedTokenRow).order_by(IssuedTokenRow.issued_at, IssuedTokenRow.jti)
        if agent_id is not None:
            query = query.where(IssuedTokenRow.agent_id == agent_id)
        if task_id is not None:
            query = query.where(IssuedTokenRow.task_id == task_id)
        if active_at is not None:
            query = query.where(
                IssuedTokenRow.issued_at <= active_at, IssuedTokenRow.expires_at > active_at
            )
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_token(r) for r in rows]

    async def revoke(
        self, kind: RevocationKind, subject: str, *, reason: str, actor: str, at: datetime
    ) -> Revocation:
        async with self._tx(write=True) as s:
            revocation = await self._insert_revocation(s, kind, subject, reason, actor, at)
        return revocation

    async def _insert_revocation(
        self,
        s: AsyncSession,
        kind: RevocationKind,
        subject: str,
        reason: str,
        actor: str,
        at: datetime,
    ) -> Revocation:
        if self._postgres:
            # A sequence hands out numbers at insert time, not commit time: without the lock a
            # replica could read seq n+1 committed before n and never ask for n again.
            await s.execute(select(func.pg_advisory_xact_lock(_REVOCATION_LOCK)))
        query = (
            insert(RevocationRow)
            .values(kind=kind.value, subject=subject, at=at, reason=reason, actor=actor)
            .returning(RevocationRow.seq)
        )
        seq = (await s.execute(query)).scalar_one()
        if self._postgres:
            await s.execute(select(func.pg_notify(REVOCATION_CHANNEL, str(seq))))
        return Revocation(seq=seq, kind=kind, subject=subject, at=at, reason=reason, actor=actor)

    async def revocations_since(self, seq: int) -> Sequence[Revocation]:
        query = select(RevocationRow).where(RevocationRow.seq > seq).order_by(RevocationRow.seq)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [
            Revocation(
                seq=r.seq,
                kind=RevocationKind(r.kind),
                subject=r.subject,
                at=r.at,
                reason=r.reason,
                actor=r.actor,
            )
            for r in rows
        ]

    # budgets and client-assertion jtis (hot path: one statement each)

    async def consume_budget(self, jti: str, limit: int) -> int | None:
        if limit < 1:
            return None
        dialect_insert = pg_insert if self._postgres else sqlite_insert
        query = (
            dialect_insert(TokenBudgetRow)
            .values(jti=jti, used=1)
            .on_conflict_do_update(
                index_elements=[TokenBudgetRow.jti],
                set_={"used": TokenBudgetRow.used + 1},
                where=TokenBudgetRow.used < limit,
            )
            .returning(TokenBudgetRow.used)
        )
        async with self._tx(write=True) as s:
            used = (await s.execute(query)).scalar_one_or_none()
        return None if used is None else limit - used

    async def remember_assertion_jti(self, jti: str, expires_at: datetime) -> bool:
        dialect_insert = pg_insert if self._postgres else sqlite_insert
        query = (
            dialect_insert(AssertionJtiRow)
            .values(jti=jti, expires_at=expires_at)
            .on_conflict_do_nothing(index_elements=[AssertionJtiRow.jti])
            .returning(AssertionJtiRow.jti)
        )
        async with self._tx(write=True) as s:
            inserted = (await s.execute(query)).scalar_one_or_none()
        return inserted is not None

    async def forget_assertion_jtis(self, before: datetime) -> int:
        query = (
            delete(AssertionJtiRow)
            .where(AssertionJtiRow.expires_at < before)
            .returning(AssertionJtiRow.jti)
        )
        async with self._tx(write=True) as s:
            gone = (await s.execute(query)).all()
        return len(gone)

    # connectors added at runtime

    async def add_connector(self, connector: StoredConnector) -> None:
        row = ConnectorRow(
            id=connector.id,
            kind=connector.kind,
            spec=dict(connector.spec),
            created_at=connector.created_at,
            created_by=connector.created_by,
        )
        conflict = f"connector {connector.id!r} already exists or kind {connector.kind!r} unknown"
        async with self._tx(write=True, conflict=conflict) as s:
            s.add(row)

    async def list_connectors(self) -> Sequence[StoredConnector]:
        async with self._tx(write=False) as s:
            rows = (await s.scalars(select(ConnectorRow).order_by(ConnectorRow.id))).all()
        return [_connector(r) for r in rows]

    async def get_connector(self, connector_id: str) -> StoredConnector:
        async with self._tx(write=False) as s:
            row = await s.get(ConnectorRow, connector_id)
        if row is None:
            raise NotFound(f"no connector with id {connector_id!r}")
        return _connector(row)

    async def remove_connector(self, connector_id: str) -> None:
        query = delete(ConnectorRow).where(ConnectorRow.id == connector_id)
        async with self._tx(write=True) as s:
            gone = (await s.execute(query.returning(ConnectorRow.id))).all()
            if not gone:
                raise NotFound(f"no connector with id {connector_id!r}")
            await s.execute(delete(ToolPinRow).where(ToolPinRow.connector_id == connector_id))

    # tool pins

    async def get_pins(self, connector_id: str) -> Sequence[ToolPin]:
        query = (
            select(ToolPinRow)
            .where(ToolPinRow.connector_id == connector_id)
            .order_by(ToolPinRow.tool_name)
        )
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_pin(r) for r in rows]

    async def list_pins(self, status: PinStatus | None = None) -> Sequence[ToolPin]:
        query = select(ToolPinRow).order_by(ToolPinRow.connector_id, ToolPinRow.tool_name)
        if status is not None:
            query = query.where(ToolPinRow.status == status.value)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_pin(r) for r in rows]

    async def upsert_seen_pin(
        self,
        connector_id: str,
        tool_name: str,
        digest: str,
        definition: Mapping[str, Any],
        at: datetime,
    ) -> ToolPin:
        dialect_insert = pg_insert if self._postgres else sqlite_insert
        # Insert-if-absent first, so replicas seeing a new tool at once do not collide.
        create = (
            dialect_insert(ToolPinRow)
            .values(
                connector_id=connector_id,
                tool_name=tool_name,
                digest=digest,
                definition=dict(definition),
                status=PinStatus.PENDING.value,
                first_seen=at,
                updated_at=at,
            )
            .on_conflict_do_nothing(index_elements=[ToolPinRow.connector_id, ToolPinRow.tool_name])
        )
        async with self._tx(write=True) as s:
            await s.execute(create)
            row = await s.get(ToolPinRow, (connector_id, tool_name), with_for_update=True)
            assert row is not None  # noqa: S101 (inserted or present in this transaction)
            if row.approved_digest is None:
                status = PinStatus.PENDING
            elif digest == row.approved_digest:
                status = PinStatus.APPROVED
            else:
                status = PinStatus.CHANGED
            if row.digest != digest or row.status != status.value:
                row.digest = digest
                row.definition = dict(definition)
                row.status = status.value
                row.updated_at = at
            pin = _pin(row)
        return pin

    async def approve_pin(
        self, connector_id: str, tool_name: str, digest: str, actor: str, at: datetime
    ) -> ToolPin:
        async with self._tx(write=True) as s:
            row = await s.get(ToolPinRow, (connector_id, tool_name), with_for_update=True)
            if row is None:
                raise NotFound(f"no pin for tool {tool_name!r} of connector {connector_id!r}")
            if row.digest != digest:
                raise Conflict(
                    f"tool {tool_name!r} of connector {connector_id!r} changed since it was "
                    f"shown: expected digest {digest[:12]}, current {row.digest[:12]}"
                )
            row.status = PinStatus.APPROVED.value
            row.approved_digest = row.digest
            row.approved_definition = row.definition
            row.approved_at = at
            row.approved_by = actor
            row.updated_at = at
            pin = _pin(row)
        return pin

    # sessions and events

    async def open_session(self, session: SessionRecord) -> None:
        row = SessionRow(
            id=session.id,
            agent_id=session.agent_id,
            token_jti=session.token_jti,
            task_id=session.task_id,
            protocol_version=session.protocol_version,
            transport=session.transport,
            client_info=dict(session.client_info),
            started_at=session.started_at,
            ended_at=session.ended_at,
            head_hash=session.head_hash,
            event_count=0,
            last_hash=None,
            flags=list(session.flags),
            flagged=bool(session.flags),
        )
        async with self._tx(write=True, conflict=f"session {session.id!r} already exists") as s:
            s.add(row)

    async def append_events(
        self, events: Sequence[RecordedEvent], *, durable: bool = True, alone: bool = False
    ) -> None:
        if not events:
            return
        by_session: dict[str, list[RecordedEvent]] = {}
        for e in events:
            by_session.setdefault(e.session_id, []).append(e)
        for session_id, chain in by_session.items():
            _check_contiguous(session_id, chain)
        conflict = "an event (session, seq) is already recorded: the chain cannot fork"
        if self._appender is not None:
            advances = [
                Advance(c[0].session_id, c[0].seq - 1, c[0].prev_hash, c[-1].seq, c[-1].hash)
                for c in by_session.values()
            ]
            with self._translated(conflict):
                rows = [_appended_values(e) for e in events]
                if await self._appender.append(advances, rows, durable=durable, alone=alone):
                    return
            # Refused as a whole: this checked path finds and names the conflict (or, had the
            # chains moved meanwhile, appends after all).
        async with self._tx(write=True, conflict=conflict) as s:
            for session_id, chain in by_session.items():
                first, last = chain[0], chain[-1]
                guard: list[ColumnElement[bool]] = [
                    SessionRow.id == session_id,
                    SessionRow.event_count == first.seq - 1,
                    SessionRow.ended_at.is_(None),
                ]
                if first.seq > 1:
                    guard.append(SessionRow.last_hash == first.prev_hash)
                advance = (
                    update(SessionRow)
                    .where(*guard)
                    .values(event_count=last.seq, last_hash=last.hash)
                    .returning(SessionRow.id)
                )
                if (await s.execute(advance)).one_or_none() is None:
                    raise Conflict(
                        f"events for session {session_id!r} from seq {first.seq} do not continue "
                        "its chain (unknown or sealed session, gap, fork or wrong prev_hash)"
                    )
            await s.execute(insert(EventRow), [_event_values(e) for e in events])

    async def session_head(self, session_id: str) -> tuple[int, str] | None:
        query = select(SessionRow.event_count, SessionRow.last_hash).where(
            SessionRow.id == session_id
        )
        async with self._tx(write=False) as s:
            found = (await s.execute(query)).one_or_none()
        if found is None:
            raise NotFound(f"no session with id {session_id!r}")
        count, last_hash = found
        if count == 0 or last_hash is None:
            return None
        return count, last_hash

    async def close_session(self, session_id: str, ended_at: datetime, head_hash: str) -> None:
        async with self._tx(write=True) as s:
            row = await s.get(SessionRow, session_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no session with id {session_id!r}")
            if row.ended_at is not None:
                if row.head_hash == head_hash:
                    return
                raise Conflict(f"session {session_id!r} is already sealed with another head")
            if row.event_count and row.last_hash != head_hash:
                raise Conflict(f"head hash for session {session_id!r} is not its last event's")
            row.ended_at = ended_at
            row.head_hash = head_hash

    async def get_session(self, session_id: str) -> SessionRecord:
        async with self._tx(write=False) as s:
            row = await s.get(SessionRow, session_id)
        if row is None:
            raise NotFound(f"no session with id {session_id!r}")
        return _session(row)

    async def list_sessions(
        self,
        *,
        agent_id: str | None = None,
        task_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        flagged: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Sequence[SessionRecord]:
        query = select(SessionRow)
        if agent_id is not None:
            query = query.where(SessionRow.agent_id == agent_id)
        if task_id is not None:
            query = query.where(SessionRow.task_id == task_id)
        if since is not None:
            query = query.where(SessionRow.started_at >= since)
        if until is not None:
            query = query.where(SessionRow.started_at < until)
        if flagged is not None:
            query = query.where(SessionRow.flagged == flagged)
        query = query.order_by(SessionRow.started_at.desc(), SessionRow.id.desc())
        query = query.limit(limit).offset(offset)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_session(r) for r in rows]

    async def session_events(
        self, session_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> Sequence[RecordedEvent]:
        query = (
            select(EventRow)
            .where(EventRow.session_id == session_id, EventRow.seq > after_seq)
            .order_by(EventRow.seq)
        )
        if limit is not None:
            query = query.limit(limit)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_event(r) for r in rows]

    async def find_event_by_decision(self, decision_id: str) -> RecordedEvent:
        """The ``decision`` event with this id; else the first event carrying it.

        Detector signals are recorded under the decision id just before the decision itself, so
        the decision event is preferred; ids that name no decision (admin actions) still resolve.
        """
        query = (
            select(EventRow)
            .where(EventRow.decision_id == decision_id)
            .order_by((EventRow.kind != "decision"), EventRow.at, EventRow.seq)
            .limit(1)
        )
        async with self._tx(write=False) as s:
            row = (await s.scalars(query)).one_or_none()
        if row is None:
            raise NotFound(f"no event with decision id {decision_id!r}")
        return _event(row)

    async def flag_session(self, session_id: str, flag: str) -> SessionRecord:
        async with self._tx(write=True) as s:
            row = await s.get(SessionRow, session_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no session with id {session_id!r}")
            if flag not in row.flags:
                row.flags = [*row.flags, flag]
                row.flagged = True
            record = _session(row)
        return record

    # human approvals

    async def create_approval(self, approval: Approval) -> None:
        row = ApprovalRow(id=approval.id, **_approval_values(approval))
        async with self._tx(write=True, conflict=f"approval {approval.id!r} already exists") as s:
            s.add(row)

    async def get_approval(self, approval_id: str) -> Approval:
        async with self._tx(write=False) as s:
            row = await s.get(ApprovalRow, approval_id)
        if row is None:
            raise NotFound(f"no approval with id {approval_id!r}")
        return _approval(row)

    async def list_approvals(
        self,
        *,
        status: ApprovalStatus | None = None,
        kind: ApprovalKind | None = None,
        agent_id: str | None = None,
        limit: int = 100,
    ) -> Sequence[Approval]:
        query = select(ApprovalRow).order_by(ApprovalRow.created_at, ApprovalRow.id).limit(limit)
        if status is not None:
            query = query.where(ApprovalRow.status == status.value)
        if kind is not None:
            query = query.where(ApprovalRow.kind == kind.value)
        if agent_id is not None:
            query = query.where(ApprovalRow.agent_id == agent_id)
        async with self._tx(write=False) as s:
            rows = (await s.scalars(query)).all()
        return [_approval(r) for r in rows]

    async def _transition(
        self, approval_id: str, step: Callable[[Approval], Approval], *, keep_expiry: bool
    ) -> Approval:
        """Apply a pure `broker.core.approvals` step to the row, locked, in one transaction.

        With ``keep_expiry``, a refusal because the approval expired still records it as
        expired before the refusal is raised.
        """
        refused: ApprovalRefused | None = None
        async with self._tx(write=True) as s:
            row = await s.get(ApprovalRow, approval_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no approval with id {approval_id!r}")
            current = _approval(row)
            try:
                after = step(current)
            except ApprovalRefused as exc:
                if not (keep_expiry and exc.problem is Problem.EXPIRED):
                    raise
                refused, after = exc, current
                if current.status is ApprovalStatus.PENDING:
                    after = replace(current, status=ApprovalStatus.EXPIRED)
            for name, value in _approval_values(after).items():
                setattr(row, name, value)
        if refused is not None:
            raise refused
        return after

    async def decide_approval(
        self, approval_id: str, *, approve: bool, actor: str, reason: str, at: datetime
    ) -> Approval:
        return await self._transition(
            approval_id,
            lambda a: decide_approval(a, approve=approve, actor=actor, reason=reason, now=at),
            keep_expiry=True,
        )

    async def consume_approval(self, approval_id: str, binding: str, *, at: datetime) -> Approval:
        return await self._transition(
            approval_id, lambda a: consume_approval(a, binding, now=at), keep_expiry=True
        )

    async def expire_approval(self, approval_id: str, *, at: datetime) -> Approval:
        return await self._transition(
            approval_id, lambda a: expire_approval(a, now=at), keep_expiry=False
        )

    async def expire_approvals(self, *, at: datetime) -> int:
        query = (
            update(ApprovalRow)
            .where(ApprovalRow.status == ApprovalStatus.PENDING.value, ApprovalRow.expires_at <= at)
            .values(status=ApprovalStatus.EXPIRED.value, decided_at=at)
            .returning(ApprovalRow.id)
        )
        async with self._tx(write=True) as s:
            gone = (await s.execute(query)).all()
        return len(gone)


def _upgrade_to_head(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _check_contiguous(session_id: str, chain: Sequence[RecordedEvent]) -> None:
    for before, after in pairwise(chain):
        if after.seq != before.seq + 1 or after.prev_hash != before.hash:
            raise Conflict(
                f"events for session {session_id!r} are not one gapless chain "
                f"(seq {before.seq} then {after.seq})"
            )


def _agent(row: AgentRow) -> Agent:
    auth_method = "private_key_jwt" if row.auth_method == "private_key_jwt" else "client_secret"
    return Agent(
        id=row.id,
        name=row.name,
        owner=row.owner,
        status=AgentStatus(row.status),
        allowed_scopes=tuple(row.allowed_scopes),
        max_ttl_seconds=row.max_ttl_seconds,
        auth_method=auth_method,
        created_at=row.created_at,
        public_jwk=row.public_jwk,
        max_delegation_depth=row.max_delegation_depth,
        status_reason=row.status_reason,
    )


def _admin_token(row: AdminTokenRow) -> AdminToken:
    return AdminToken(
        id=row.id,
        name=row.name,
        role=AdminRole(row.role),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _token(row: IssuedTokenRow) -> IssuedToken:
    return IssuedToken(
        jti=row.jti,
        agent_id=row.agent_id,
        task_id=row.task_id,
        purpose=row.purpose,
        scopes=tuple(row.scopes),
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        parent_jti=row.parent_jti,
        chain=tuple(row.chain),
        budget=row.budget,
    )


def _connector(row: ConnectorRow) -> StoredConnector:
    return StoredConnector(
        id=row.id,
        kind=row.kind,
        spec=row.spec,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _pin(row: ToolPinRow) -> ToolPin:
    return ToolPin(
        connector_id=row.connector_id,
        tool_name=row.tool_name,
        digest=row.digest,
        definition=row.definition,
        status=PinStatus(row.status),
        first_seen=row.first_seen,
        updated_at=row.updated_at,
        approved_digest=row.approved_digest,
        approved_definition=row.approved_definition,
        approved_at=row.approved_at,
        approved_by=row.approved_by,
    )


def _session(row: SessionRow) -> SessionRecord:
    return SessionRecord(
        id=row.id,
        agent_id=row.agent_id,
        token_jti=row.token_jti,
        task_id=row.task_id,
        started_at=row.started_at,
        protocol_version=row.protocol_version,
        transport=row.transport,
        client_info=row.client_info,
        ended_at=row.ended_at,
        head_hash=row.head_hash,
        event_count=row.event_count,
        flags=tuple(row.flags),
    )


def _event_values(e: RecordedEvent, payload: Any = None) -> dict[str, Any]:
    """The events row of ``e``; ``payload`` replaces the payload column's value when given."""
    return {
        "session_id": e.session_id,
        "seq": e.seq,
        "at": e.at,
        "kind": e.kind,
        "decision_id": e.decision_id,
        "payload": dict(e.payload) if payload is None else payload,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    }


def _appended_values(e: RecordedEvent) -> dict[str, Any]:
    """`_event_values` for the appender: the payload as the canonical text sealing made."""
    text = e.payload_json
    return _event_values(e, None if text is None else PreEncoded(text))


def _event(row: EventRow) -> RecordedEvent:
    return RecordedEvent(
        session_id=row.session_id,
        seq=row.seq,
        at=row.at,
        kind=row.kind,
        payload=row.payload,
        prev_hash=row.prev_hash,
        hash=row.hash,
        decision_id=row.decision_id,
    )


def _approval_values(a: Approval) -> dict[str, Any]:
    return {
        "kind": a.kind.value,
        "status": a.status.value,
        "agent_id": a.agent_id,
        "client_id": a.client_id,
        "task_id": a.task_id,
        "purpose": a.purpose,
        "binding": a.binding,
        "scopes": list(a.scopes),
        "connector": a.connector,
        "tool": a.tool,
        "arguments": None if a.arguments is None else dict(a.arguments),
        "token_jti": a.token_jti,
        "decision_id": a.decision_id,
        "created_at": a.created_at,
        "expires_at": a.expires_at,
        "decided_at": a.decided_at,
        "decided_by": a.decided_by,
        "reason": a.reason,
        "consumed_at": a.consumed_at,
    }


def _approval(row: ApprovalRow) -> Approval:
    return Approval(
        id=row.id,
        kind=ApprovalKind(row.kind),
        status=ApprovalStatus(row.status),
        agent_id=row.agent_id,
        client_id=row.client_id,
        task_id=row.task_id,
        purpose=row.purpose,
        binding=row.binding,
        created_at=row.created_at,
        expires_at=row.expires_at,
        scopes=tuple(row.scopes),
        connector=row.connector,
        tool=row.tool,
        arguments=row.arguments,
        token_jti=row.token_jti,
        decision_id=row.decision_id,
        decided_at=row.decided_at,
        decided_by=row.decided_by,
        reason=row.reason,
        consumed_at=row.consumed_at,
    )
