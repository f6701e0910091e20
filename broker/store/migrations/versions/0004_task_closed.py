"""Closed tasks: ``task-closed`` joins the revocation kinds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = "kind IN ('token', 'task', 'agent')"
_AFTER = "kind IN ('token', 'task', 'agent', 'task-closed')"


def _kinds(condition: str) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table (env.py turns it on).
    with op.batch_alter_table("revocations", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint("ck_revocations_kind", type_="check")
        batch.create_check_constraint(op.f("ck_revocations_kind"), condition)


def upgrade() -> None:
    _kinds(_AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM revocations WHERE kind = 'task-closed'")
    _kinds(_BEFORE)
