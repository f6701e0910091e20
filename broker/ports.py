"""Protocols the shell depends on: the Store and the Clock. No implementation lives here.

The store returns core values (`broker.core.*`), never ORM rows. Every method may raise
`StoreUnavailable` (fail closed) and the lookups raise `NotFound` where documented.
`broker.store.SqlStore` implements it on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from broker.core.identity import AdminRole, AdminToken, Agent, AgentStatus
from broker.core.revocation import IssuedToken, Revocation, RevocationKind

__all__ = ["Clock", "SigningKeyRecord", "Store", "SystemClock"]


class Clock(Protocol):
    def now(self) -> datetime:
        """An aware UTC datetime."""
        ...


class SystemClock:
    def now(self) -> datetime:
        from datetime import UTC

        return datetime.now(UTC)


class SigningKeyRecord(Protocol):
    kid: str
    public_jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None


class Store(Protocol):
    """Durable state. Agents, admin tokens, signing keys, issued tokens and revocations.

    Later rooms add connectors and tool pins, approvals, budgets, sessions and events.
    """

    async def migrate(self) -> None:
        """Apply Alembic migrations up to head (run by `broker init` and `broker serve`)."""
        ...

    async def aclose(self) -> None: ...

    # agents
    async def create_agent(self, agent: Agent, *, secret_hash: str | None) -> None:
        """Raises `broker.errors.StoreError` subclass ``Conflict``-style error on a taken name."""
        ...

    async def get_agent(self, agent_id: str) -> Agent:
        """Raises NotFound."""
        ...

    async def find_agent(self, name_or_id: str) -> Agent:
        """By id or by name. Raises NotFound."""
        ...

    async def list_agents(self) -> Sequence[Agent]: ...

    async def agent_secret_hash(self, agent_id: str) -> str | None: ...

    async def set_agent_status(
        self, agent_id: str, status: AgentStatus, *, reason: str, actor: str, at: datetime
    ) -> Agent:
        """Raises NotFound. Leaving ``active`` also writes an agent-wide revocation at ``at``."""
        ...

    # admin tokens
    async def create_admin_token(self, token: AdminToken, *, secret_hash: str) -> None: ...

    async def get_admin_token(self, token_id: str) -> tuple[AdminToken, str]:
        """The record and its secret hash. Raises NotFound."""
        ...

    # signing keys (public half; private keys live in files under tokens.keys_dir)
    async def add_signing_key(self, kid: str, public_jwk: dict[str, Any], at: datetime) -> None: ...

    async def list_signing_keys(self) -> Sequence[SigningKeyRecord]: ...

    async def retire_signing_key(self, kid: str, at: datetime) -> None: ...

    # issued tokens and revocations
    async def record_token(self, token: IssuedToken) -> None: ...

    async def get_token(self, jti: str) -> IssuedToken:
        """Raises NotFound."""
        ...

    async def list_tokens(
        self,
        *,
        agent_id: str | None = None,
        task_id: str | None = None,
        active_at: datetime | None = None,
    ) -> Sequence[IssuedToken]: ...

    async def revoke(
        self, kind: RevocationKind, subject: str, *, reason: str, actor: str, at: datetime
    ) -> Revocation: ...

    async def revocations_since(self, seq: int) -> Sequence[Revocation]:
        """Revocations with ``seq`` greater than the one given, oldest first."""
        ...

    async def agent_statuses_since(
        self, at: datetime
    ) -> Sequence[tuple[str, AgentStatus, datetime]]:
        """(agent id, status, changed_at) for agents whose status changed after ``at``."""
        ...


def role_allows(role: AdminRole, needed: AdminRole) -> bool:
    """admin ⊇ approver ⊇ reviewer."""
    order = [AdminRole.REVIEWER, AdminRole.APPROVER, AdminRole.ADMIN]
    return order.index(role) >= order.index(needed)
