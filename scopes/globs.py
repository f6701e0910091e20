"""Tool-name globs (`*` and `?` only, anchored, case-sensitive), compiled once. Pure; no I/O.

Decision: a pattern is 1-128 characters of `A-Z a-z 0-9 _ . / -` plus the wildcards `*` (any run,
possibly empty) and `?` (exactly one character); brackets, braces and backslashes are refused so
that no pattern can mean a character class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ToolPatterns", "is_valid_glob"]

_GLOB = re.compile(r"[A-Za-z0-9_./*?-]{1,128}")


def is_valid_glob(pattern: str) -> bool:
    """Whether `pattern` is a valid tool-name glob."""
    return _GLOB.fullmatch(pattern) is not None


def _to_regex(pattern: str) -> str:
    return "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )


@dataclass(frozen=True, slots=True)
class ToolPatterns:
    """A compiled set of tool-name globs; matches when any one does. Patterns must be valid."""

    patterns: tuple[str, ...]
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact = frozenset(p for p in self.patterns if "*" not in p and "?" not in p)
        wild = [p for p in self.patterns if p not in exact]
        regex = re.compile("|".join(map(_to_regex, wild)), re.DOTALL) if wild else None
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_regex", regex)

    def matches(self, tool: str) -> bool:
        """Whether `tool` (the downstream tool name) matches one of the patterns."""
        if tool in self._exact:
            return True
        return self._regex is not None and self._regex.fullmatch(tool) is not None
