"""Matching calls to grants by connector and tool name. Pure; no I/O.

The wildcard rules themselves live in `scopes.globs`.
"""

from __future__ import annotations

from collections.abc import Iterable

from scopes.errors import ScopeSyntaxError
from scopes.globs import ToolPatterns, is_valid_glob
from scopes.model import Grant, ScopeDefinition

__all__ = ["grants_for", "tool_matches"]


def tool_matches(patterns: Iterable[str] | ToolPatterns, tool_name: str) -> bool:
    """Whether `tool_name` matches any glob of `patterns` (`*`, `?`; anchored, case-sensitive).

    Raises:
        ScopeSyntaxError: a pattern is not a valid glob.
    """
    if not isinstance(patterns, ToolPatterns):
        listed = tuple(patterns)
        for pattern in listed:
            if not is_valid_glob(pattern):
                raise ScopeSyntaxError(
                    "<patterns>",
                    "a glob of letters, digits, '_', '.', '/', '-', '*' and '?'",
                    value=pattern,
                    has_value=True,
                )
        patterns = ToolPatterns(listed)
    return patterns.matches(tool_name)


def grants_for(
    items: Iterable[ScopeDefinition | Grant], connector: str, tool: str
) -> tuple[Grant, ...]:
    """Every grant among `items` (definitions or grants) that covers `tool` of `connector`.

    The grants are alternatives, in the order given; the caller checks arguments against each.
    """
    found: list[Grant] = []
    for item in items:
        if isinstance(item, Grant):
            if item.connector == connector and item.tool_patterns.matches(tool):
                found.append(item)
            continue
        for grant in item.grants:
            if grant.connector == connector and grant.tool_patterns.matches(tool):
                found.append(grant)
    return tuple(found)
