"""The revocation cache: this process's `RevocationView`, kept fresh from the store.

Shell adapter around `broker.core.revocation`. A background poll asks the store for revocations
after the view's ``seq`` and agent status changes since the last one seen; `apply_local` makes a
revocation made in this process take effect at once, and `notify` (the seam for PostgreSQL
``LISTEN/NOTIFY``, issue #7) asks for an immediate refresh. When the store cannot be read the
view is not confirmed, grows stale, and `check` answers ``store-unavailable`` (fail closed).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from broker.core.decision import Reason
from broker.core.identity import AgentStatus
from broker.core.revocation import Revocation, RevocationView, check_token
from broker.core.tokens import TokenClaims
from broker.ports import Clock, Store

__all__ = ["RevocationCache"]


logger = logging.getLogger(__name__)

# Status changes are fetched again for this long after the latest one seen: a change committed
# late, or stamped by a replica whose clock lags, is still picked up (re-applying is harmless).
STATUS_OVERLAP = timedelta(seconds=60)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RevocationCache:
    """Holds the current `RevocationView`; ``async with`` runs the poll in the background.

    ``view`` is replaced, never mutated, so a reader always sees a whole view. Until the first
    successful refresh, and whenever refreshes have failed for longer than ``staleness`` seconds,
    `check` answers ``store-unavailable``.
    """

    def __init__(
        self, store: Store, clock: Clock, *, poll_interval: float = 1.0, staleness: float = 5.0
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_interval = poll_interval
        self.staleness = staleness
        self.view = RevocationView()
        self._wake = anyio.Event()
        self._refreshed = anyio.Event()
        self._lock = anyio.Lock()
        self._group: TaskGroup | None = None

    async def refresh(self) -> None:
        """Bring the view up to date with the store now.

        Raises:
            StoreUnavailable: the store cannot be read (the view is left as it was).
        """
        async with self._lock:
            # Freshness is the time before asking: the answer reflects the store at least then.
            started = self.clock.now()
            revocations = await self.store.revocations_since(self.view.seq)
            since = self.view.statuses_as_of
            since = _EPOCH if since is None else since - STATUS_OVERLAP
            statuses = await self.store.agent_statuses_since(since)
            # Applied to the current view: a local revocation applied meanwhile is kept.
            self.view = (
                self.view.with_revocations(revocations).with_statuses(statuses).confirmed(started)
            )
            done, self._refreshed = self._refreshed, anyio.Event()
            done.set()

    async def wait_refreshed(self) -> None:
        """Wait until the next successful refresh has been applied."""
        await self._refreshed.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refresh, report started, then refresh every ``poll_interval`` or on `notify`.

        A failed refresh is logged and retried on the next tick; the view grows stale and
        `check` fails closed once it is older than ``staleness``.
        """
        await self._refresh_logged()
        task_status.started()
        while True:
            with anyio.move_on_after(self.poll_interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self._refresh_logged()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the poll loop's top level: any failure leaves the view to go stale
            logger.exception("revocation refresh failed")

    def notify(self) -> None:
        """Ask for a refresh now (a revocation was announced elsewhere)."""
        self._wake.set()

    def apply_local(self, revocation: Revocation) -> None:
        """Take a revocation this process just stored into effect at once."""
        self.view = self.view.with_revocations([revocation], advance=False)

    def apply_status(self, agent_id: str, status: AgentStatus, at: datetime) -> None:
        """Take an agent status change this process just stored into effect at once."""
        self.view = self.view.with_statuses([(agent_id, status, at)])

    def check(self, claims: TokenClaims, now: datetime) -> Reason | None:
        """`broker.core.revocation.check_token` against the current view."""
        return check_token(claims, self.view, now=now, staleness=self.staleness)

    async def __aenter__(self) -> Self:
        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(self.run)
        except BaseException:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
            raise
        self._group = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(exc_type, exc, tb)
