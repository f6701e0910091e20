"""The revocation cache: this process's `RevocationView`, kept fresh from the store.

Shell adapter around `broker.core.revocation`. A background poll asks the store for revocations
after the view's ``seq`` and agent status changes since the last one seen; `apply_local` makes a
revocation made in this process take effect at once, and `notify` (the seam for PostgreSQL
``LISTEN/NOTIFY``, issue #7) asks for an immediate refresh. When the store cannot be read the
view is not confirmed, grows stale, and `check` answers ``store-unavailable`` (fail closed).
"""

from __future__ import annotations

from datetime import datetime
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskStatus

from broker.core.decision import Reason
from broker.core.identity import AgentStatus
from broker.core.revocation import Revocation, RevocationView
from broker.core.tokens import TokenClaims
from broker.ports import Clock, Store

__all__ = ["RevocationCache"]


class RevocationCache:
    """Holds the current `RevocationView`; ``async with`` runs the poll in the background."""

    def __init__(
        self, store: Store, clock: Clock, *, poll_interval: float = 1.0, staleness: float = 5.0
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_interval = poll_interval
        self.staleness = staleness
        self.view = RevocationView()

    async def refresh(self) -> None:
        """Bring the view up to date with the store now.

        Raises:
            StoreUnavailable: the store cannot be read (the view is left as it was).
        """
        raise NotImplementedError

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refresh, report started, then refresh every ``poll_interval`` or on `notify`."""
        raise NotImplementedError

    def notify(self) -> None:
        """Ask for a refresh now (a revocation was announced elsewhere)."""
        raise NotImplementedError

    def apply_local(self, revocation: Revocation) -> None:
        """Take a revocation this process just stored into effect at once."""
        raise NotImplementedError

    def apply_status(self, agent_id: str, status: AgentStatus, at: datetime) -> None:
        """Take an agent status change this process just stored into effect at once."""
        raise NotImplementedError

    def check(self, claims: TokenClaims, now: datetime) -> Reason | None:
        """`broker.core.revocation.check_token` against the current view."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError
