"""Protocols the shell depends on: the Store and the Clock. No implementation lives here.

The store returns core values (`broker.core.*`), never ORM rows. Every method may raise
`StoreUnavailable` (fail closed) and the lookups raise `NotFound` where documented.
`broker.store.SqlStore` implements it on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from broker.core.approvals import Approval, ApprovalKind, ApprovalStatus
from broker.core.identity import AdminRole, AdminToken, Agent, AgentStatus
from broker.core.pinning import PinStatus, ToolPin
from broker.core.recording import RecordedEvent, SessionRecord
from broker.core.revocation import IssuedToken, Revocation, RevocationKind

__all__ = [
    "Clock",
    "ReviewLoginRecord",
    "SigningKeyRecord",
    "Store",
    "StoredConnector",
    "SystemClock",
]


class Clock(Protocol):
    def now(self) -> datetime:
        """An aware UTC datetime."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    """The public half of a token-signing key, as the store keeps it."""

    kid: str
    public_jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredConnector:
    """A connector added at runtime (CLI or admin API); ``spec`` is its ConnectorConfig as JSON."""

    id: str
    kind: str
    spec: Mapping[str, Any]
    created_at: datetime
    created_by: str


@dataclass(frozen=True, slots=True)
class ReviewLoginRecord:
    """A review-page login as the store keeps it: ``id_hash`` is the SHA-256 (hex) of the
    cookie's session id, which is never stored."""

    id_hash: str
    token_id: str
    created_at: datetime
    last_seen: datetime


class Store(Protocol):
    """Durable state: agents, admin tokens, review-page logins, signing keys, issued tokens,
    revocations, budgets, client-assertion jtis, runtime connectors, tool pins, sessions and
    their events.

    Every datetime going in must be aware; every datetime coming out is aware UTC. Duplicates
    raise ``broker.store.errors.Conflict`` (a `StoreError`).
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

    async def agent_secret_hash(self, agent_id: str) -> str | None:
        """None for an agent without a client secret. Raises NotFound for an unknown agent."""
        ...

    async def set_agent_secret_hash(self, agent_id: str, secret_hash: str | None) -> None:
        """Replace the client-secret hash (rotation). Raises NotFound."""
        ...

    async def set_agent_status(
        self, agent_id: str, status: AgentStatus, *, reason: str, actor: str, at: datetime
    ) -> Agent:
        """Raises NotFound. Leaving ``active`` also writes an agent-wide revocation at ``at``."""
        ...

    # admin tokens
    async def create_admin_token(self, token: AdminToken, *, secret_hash: str) -> None:
        """Raises Conflict on a taken id."""
        ...

    async def get_admin_token(self, token_id: str) -> tuple[AdminToken, str]:
        """The record and its secret hash. Raises NotFound."""
        ...

    async def list_admin_tokens(self) -> Sequence[AdminToken]: ...

    async def revoke_admin_token(self, token_id: str, at: datetime) -> AdminToken:
        """Mark revoked at ``at`` (kept if already revoked). Raises NotFound."""
        ...

    # review-page logins (`broker.review.auth` holds the rules: expiry, revocation)
    async def create_review_login(self, login: ReviewLoginRecord, *, keep: int) -> None:
        """Add a login, then delete the least recently seen ones beyond the newest ``keep``.

        Raises Conflict on a taken hash.
        """
        ...

    async def get_review_login(self, id_hash: str) -> ReviewLoginRecord:
        """Raises NotFound."""
        ...

    async def touch_review_login(self, id_hash: str, at: datetime) -> None:
        """Set ``last_seen`` to ``at``. Raises NotFound (e.g. logged out meanwhile)."""
        ...

    async def delete_review_login(self, id_hash: str) -> bool:
        """Whether there was such a login."""
        ...

    async def delete_review_logins_of(self, token_id: str) -> int:
        """Delete every login of an admin token; returns how many."""
        ...

    async def prune_review_logins(self, *, seen_before: datetime, created_before: datetime) -> int:
        """Delete logins last seen before ``seen_before`` or created before ``created_before``;
        returns how many."""
        ...

    # signing keys (public half; private keys live in files under tokens.keys_dir)
    async def add_signing_key(self, kid: str, public_jwk: dict[str, Any], at: datetime) -> None:
        """Raises Conflict on a taken kid."""
        ...

    async def list_signing_keys(self) -> Sequence[SigningKeyRecord]:
        """Oldest first, retired ones included."""
        ...

    async def retire_signing_key(self, kid: str, at: datetime) -> None:
        """Raises NotFound."""
        ...

    # issued tokens and revocations
    async def record_token(self, token: IssuedToken) -> None:
        """Raises Conflict on a taken jti or an unknown agent."""
        ...

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
    ) -> Revocation:
        """Append a revocation; its ``seq`` is greater than every seq committed before it."""
        ...

    async def revocations_since(self, seq: int) -> Sequence[Revocation]:
        """Revocations with ``seq`` greater than the one given, oldest first."""
        ...

    async def agent_statuses_since(
        self, at: datetime
    ) -> Sequence[tuple[str, AgentStatus, datetime]]:
        """(agent id, status, changed_at) for agents whose status changed after ``at``."""
        ...

    # call budgets and client-assertion replay protection (hot path)
    async def consume_budget(self, jti: str, limit: int) -> int | None:
        """Use one call of ``jti``'s budget of ``limit`` calls, atomically across processes.

        Returns the calls left after this one, or None (nothing used) when exhausted.
        """
        ...

    async def remember_assertion_jti(self, jti: str, expires_at: datetime) -> bool:
        """Record a client assertion's jti; False when it was seen before (a replay)."""
        ...

    async def forget_assertion_jtis(self, before: datetime) -> int:
        """Delete remembered jtis that expired before ``before``; returns how many."""
        ...

    # connectors added at runtime
    async def add_connector(self, connector: StoredConnector) -> None:
        """Raises Conflict on a taken id."""
        ...

    async def list_connectors(self) -> Sequence[StoredConnector]: ...

    async def get_connector(self, connector_id: str) -> StoredConnector:
        """Raises NotFound."""
        ...

    async def remove_connector(self, connector_id: str) -> None:
        """Remove the connector and its tool pins (re-adding it needs new approvals).

        Raises NotFound.
        """
        ...

    # tool pins
    async def get_pins(self, connector_id: str) -> Sequence[ToolPin]: ...

    async def upsert_seen_pin(
        self,
        connector_id: str,
        tool_name: str,
        digest: str,
        definition: Mapping[str, Any],
        at: datetime,
    ) -> ToolPin:
        """Record the definition seen now: new -> pending; equal to the approved one ->
        approved; differing from the approved one -> changed (approved_* kept); pending ->
        pending with the new definition."""
        ...

    async def approve_pin(
        self, connector_id: str, tool_name: str, digest: str, actor: str, at: datetime
    ) -> ToolPin:
        """Approve the current definition if ``digest`` is still the current one.

        Raises NotFound, or Conflict when the definition changed since the admin saw it.
        """
        ...

    async def list_pins(self, status: PinStatus | None = None) -> Sequence[ToolPin]: ...

    # sessions and their append-only, hash-chained events
    async def open_session(self, session: SessionRecord) -> None:
        """Raises Conflict on a taken id."""
        ...

    async def append_events(
        self, events: Sequence[RecordedEvent], *, durable: bool = True, alone: bool = False
    ) -> None:
        """Write a batch (any sessions) in one durable transaction, or nothing.

        Each session's events must continue its chain: seqs gapless from its event count + 1,
        the first ``prev_hash`` equal to its last hash, the session still open.
        Raises Conflict when they do not (nothing written), StoreUnavailable on a DB failure.

        ``durable=False`` commits without waiting for the flush to stable storage: the batch is
        written and visible, and survives the broker process dying, but not yet a power loss.
        Both backends keep one sequential log, so the next durable commit flushes it too. A
        store may always be durable; a failure to write is raised either way.

        ``alone=True`` says the caller is the only work in progress in this process: a store
        may then wait for its flush on the calling thread (the event loop), since nothing else
        is waiting to run and handing the wait to a worker thread costs more than it frees.
        """
        ...

    async def session_head(self, session_id: str) -> tuple[int, str] | None:
        """(last seq, its hash), or None before the first event. Raises NotFound."""
        ...

    async def close_session(self, session_id: str, ended_at: datetime, head_hash: str) -> None:
        """Seal the session. Raises NotFound, or Conflict if already sealed differently or
        ``head_hash`` is not the chain's last hash."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord:
        """Raises NotFound."""
        ...

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
        """Newest first; ``since``/``until`` bound ``started_at`` (since inclusive, until
        exclusive)."""
        ...

    async def session_events(
        self, session_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> Sequence[RecordedEvent]:
        """Events with seq > ``after_seq`` in order (empty for an unknown session)."""
        ...

    async def find_event_by_decision(self, decision_id: str) -> RecordedEvent:
        """The first event carrying ``decision_id``. Raises NotFound."""
        ...

    async def flag_session(self, session_id: str, flag: str) -> SessionRecord:
        """Add ``flag`` (idempotent). Raises NotFound."""
        ...

    # human approvals (`broker.core.approvals` holds the rules; the store applies them atomically)
    async def create_approval(self, approval: Approval) -> None:
        """Raises Conflict on a taken id."""
        ...

    async def get_approval(self, approval_id: str) -> Approval:
        """As stored (see `broker.core.approvals.effective_status`). Raises NotFound."""
        ...

    async def list_approvals(
        self,
        *,
        status: ApprovalStatus | None = None,
        kind: ApprovalKind | None = None,
        agent_id: str | None = None,
        limit: int = 100,
    ) -> Sequence[Approval]:
        """Oldest first. ``status`` filters on the stored status."""
        ...

    async def decide_approval(
        self, approval_id: str, *, approve: bool, actor: str, reason: str, at: datetime
    ) -> Approval:
        """Approve or deny a pending approval that has not expired at ``at``.

        Raises NotFound, or `broker.core.approvals.ApprovalRefused` (``expired``: the approval
        is recorded as expired and nothing is released; ``already-decided``).
        """
        ...

    async def consume_approval(self, approval_id: str, binding: str, *, at: datetime) -> Approval:
        """Use an approved approval once, for exactly the request whose binding it holds.

        Raises NotFound, or `ApprovalRefused` (``binding-mismatch``, ``consumed``, ``expired``,
        ``not-approved``); nothing changes then.
        """
        ...

    async def expire_approval(self, approval_id: str, *, at: datetime) -> Approval:
        """Withdraw a pending approval; any other status is returned unchanged. Raises NotFound."""
        ...

    async def expire_approvals(self, *, at: datetime) -> int:
        """Mark every pending approval whose ``expires_at`` is at or before ``at`` expired."""
        ...


def role_allows(role: AdminRole, needed: AdminRole) -> bool:
    """admin ⊇ approver ⊇ reviewer."""
    order = [AdminRole.REVIEWER, AdminRole.APPROVER, AdminRole.ADMIN]
    return order.index(role) >= order.index(needed)
