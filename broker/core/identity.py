"""Who may ask: agents and admin roles. Pure values; imports the standard library only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

__all__ = [
    "AGENT_NAME_RE",
    "AdminRole",
    "AdminToken",
    "Agent",
    "AgentStatus",
]

AGENT_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class AgentStatus(StrEnum):
    ACTIVE = "active"
    QUARANTINED = "quarantined"
    DISABLED = "disabled"


class AdminRole(StrEnum):
    """Roles of admin tokens. An agent token is never an admin credential."""

    ADMIN = "admin"
    APPROVER = "approver"
    REVIEWER = "reviewer"


@dataclass(frozen=True, slots=True)
class Agent:
    """A registered non-human principal.

    ``id`` is the OAuth ``client_id`` and the token ``sub``. The client-secret hash is never part
    of this value: the store hands it out only to the code that checks it.
    """

    id: str
    name: str
    owner: str
    status: AgentStatus
    allowed_scopes: tuple[str, ...]
    max_ttl_seconds: int
    auth_method: Literal["client_secret", "private_key_jwt"]
    created_at: datetime
    public_jwk: dict[str, Any] | None = None
    max_delegation_depth: int = 2
    status_reason: str = ""

    @property
    def is_active(self) -> bool:
        return self.status is AgentStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class AdminToken:
    """An admin-API credential's public record (the secret is stored only as a hash)."""

    id: str
    name: str
    role: AdminRole
    created_at: datetime
    revoked_at: datetime | None = None
