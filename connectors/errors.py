"""Connector errors: one tree, drawn once. Imports nothing from `broker`.

```
ConnectorError
├── ConnectorClosed        we closed it (aclose() ran); never retried
├── ConnectorBroken        it died or cannot be reached; the cause is kept in __cause__
├── CallTimeout            the per-call deadline passed; the downstream call was cancelled
├── DownstreamError        the server answered a request with a JSON-RPC error (.code)
└── ConnectorConfigError   the spec cannot work (bad target, empty command)
```

Tool failures are not exceptions: they come back as `CallToolResult(is_error=True)`.
Messages name the connector and what happened, never argument values or secrets.
"""

from __future__ import annotations

__all__ = [
    "CallTimeout",
    "ConnectorBroken",
    "ConnectorClosed",
    "ConnectorConfigError",
    "ConnectorError",
    "DownstreamError",
]


class ConnectorError(Exception):
    """Base of every error a connector raises."""


class ConnectorClosed(ConnectorError):
    """Raised by calls made after `aclose()` (or interrupted by it): our doing, not the server's."""


class ConnectorBroken(ConnectorError):
    """Raised when the downstream died, exited or is unreachable; `__cause__` keeps the reason.

    Example: ``stdio server 'fs' exited with code 1``. The connector may be restarting.
    """


class CallTimeout(ConnectorError):
    """Raised when a call outlived its deadline; the downstream call has been cancelled."""


class DownstreamError(ConnectorError):
    """Raised when the downstream answered with a protocol error (unknown tool, bad params).

    ``code`` is the JSON-RPC error code; the message is the server's, and may be shown to an
    operator but should not be relayed to an agent verbatim.
    """

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class ConnectorConfigError(ConnectorError):
    """Raised when a spec cannot be turned into a connector (bad target, empty command)."""
