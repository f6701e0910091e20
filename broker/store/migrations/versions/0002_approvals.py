"""Human approvals: held tool calls and pending token requests.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSONB = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
JSON_TEXT = sa.JSON()


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("binding", sa.String(64), nullable=False),
        sa.Column("scopes", JSONB, nullable=False),
        sa.Column("connector", sa.String(32), nullable=True),
        sa.Column("tool", sa.String(255), nullable=True),
        sa.Column("arguments", JSON_TEXT, nullable=True),
        sa.Column("token_jti", sa.String(128), nullable=True),
        sa.Column("decision_id", sa.String(128), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("consumed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_approvals"),
        sa.CheckConstraint("kind IN ('call', 'token')", name="ck_approvals_kind"),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'denied', 'consumed', 'expired')",
            name="ck_approvals_status",
        ),
    )
    op.create_index("ix_approvals_agent_id", "approvals", ["agent_id"])
    op.create_index("ix_approvals_created_at", "approvals", ["created_at"])
    op.create_index("ix_approvals_status_kind", "approvals", ["status", "kind"])


def downgrade() -> None:
    op.drop_table("approvals")
