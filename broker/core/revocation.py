"""Issued tokens and revocations: what the store remembers, and the view every token use checks.

Pure; imports the standard library only. A revocation names a token (``jti``), a task or an agent.
A token is refused when its own ``jti`` or any ancestor in its delegation chain is revoked, when
its task is revoked, or when any agent in its delegation chain has an agent-wide revocation at or
after the token's ``iat`` (quarantine and disable write one), so revoking a parent revokes its
children without touching the store for each child.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["IssuedToken", "Revocation", "RevocationKind"]


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
