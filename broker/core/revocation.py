"""Issued tokens and revocations: what the store remembers, and the view every token use checks.

Pure; imports the standard library only. A revocation names a token (``jti``), a task or an agent.
A token is refused when its own ``jti`` or any ancestor in its delegation chain is revoked, when
its task is revoked, or when any agent in its delegation chain has an agent-wide revocation at or
after the token's ``iat`` (quarantine and disable write one), so revoking a parent revokes its
children without touching the store for each child.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    agent_cutoffs: Mapping[str, datetime] = field(default_factory=_empty_cutoffs)
    agent_statuses: Mapping[str, AgentStatus] = field(default_factory=_empty_statuses)
    as_of: datetime | None = None
    seq: int = 0
    statuses_as_of: datetime | None = None

    def with_revocations(self, revocations: Iterable[Revocation]) -> RevocationView:
        """This view plus ``revocations`` (any order; applying one twice changes nothing)."""
        raise NotImplementedError

    def with_statuses(
        self, statuses: Iterable[tuple[str, AgentStatus, datetime]]
    ) -> RevocationView:
        """This view with agent statuses updated; a later change wins over an earlier one."""
        raise NotImplementedError

    def confirmed(self, as_of: datetime) -> RevocationView:
        """This view, confirmed fresh as of ``as_of`` (never moves ``as_of`` backwards)."""
        raise NotImplementedError


def check_token(
    claims: TokenClaims, view: RevocationView, *, now: datetime, staleness: float
) -> Reason | None:
    """Why ``claims`` may not be used now according to ``view``, or None when it may.

    ``store-unavailable`` when the view is older than ``staleness`` seconds (fail closed);
    ``agent-quarantined`` / ``agent-disabled`` when any agent in the chain is not active;
    ``token-revoked`` when the token, an ancestor or its task is revoked, or any agent in the
    chain has an agent-wide revocation at or after the token's ``iat``.
    """
    raise NotImplementedError
