"""The revocation cache: this process's `RevocationView`, kept fresh from the store.

Shell adapter around `broker.core.revocation`. A background poll asks the store for revocations
after the view's ``seq`` and agent status changes since the last one seen; `apply_local` makes a
revocation made in this process take effect at once, and `notify` asks for an immediate refresh.

Replicas (issue 7): on PostgreSQL a `broker.store.listen.PgListener` ``LISTEN``s on
``broker_revocations`` (every revocation, quarantine and disable ``NOTIFY``s its seq) and calls
`notify`, so another replica's revocation is applied within a round trip; after each
(re)connection it refreshes once to catch what it missed. The poll keeps running whether or not
the listener is up: it is the fallback (SQLite, a lost listening connection), it picks up what
sends no notification (a release), and it is what proves the view fresh. When the store cannot
be read the view is not confirmed, grows stale, and `check` answers ``store-unavailable`` (fail
closed) once it is older than ``staleness``; `broker.health` reports the replica not ready.

Cut-off listeners (`add_cut_off_listener`) hear of each agent-wide revocation a refresh brings
in (quarantine, disable, revoke-all), on whichever replica holds the agent's live sessions, so
they can close those sessions and cancel calls in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from broker.core.decision import Reason
from broker.core.identity import AgentStatus
from broker.core.revocation import Revocation, RevocationKind, RevocationView, check_token
from broker.core.tokens import TokenClaims
from broker.ports import Clock, Store

__all__ = ["CutOff", "RevocationCache"]

CutOff = Callable[[str, Reason], Awaitable[Any]]
"""``async (agent_id, reason)``: end the agent's live sessions and calls on this replica."""


logger = logging.getLogger(__name__)

# Status changes are fetched again for this long after the latest one seen: a change committed
# late, or stamped by a replica whose clock lags, is still picked up (re-applying is harmless).
STATUS_OVERLAP = timedelta(seconds=60)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CUT_OFF_TIMEOUT = 10.0
_CUT_REASONS = {
    AgentStatus.QUARANTINED: Reason.AGENT_QUARANTINED,
    AgentStatus.DISABLED: Reason.AGENT_DISABLED,
}


class RevocationCache:
    """Holds the current `RevocationView`; ``async with`` runs the poll in the background.

    ``view`` is replaced, never mutated, so a reader always sees a whole view. Until the first
    successful refresh, and whenever refreshes have failed for longer than ``staleness`` seconds,
    `check` answers ``store-unavailable``.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        poll_interval: float = 1.0,
        staleness: float = 5.0,
        listen: bool = True,
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_interval = poll_interval
        self.staleness = staleness
        self.listen = listen
        self.view = RevocationView()
        self._wake = anyio.Event()
        self._refreshed = anyio.Event()
        self._lock = anyio.Lock()
        self._group: TaskGroup | None = None
        self._listener: Any = None
        self._cut_offs: list[CutOff] = []

    @property
    def propagation(self) -> str:
        """``listen`` while PostgreSQL notifications arrive, else ``poll``."""
        return "listen" if self._listener is not None and self._listener.listening else "poll"

    def age(self, now: datetime) -> float | None:
        """Seconds since the view was last confirmed against the store (None: never)."""
        as_of = self.view.as_of
        return None if as_of is None else max(0.0, (now - as_of).total_seconds())

    def fresh(self, now: datetime) -> bool:
        """Whether the view is within its staleness bound (calls are refused otherwise)."""
        age = self.age(now)
        return age is not None and age <= self.staleness

    def add_cut_off_listener(self, listener: CutOff) -> None:
        """Call ``listener(agent_id, reason)`` for each agent-wide revocation seen from now on.

        ``reason`` is ``agent-quarantined``, ``agent-disabled`` or ``token-revoked`` (the agent's
        tokens were revoked but it stays active). Runs in the background, bounded by
        ``CUT_OFF_TIMEOUT``; a failure is logged.
        """
        self._cut_offs.append(listener)

    async def refresh(self) -> None:
        """Bring the view up to date with the store now.

        Raises:
            StoreUnavailable: the store cannot be read (the view is left as it was).
        """
        async with self._lock:
            # Freshness is the time before asking: the answer reflects the store at least then.
            started = self.clock.now()
            primed = self.view.as_of is not None
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
        if primed:
            # At start-up nothing is connected yet: the history needs no cutting off.
            self._announce({r.subject for r in revocations if r.kind is RevocationKind.AGENT})

    def _announce(self, agents: set[str]) -> None:
        group = self._group
        if group is None or not self._cut_offs:
            return
        for agent_id in sorted(agents):
            status = self.view.agent_statuses.get(agent_id, AgentStatus.ACTIVE)
            group.start_soon(
                self._cut_off, agent_id, _CUT_REASONS.get(status, Reason.TOKEN_REVOKED)
            )

    async def _cut_off(self, agent_id: str, reason: Reason) -> None:
        for listener in list(self._cut_offs):
            try:
                with anyio.fail_after(CUT_OFF_TIMEOUT):
                    await listener(agent_id, reason)
            except Exception:
                logger.exception("cutting off an agent failed", extra={"agent": agent_id})

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

    def _on_notification(self, payload: str) -> None:
        """A ``NOTIFY broker_revocations, '<seq>'``: refresh unless the view already has it."""
        try:
            seq = int(payload)
        except ValueError:
            seq = None
        if seq is None or seq > self.view.seq:
            self.notify()

    def apply_local(self, revocation: Revocation) -> None:
        """Take a revocation this process just stored into effect at once."""
        self.view = self.view.with_revocations([revocation], advance=False)

    def apply_status(self, agent_id: str, status: AgentStatus, at: datetime) -> None:
        """Take an agent status change this process just stored into effect at once."""
        self.view = self.view.with_statuses([(agent_id, status, at)])

    def check(self, claims: TokenClaims, now: datetime) -> Reason | None:
        """`broker.core.revocation.check_token` against the current view."""
        return check_token(claims, self.view, now=now, staleness=self.staleness)

    def closed_ref(self, task_id: str) -> str | None:
        """``revocation:<seq>`` of the revocation that closed ``task_id``, if it is closed."""
        seq = self.view.closed_tasks.get(task_id)
        return None if seq is None else f"revocation:{seq}"

    async def __aenter__(self) -> Self:
        from broker.store import REVOCATION_CHANNEL
        from broker.store.listen import listener_for

        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            self._group = group
            await group.start(self.run)
            if self.listen:
                self._listener = listener_for(
                    self.store,
                    {REVOCATION_CHANNEL: self._on_notification},
                    on_connected=self.notify,
                )
                if self._listener is not None:
                    await group.start(self._listener.run)
        except BaseException:
            self._group = None
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
            raise
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
