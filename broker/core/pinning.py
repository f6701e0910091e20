"""Tool-definition pins (rug-pull protection). Pure; imports the standard library only.

A tool's definition is pinned by a SHA-256 over the canonical JSON (sorted keys, no whitespace,
UTF-8, no NaN) of exactly these fields: name, title, description, inputSchema, outputSchema,
annotations. A new definition is ``pending`` until an admin approves it; a definition that differs
from the approved one marks the pin ``changed`` and the tool is hidden and refused until the new
definition is approved. The approved definition stays on record, so the diff can be shown.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = ["PINNED_FIELDS", "PinStatus", "ToolPin", "definition_digest", "pinned_definition"]

PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


class PinStatus(StrEnum):
    PENDING = "pending"
    """Seen, never approved: hidden."""
    APPROVED = "approved"
    """The current definition is the approved one: exposed."""
    CHANGED = "changed"
    """Approved once, but the definition seen now differs: hidden and refused."""


@dataclass(frozen=True, slots=True)
class ToolPin:
    connector_id: str
    tool_name: str
    """The downstream name, before any prefix."""
    digest: str
    """Digest of the definition seen most recently."""
    definition: Mapping[str, Any]
    status: PinStatus
    first_seen: datetime
    updated_at: datetime
    approved_digest: str | None = None
    approved_definition: Mapping[str, Any] | None = None
    approved_at: datetime | None = None
    approved_by: str | None = None


def pinned_definition(wire_tool: Mapping[str, Any]) -> dict[str, Any]:
    """The pinned subset of a wire-shaped tool (camelCase keys); absent keys are dropped."""
    return {k: wire_tool[k] for k in PINNED_FIELDS if wire_tool.get(k) is not None}


def definition_digest(definition: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of the pinned fields."""
    body = json.dumps(
        pinned_definition(definition),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
