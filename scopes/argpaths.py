"""Argument paths (`a`, `a.b`, `a[*]`, `a[*].b`): parsing only. Pure; no I/O.

Decisions: a path starts with a field name; names are `[A-Za-z_][A-Za-z0-9_-]{0,63}` (the
characters JSON-schema property names of real tools use; anything else is refused rather than
escaped); `[*]` is the only index form and means "every element of the array"; at most 8 steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["STAR", "ArgPath", "parse_arg_path"]

STAR = None
"""The `[*]` step inside `ArgPath.steps`."""

_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]{0,63})|\[\*\]")
_FIRST = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_MAX_STEPS = 8


@dataclass(frozen=True, slots=True)
class ArgPath:
    """A parsed argument path: field names, with `None` (`STAR`) for each `[*]`.

    `steps[0]` is always `head`, a field name of the arguments object.
    """

    text: str
    head: str
    steps: tuple[str | None, ...]


def parse_arg_path(text: str) -> ArgPath | None:
    """Parse `text` into an `ArgPath`, or return None when it is not a valid path."""
    first = _FIRST.match(text)
    if first is None:
        return None
    head = first.group()
    steps: list[str | None] = [head]
    pos = first.end()
    while pos < len(text):
        step = _STEP.match(text, pos)
        if step is None:
            return None
        steps.append(step.group(1))
        pos = step.end()
    if len(steps) > _MAX_STEPS:
        return None
    return ArgPath(text, head, tuple(steps))
