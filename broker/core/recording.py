"""The shape of recorded sessions and events and their hash chain. Pure; stdlib only.

Each event carries ``hash = SHA-256(prev_hash || canonical event)``, where the first event's
``prev_hash`` is the session's genesis value and the canonical event is the JSON of
(session_id, seq, at, kind, decision_id, payload) with sorted keys. A closed session is sealed
with its head hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["RecordedEvent", "SessionRecord"]


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    agent_id: str
    token_jti: str
    task_id: str
    started_at: datetime
    protocol_version: str = ""
    transport: str = ""
    client_info: Mapping[str, Any] = field(default_factory=dict[str, Any])
    ended_at: datetime | None = None
    head_hash: str | None = None
    """Set when the session is sealed."""
    event_count: int = 0
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    session_id: str
    seq: int
    """1-based, gapless within a session."""
    at: datetime
    kind: str
    payload: Mapping[str, Any]
    prev_hash: str
    hash: str
    decision_id: str | None = None
