"""Scope-language values: labels, approval modes, grants and scope definitions. Pure; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from scopes.constraints import Constraints
from scopes.globs import ToolPatterns

__all__ = ["ApprovalMode", "Grant", "Label", "ScopeDefinition"]


class Label(StrEnum):
    """Data-flow labels a scope carries (what the data it touches is)."""

    PRIVATE = "private"
    UNTRUSTED = "untrusted"
    EGRESS = "egress"


class ApprovalMode(StrEnum):
    """When a human must approve: never, once per token, or on every call."""

    NONE = "none"
    TOKEN = "token"
    CALL = "call"


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to call `tools` (globs) of `connector` with arguments meeting `constraints`.

    `id` names the grant in records: `<scope>/grant[<n>]`, or `authorization_details[<n>]`.
    `scope` is the scope name it came from (None for a token's authorization_details).
    Build grants with the parsers, which validate every field; `tools` must be valid globs.
    """

    id: str
    connector: str
    tools: tuple[str, ...]
    constraints: Constraints = field(default_factory=Constraints)
    scope: str | None = None
    tool_patterns: ToolPatterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tool_patterns", ToolPatterns(self.tools))

    def covers(self, connector: str, tool: str) -> bool:
        """Whether this grant is about `tool` of `connector` (arguments not considered)."""
        return connector == self.connector and self.tool_patterns.matches(tool)


@dataclass(frozen=True, slots=True)
class ScopeDefinition:
    """A named capability: its grants, data-flow labels and approval mode."""

    name: str
    description: str
    labels: frozenset[Label]
    approval: ApprovalMode
    grants: tuple[Grant, ...]
    source: str
