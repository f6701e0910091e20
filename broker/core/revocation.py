"""Issued tokens and revocations: what the store remembers, and the view every token use checks.

Pure; imports the standard library only. A revocation names a token (``jti``), a task or an agent.
A token is refused when its own ``jti`` or any ancestor in its delegation chain is revoked, when
its task is revoked, or when any agent in its delegation chain has an agent-wide revocation at or
after the token's ``iat`` (quarantine and disable write one), so revoking a parent revokes its
children without touching the store for each child.

A *closed* task (``task-closed``: the agent that started it said its work is over, see
`broker.token_service.TokenService.close_task`) is stored the same way but checked differently:
its tokens still authenticate, and every request they make is denied ``task-closed`` by
mediation. The use is then decided, recorded and seen by the detectors (``task-closed-use``,
whose response escalates: by default the task is revoked, and from then on its tokens get 401),
where a revoked token would be turned away at the door with nothing on the record to review.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from broker.core.decision import Reason
from broker.core.identity import AgentStatus
from broker.core.tokens import TokenClaims

__all__ = [
    "IssuedToken",
    "Revocation",
    "RevocationKind",
    "RevocationView",
    "check_token",
]


class RevocationKind(StrEnum):
    TOKEN = "token"
    TASK = "task"
    AGENT = "agent"
    TASK_CLOSED = "task-closed"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """The store's memory of a minted capability token (never the token itself)."""

    jti: str
    agent_id: str
    task_id: str
    purpose: str
    scopes: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    parent_jti: str | None = None
    chain: tuple[str, ...] = ()
    """Ancestor jtis, root first; empty for a token minted by client credentials."""
    budget: int | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation; ``seq`` orders them so a replica can ask for what it has not seen."""

    seq: int
    kind: RevocationKind
    subject: str
    """The jti, task id or agent id."""
    at: datetime
    reason: str
    actor: str
    """Who revoked: an admin token id, ``detector:<name>``, or ``agent:<id>`` (self)."""


def _empty_cutoffs() -> Mapping[str, datetime]:
    return MappingProxyType({})


def _empty_closes() -> Mapping[str, int]:
    return MappingProxyType({})


def _empty_statuses() -> Mapping[str, AgentStatus]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RevocationView:
    """What this process knows of revocations and agent statuses, and since when.

    Immutable: the update methods return a new view, so a reader never sees half an update.
    ``as_of`` is when the view was last confirmed to match the store (None: never), ``seq`` the
    highest revocation seq applied, ``statuses_as_of`` the latest agent status change applied.
    An agent missing from ``agent_statuses`` is taken as active: quarantine and disable also
    write an agent-wide revocation, which is what refuses the agent's existing tokens.
    """

    revoked_jtis: frozenset[str] = frozenset()
    revoked_tasks: frozenset[str] = frozenset()
    closed_tasks: Mapping[str, int] = field(default_factory=_empty_closes)
    """Closed task id -> the seq of the revocation that closed it (the first one)."""
    agent_cutoffs: Mapping[str, datetime] = field(default_factory=_empty_cutoffs)
    agent_statuses: Mapping[str, AgentStatus] = field(default_factory=_empty_statuses)
    status_changed_at: Mapping[str, datetime] = field(default_factory=_empty_cutoffs)
    as_of: datetime | None = None
    seq: int = 0
    statuses_as_of: datetime | None = None

    def with_revocations(
        self, revocations: Iterable[Revocation], *, advance: bool = True
    ) -> RevocationView:
        """This view plus ``revocations`` (any order; applying one twice changes nothing).

        ``advance=False`` leaves ``seq`` alone: for a revocation made in this process, which may
        be newer than others this view has not fetched yet.
        """
        jtis: set[str] = set()
        tasks: set[str] = set()
        closes: dict[str, int] = {}
        cutoffs: dict[str, datetime] = {}
        seq = self.seq
        for r in revocations:
            if advance:
                seq = max(seq, r.seq)
            if r.kind is RevocationKind.TOKEN:
                jtis.add(r.subject)
            elif r.kind is RevocationKind.TASK:
                tasks.add(r.subject)
            elif r.kind is RevocationKind.TASK_CLOSED:
                first = closes.get(r.subject) or self.closed_tasks.get(r.subject)
                closes[r.subject] = r.seq if first is None else min(first, r.seq)
            else:
                old = cutoffs.get(r.subject) or self.agent_cutoffs.get(r.subject)
                cutoffs[r.subject] = r.at if old is None else max(old, r.at)
        return replace(
            self,
            revoked_jtis=self.revoked_jtis | jtis if jtis else self.revoked_jtis,
            revoked_tasks=self.revoked_tasks | tasks if tasks else self.revoked_tasks,
            closed_tasks=(
                MappingProxyType({**self.closed_tasks, **closes}) if closes else self.closed_tasks
            ),
            agent_cutoffs=(
                MappingProxyType({**self.agent_cutoffs, **cutoffs})
                if cutoffs
                else self.agent_cutoffs
            ),
            seq=seq,
        )

    def with_statuses(self, changes: Iterable[tuple[str, AgentStatus, datetime]]) -> RevocationView:
        """This view with agent statuses updated; a later change wins over an earlier one."""
        statuses = dict(self.agent_statuses)
        changed = dict(self.status_changed_at)
        latest = self.statuses_as_of
        for agent_id, status, at in changes:
            seen = changed.get(agent_id)
            if seen is None or at >= seen:
                statuses[agent_id] = status
                changed[agent_id] = at
            latest = at if latest is None else max(latest, at)
        return replace(
            self,
            agent_statuses=MappingProxyType(statuses),
            status_changed_at=MappingProxyType(changed),
            statuses_as_of=latest,
        )

    def confirmed(self, as_of: datetime) -> RevocationView:
        """This view, confirmed fresh as of ``as_of`` (never moves ``as_of`` backwards)."""
        if self.as_of is not None and as_of <= self.as_of:
            return self
        return replace(self, as_of=as_of)


def check_token(
    claims: TokenClaims, view: RevocationView, *, now: datetime, staleness: float
) -> Reason | None:
    """Why ``claims`` may not be used now according to ``view``, or None when it may.

    ``store-unavailable`` when the view is older than ``staleness`` seconds (fail closed);
    ``agent-quarantined`` / ``agent-disabled`` when any agent in the chain is not active;
    ``token-revoked`` when the token, an ancestor or its task is revoked, or any agent in the
    chain has an agent-wide revocation at or after the token's ``iat``; last, ``task-closed``
    when its task was closed (a refusal for mediation to record, not for the HTTP door: see the
    module docstring).
    """
    if view.as_of is None or (now - view.as_of).total_seconds() > staleness:
        return Reason.STORE_UNAVAILABLE
    agents = claims.agents_in_chain
    statuses = [view.agent_statuses.get(a, AgentStatus.ACTIVE) for a in agents]
    if AgentStatus.QUARANTINED in statuses:
        return Reason.AGENT_QUARANTINED
    if AgentStatus.DISABLED in statuses:
        return Reason.AGENT_DISABLED
    if claims.jti in view.revoked_jtis or claims.task.id in view.revoked_tasks:
        return Reason.TOKEN_REVOKED
    if any(j in view.revoked_jtis for j in claims.ancestor_jtis):
        return Reason.TOKEN_REVOKED
    issued = claims.issued_at
    for agent_id in agents:
        cutoff = view.agent_cutoffs.get(agent_id)
        if cutoff is not None and cutoff >= issued:
            return Reason.TOKEN_REVOKED
    if claims.task.id in view.closed_tasks:
        return Reason.TASK_CLOSED
    return None
