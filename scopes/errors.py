"""Scope-language errors: the one home of exceptions raised by `scopes`. Pure; no I/O.

The tree::

    ScopeError (ValueError)         base; never raised itself except for unreadable scope files
    ├── ScopeSyntaxError            a scope definition or authorization_details entry is invalid
    └── CanonicalisationError       a path or URL was refused by a canonicaliser

`ScopeSyntaxError` is the operator's (or the token requester's) fault: it names the source, the
scope, the field, the offending value when it does not look secret, and what was expected.
`CanonicalisationError` is about an agent's argument: its message says what was expected and
never repeats the value.
"""

from __future__ import annotations

import re

__all__ = ["CanonicalisationError", "ScopeError", "ScopeSyntaxError"]

_SECRET_FIELD = re.compile(r"secret|token|passw|credential|api[_-]?key|private[_-]?key|auth", re.I)
# A long run of base64/hex-ish characters mixing letters and digits looks like a credential.
_SECRET_VALUE = re.compile(
    r"(?=[A-Za-z0-9_\-+=]*\d)(?=[A-Za-z0-9_\-+=]*[A-Za-z])[A-Za-z0-9_\-+=]{24,}"
)
_MAX_SHOWN = 80


class ScopeError(ValueError):
    """Base class of every error raised on purpose by `scopes`."""


class ScopeSyntaxError(ScopeError):
    """A scope definition (TOML) or an authorization_details entry is invalid.

    Raised at load time, never while checking a call. Attributes carry the parts of the message so
    callers (the CLI, the token endpoint) can reshape it.
    """

    source: str
    scope: str | None
    field: str | None
    expected: str
    shown_value: str | None

    def __init__(
        self,
        source: str,
        expected: str,
        *,
        scope: str | None = None,
        field: str | None = None,
        value: object = None,
        has_value: bool = False,
    ) -> None:
        self.source = source
        self.scope = scope
        self.field = field
        self.expected = expected
        self.shown_value = _show(field, value) if has_value else None
        parts = [source]
        if scope is not None:
            parts.append(f"scope {scope!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        message = ": ".join(parts) + f": expected {expected}"
        if self.shown_value is not None:
            message += f", got {self.shown_value}"
        super().__init__(message)


class CanonicalisationError(ScopeError):
    """A path or URL argument was refused; the message says what was expected, never the value."""


def _show(field: str | None, value: object) -> str:
    """Render a value for an error message, hiding anything that looks secret."""
    if field is not None and _SECRET_FIELD.search(field):
        return "<hidden>"
    if isinstance(value, str) and _SECRET_VALUE.search(value):
        return "<hidden>"
    shown = repr(value)
    if len(shown) > _MAX_SHOWN:
        shown = shown[: _MAX_SHOWN - 3] + "..."
    return shown
