"""Store-specific errors; they extend the tree in `broker.errors`.

::

    broker.errors.StoreError
    └── Conflict        a write would break a uniqueness or ordering rule (caller's fault)
"""

from __future__ import annotations

from broker.errors import StoreError

__all__ = ["Conflict"]


class Conflict(StoreError):
    """A write would duplicate a unique row, fork a session's event chain, or act on stale state.

    Raised for a taken agent name or id, a duplicate jti, connector id or event ``(session,
    seq)``, and for approving a pin whose digest is no longer the current one. Nothing was
    written. The message names the kind of row and its id, never a secret.
    """
