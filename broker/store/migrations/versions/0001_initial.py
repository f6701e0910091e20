"""The initial schema: identities, keys, tokens, revocations, budgets, connectors, pins, records.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSONB = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
JSON_TEXT = sa.JSON()


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("allowed_scopes", JSONB, nullable=False),
        sa.Column("max_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("auth_method", sa.String(32), nullable=False),
        sa.Column("public_jwk", JSONB, nullable=True),
        sa.Column("max_delegation_depth", sa.Integer(), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=False),
        sa.Column("status_changed_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
        sa.UniqueConstraint("name", name="uq_agents_name"),
        sa.CheckConstraint(
            "status IN ('active', 'quarantined', 'disabled')", name="ck_agents_status"
        ),
        sa.CheckConstraint(
            "auth_method IN ('client_secret', 'private_key_jwt')", name="ck_agents_auth_method"
        ),
        sa.CheckConstraint("max_ttl_seconds > 0", name="ck_agents_max_ttl_positive"),
        sa.CheckConstraint("max_delegation_depth >= 0", name="ck_agents_depth_non_negative"),
    )
    op.create_index("ix_agents_status_changed_at", "agents", ["status_changed_at"])

    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_admin_tokens"),
        sa.CheckConstraint(
            "role IN ('admin', 'approver', 'reviewer')", name="ck_admin_tokens_role"
        ),
    )

    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(128), nullable=False),
        sa.Column("public_jwk", JSONB, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("retired_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("kid", name="pk_signing_keys"),
    )

    op.create_table(
        "issued_tokens",
        sa.Column("jti", sa.String(128), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("scopes", JSONB, nullable=False),
        sa.Column("issued_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("parent_jti", sa.String(128), nullable=True),
        sa.Column("chain", JSONB, nullable=False),
        sa.Column("budget", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("jti", name="pk_issued_tokens"),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name="fk_issued_tokens_agent_id_agents"
        ),
    )
    op.create_index("ix_issued_tokens_agent_id", "issued_tokens", ["agent_id"])
    op.create_index("ix_issued_tokens_task_id", "issued_tokens", ["task_id"])
    op.create_index("ix_issued_tokens_expires_at", "issued_tokens", ["expires_at"])
    op.create_index("ix_issued_tokens_parent_jti", "issued_tokens", ["parent_jti"])

    op.create_table(
        "token_budgets",
        sa.Column("jti", sa.String(128), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("jti", name="pk_token_budgets"),
        sa.CheckConstraint("used >= 0", name="ck_token_budgets_used_non_negative"),
    )

    op.create_table(
        "revocations",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_revocations"),
        sa.CheckConstraint("kind IN ('token', 'task', 'agent')", name="ck_revocations_kind"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_revocations_kind_subject", "revocations", ["kind", "subject"])

    op.create_table(
        "client_assertion_jtis",
        sa.Column("jti", sa.String(255), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("jti", name="pk_client_assertion_jtis"),
    )
    op.create_index("ix_client_assertion_jtis_expires_at", "client_assertion_jtis", ["expires_at"])

    op.create_table(
        "connectors",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("spec", JSONB, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_connectors"),
        sa.CheckConstraint("kind IN ('stdio', 'http', 'native')", name="ck_connectors_kind"),
    )

    op.create_table(
        "tool_pins",
        sa.Column("connector_id", sa.String(32), nullable=False),
        sa.Column("tool_name", sa.String(255), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("definition", JSON_TEXT, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("approved_digest", sa.String(64), nullable=True),
        sa.Column("approved_definition", JSON_TEXT, nullable=True),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("approved_at", TS, nullable=True),
        sa.Column("approved_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("connector_id", "tool_name", name="pk_tool_pins"),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'changed')", name="ck_tool_pins_status"
        ),
    )
    op.create_index("ix_tool_pins_status", "tool_pins", ["status"])

    op.create_table(
        "sessions",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("token_jti", sa.String(128), nullable=False),
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("protocol_version", sa.String(32), nullable=False),
        sa.Column("transport", sa.String(32), nullable=False),
        sa.Column("client_info", JSONB, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("head_hash", sa.String(128), nullable=True),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(128), nullable=True),
        sa.Column("flags", JSONB, nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.CheckConstraint("event_count >= 0", name="ck_sessions_event_count_non_negative"),
    )
    op.create_index("ix_sessions_agent_id", "sessions", ["agent_id"])
    op.create_index("ix_sessions_task_id", "sessions", ["task_id"])
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"])
    op.create_index("ix_sessions_flagged", "sessions", ["flagged"])

    op.create_table(
        "events",
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("decision_id", sa.String(128), nullable=True),
        sa.Column("payload", JSON_TEXT, nullable=False),
        sa.Column("prev_hash", sa.String(128), nullable=False),
        sa.Column("hash", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("session_id", "seq", name="pk_events"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_events_session_id_sessions"
        ),
        sa.CheckConstraint("seq >= 1", name="ck_events_seq_positive"),
    )
    op.create_index("ix_events_decision_id", "events", ["decision_id"])


def downgrade() -> None:
    for table in (
        "events",
        "sessions",
        "tool_pins",
        "connectors",
        "client_assertion_jtis",
        "revocations",
        "token_budgets",
        "issued_tokens",
        "signing_keys",
        "admin_tokens",
        "agents",
    ):
        op.drop_table(table)
