"""The schema in one place: SQLAlchemy 2 typed declarative tables. Imported only by `store/`.

Timestamps are `UTCDateTime`: aware UTC datetimes in and out on every backend (``timestamptz`` on
PostgreSQL; naive UTC text on SQLite, whose fixed-width format keeps string order equal to time
order). JSON columns are ``jsonb`` on PostgreSQL. The migrations in ``migrations/versions`` are
written by hand from these tables and must be kept in step with them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AdminTokenRow",
    "AgentRow",
    "ApprovalRow",
    "AssertionJtiRow",
    "Base",
    "ConnectorRow",
    "EventRow",
    "IssuedTokenRow",
    "ReviewLoginRow",
    "RevocationRow",
    "SessionRow",
    "SigningKeyRow",
    "TokenBudgetRow",
    "ToolPinRow",
    "JSONText",
    "JSONType",
    "UTCDateTime",
]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend; a naive datetime is refused on the way in."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("expected an aware datetime, got a naive one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
# Audit payloads and pinned definitions keep their exact JSON text (no jsonb normalisation).
JSONText = JSON()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it as a class attribute)
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[str]: JSONType,
    }


class AgentRow(Base):
    __tablename__ = "agents"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'quarantined', 'disabled')", name="status"),
        CheckConstraint("auth_method IN ('client_secret', 'private_key_jwt')", name="auth_method"),
        CheckConstraint("max_ttl_seconds > 0", name="max_ttl_positive"),
        CheckConstraint("max_delegation_depth >= 0", name="depth_non_negative"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    allowed_scopes: Mapped[list[str]]
    max_ttl_seconds: Mapped[int] = mapped_column(Integer)
    auth_method: Mapped[str] = mapped_column(String(32))
    public_jwk: Mapped[dict[str, Any] | None]
    max_delegation_depth: Mapped[int] = mapped_column(Integer)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    status_changed_at: Mapped[datetime] = mapped_column(index=True)
    created_at: Mapped[datetime]
    secret_hash: Mapped[str | None] = mapped_column(Text)


class AdminTokenRow(Base):
    __tablename__ = "admin_tokens"
    __table_args__ = (CheckConstraint("role IN ('admin', 'approver', 'reviewer')", name="role"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class ReviewLoginRow(Base):
    """A review-page login, keyed by the SHA-256 (hex) of its cookie's id; the id is not kept."""

    __tablename__ = "review_logins"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime]
    last_seen: Mapped[datetime]


class SigningKeyRow(Base):
    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(128), primary_key=True)
    public_jwk: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]


class IssuedTokenRow(Base):
    __tablename__ = "issued_tokens"

    jti: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"), index=True)
    task_id: Mapped[str] = mapped_column(String(128), index=True)
    purpose: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]]
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    parent_jti: Mapped[str | None] = mapped_column(String(128), index=True)
    chain: Mapped[list[str]]
    budget: Mapped[int | None] = mapped_column(Integer)


class TokenBudgetRow(Base):
    """Calls used so far under a token's budget; one row per jti, created by the first call."""

    __tablename__ = "token_budgets"
    __table_args__ = (CheckConstraint("used >= 0", name="used_non_negative"),)

    jti: Mapped[str] = mapped_column(String(128), primary_key=True)
    used: Mapped[int] = mapped_column(Integer)


class RevocationRow(Base):
    __tablename__ = "revocations"
    __table_args__ = (
        CheckConstraint("kind IN ('token', 'task', 'agent', 'task-closed')", name="kind"),
        Index(None, "kind", "subject"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(255))


class AssertionJtiRow(Base):
    """``jti``s of private_key_jwt client assertions already used (replay protection)."""

    __tablename__ = "client_assertion_jtis"

    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ConnectorRow(Base):
    """Connectors added at runtime (CLI, admin API); the ones in broker.toml are not stored."""

    __tablename__ = "connectors"
    __table_args__ = (CheckConstraint("kind IN ('stdio', 'http', 'native')", name="kind"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(255))


class ToolPinRow(Base):
    __tablename__ = "tool_pins"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'approved', 'changed')", name="status"),
    )

    connector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tool_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    definition: Mapped[dict[str, Any]] = mapped_column(JSONText)
    status: Mapped[str] = mapped_column(String(16), index=True)
    approved_digest: Mapped[str | None] = mapped_column(String(64))
    approved_definition: Mapped[dict[str, Any] | None] = mapped_column(JSONText)
    first_seen: Mapped[datetime]
    updated_at: Mapped[datetime]
    approved_at: Mapped[datetime | None]
    approved_by: Mapped[str | None] = mapped_column(String(255))


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (CheckConstraint("event_count >= 0", name="event_count_non_negative"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    token_jti: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(128), index=True)
    protocol_version: Mapped[str] = mapped_column(String(32))
    transport: Mapped[str] = mapped_column(String(32))
    client_info: Mapped[dict[str, Any]]
    started_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime | None]
    head_hash: Mapped[str | None] = mapped_column(String(128))
    """The seal, set when the session is closed."""
    event_count: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str | None] = mapped_column(String(128))
    """Hash of event ``event_count``: the chain's tail, checked by every append."""
    flags: Mapped[list[str]]
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)


class EventRow(Base):
    """Append-only: a row is never updated or deleted; the primary key forbids forks."""

    __tablename__ = "events"
    __table_args__ = (CheckConstraint("seq >= 1", name="seq_positive"),)

    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(64))
    decision_id: Mapped[str | None] = mapped_column(String(128), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONText)
    prev_hash: Mapped[str] = mapped_column(String(128))
    hash: Mapped[str] = mapped_column(String(128))


class ApprovalRow(Base):
    """Human approvals of held calls and pending token requests (`broker.core.approvals`)."""

    __tablename__ = "approvals"
    __table_args__ = (
        CheckConstraint("kind IN ('call', 'token')", name="kind"),
        CheckConstraint(
            "status IN ('pending', 'approved', 'denied', 'consumed', 'expired')", name="status"
        ),
        Index(None, "status", "kind"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(Text)
    binding: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]]
    connector: Mapped[str | None] = mapped_column(String(32))
    tool: Mapped[str | None] = mapped_column(String(255))
    arguments: Mapped[dict[str, Any] | None] = mapped_column(JSONText)
    """The exact canonical arguments of a held call (kept as sent: no jsonb normalisation)."""
    token_jti: Mapped[str | None] = mapped_column(String(128))
    decision_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(index=True)
    expires_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    consumed_at: Mapped[datetime | None]
