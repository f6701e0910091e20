"""Automatic responses to detector verdicts: revoke a token or a task, quarantine an agent. Shell.

`AgentResponder.respond` is called by the mediator (`broker.mediation.DetectorResponder`) for a
verdict whose action is stronger than ``block-call``. What must be in effect before the agent
hears back happens inline: the revocation or the quarantine is applied to this process's
revocation view at once, then stored (other replicas learn it from the store). What may take
time happens in the responder's own task group and never blocks a call: cutting the agent off
(its calls in flight cancelled downstream, its sessions closed, via the bound ``cut_off`` of the
MCP front) and the alert to ``[alerts] webhook_url`` (JSON POST, retried with backoff).

An alert carries the agent id, the action, the decision ids and, per signal, the detector, its
values and the events that triggered it. Signal values never hold argument values or secrets
(see `broker.core.detectors.Signal`), and tokens are not sent (the token id is an identifier).
Only a human releases a quarantine (``broker agents release``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import anyio.abc
import httpx2

from broker.config import AlertsConfig
from broker.core.decision import Reason
from broker.core.detectors import DetectorBook, Response, Verdict
from broker.core.identity import AgentStatus
from broker.core.revocation import Revocation, RevocationKind
from broker.ports import Clock, SystemClock
from broker.principal import Principal

__all__ = ["ACTOR", "AgentResponder", "Alert", "alert_payload"]

logger = logging.getLogger("broker.responses")

ACTOR = "broker:detectors"
"""The actor named in the audit trail for automatic revocations and quarantines."""
_MAX_PENDING_ALERTS = 256
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 10.0

CutOff = Callable[[str, Reason], Awaitable[int]]
Alert = dict[str, Any]
PostAlert = Callable[[Alert], Awaitable[None]]


class ResponderStore(Protocol):
    async def revoke(
        self, kind: RevocationKind, subject: str, *, reason: str, actor: str, at: datetime
    ) -> Revocation: ...

    async def set_agent_status(
        self, agent_id: str, status: AgentStatus, *, reason: str, actor: str, at: datetime
    ) -> Any: ...


class ResponderView(Protocol):
    """`broker.revocations.RevocationCache`: the process's revocation view."""

    def apply_local(self, revocation: Revocation) -> None: ...

    def apply_status(self, agent_id: str, status: AgentStatus, at: datetime) -> None: ...


def alert_payload(
    verdict: Verdict, principal: Principal, decision_id: str, session_id: str | None, at: datetime
) -> Alert:
    """The webhook body: who, what was done, and why (detectors, values, triggering events)."""
    enforced = [s for s in verdict.signals if s.response is not Response.RECORD]
    return {
        "type": "mcp-authz-broker.detector-response",
        "at": at.isoformat(),
        "agent_id": principal.agent_id,
        "task_id": principal.task_id,
        "token_id": principal.token_id,
        "session_id": session_id,
        "action": verdict.action.value,
        "decision_id": decision_id,
        "decision_ids": sorted({decision_id, *(r for s in enforced for r in s.refs)}),
        "signals": [
            {
                "detector": s.detector.value,
                "severity": s.severity.value,
                "response": s.response.value,
                "values": dict(s.values),
                "refs": list(s.refs),
            }
            for s in enforced
        ],
    }


class AgentResponder:
    """Carries out revoke-token, revoke-task and quarantine-agent; alerts a webhook.

    Enter it (``async with``) before the MCP front starts; the front binds its ``cut_off``.
    ``post`` replaces the HTTP client (tests); by default alerts go to ``alerts.webhook_url``.
    """

    def __init__(
        self,
        store: ResponderStore,
        revocations: ResponderView,
        alerts: AlertsConfig | None = None,
        *,
        clock: Clock | None = None,
        detectors: DetectorBook | None = None,
        post: PostAlert | None = None,
        backoff_first: float = _BACKOFF_FIRST,
    ) -> None:
        self.store = store
        self.revocations = revocations
        self.alerts = alerts or AlertsConfig()
        self.clock: Clock = clock or SystemClock()
        self.detectors = detectors
        self._post = post
        self._backoff_first = backoff_first
        self._cut_off: CutOff | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: httpx2.AsyncClient | None = None
        self._pending = 0
        self.sent = 0
        self.failed = 0

    def bind(self, cut_off: CutOff) -> None:
        self._cut_off = cut_off

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self._post is None and self.alerts.webhook_url:
            self._client = httpx2.AsyncClient(timeout=self.alerts.timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(exc_type, exc, tb)
        finally:
            if self._client is not None:
                await self._client.aclose()
        return None

    async def respond(
        self, verdict: Verdict, principal: Principal, decision_id: str, session_id: str | None
    ) -> None:
        """Put ``verdict.action`` into effect (in this process at once), then cut off and alert.

        Raises:
            StoreError: the store could not record it (the local view already refuses).
        """
        action = verdict.action
        now = self.clock.now()
        why = f"detector {','.join(verdict.detectors)} (decision {decision_id})"
        try:
            if action is Response.REVOKE_TOKEN:
                await self._revoke(RevocationKind.TOKEN, principal.token_id, why, now)
                if self.detectors is not None:
                    self.detectors.forget_token(principal.token_id)
            elif action is Response.REVOKE_TASK:
                await self._revoke(RevocationKind.TASK, principal.task_id, why, now)
            elif action is Response.QUARANTINE_AGENT:
                await self.quarantine(principal.agent_id, why, now)
            else:
                return
        finally:
            self._alert(alert_payload(verdict, principal, decision_id, session_id, now))
        logger.warning(
            "automatic response",
            extra={"agent": principal.agent_id, "action": action.value, "decision_id": decision_id},
        )

    async def quarantine(self, agent_id: str, reason: str, at: datetime) -> None:
        """Quarantine ``agent_id``: refused here at once, stored, then cut off in the background.

        Raises:
            StoreError: the status could not be stored (it still holds in this process).
        """
        self.revocations.apply_status(agent_id, AgentStatus.QUARANTINED, at)
        try:
            # Shielded: cutting the agent off may cancel the very request that triggered this.
            with anyio.CancelScope(shield=True):
                await self.store.set_agent_status(
                    agent_id, AgentStatus.QUARANTINED, reason=reason, actor=ACTOR, at=at
                )
        finally:
            self._spawn(self._cut, agent_id)

    async def _revoke(self, kind: RevocationKind, subject: str, reason: str, at: datetime) -> None:
        with anyio.CancelScope(shield=True):
            revocation = await self.store.revoke(kind, subject, reason=reason, actor=ACTOR, at=at)
            self.revocations.apply_local(revocation)

    async def _cut(self, agent_id: str) -> None:
        if self._cut_off is None:
            return
        try:
            await self._cut_off(agent_id, Reason.AGENT_QUARANTINED)
        except Exception:
            logger.exception("cutting off a quarantined agent failed", extra={"agent": agent_id})

    # -- alerts ------------------------------------------------------------------------------

    def _alert(self, alert: Alert) -> None:
        if self._post is None and self._client is None:
            return
        if self._pending >= _MAX_PENDING_ALERTS:
            logger.error("alert dropped: too many pending", extra={"agent": alert["agent_id"]})
            self.failed += 1
            return
        self._pending += 1
        self._spawn(self._deliver, alert)

    async def _deliver(self, alert: Alert) -> None:
        try:
            delay = self._backoff_first
            for attempt in range(self.alerts.retries + 1):
                if attempt:
                    await anyio.sleep(delay)  # backoff between attempts, off the call path
                    delay = min(delay * 2, _BACKOFF_MAX)
                if await self._attempt(alert):
                    self.sent += 1
                    return
            self.failed += 1
            logger.error("alert not delivered", extra={"agent": alert["agent_id"]})
        finally:
            self._pending -= 1

    async def _attempt(self, alert: Alert) -> bool:
        try:
            with anyio.fail_after(self.alerts.timeout):
                if self._post is not None:
                    await self._post(alert)
                    return True
                if self._client is None:
                    return False
                response = await self._client.post(
                    self.alerts.webhook_url,
                    content=json.dumps(alert, sort_keys=True).encode(),
                    headers={"content-type": "application/json"},
                )
        except Exception:
            logger.warning("alert attempt failed", extra={"agent": alert["agent_id"]})
            return False
        if response.status_code >= 300:
            logger.warning(
                "alert refused", extra={"agent": alert["agent_id"], "status": response.status_code}
            )
            return False
        return True

    def _spawn(self, fn: Callable[[Any], Coroutine[Any, Any, None]], arg: Any) -> None:
        if self._tg is None:
            logger.error("responder not started; background work skipped")
            return
        self._tg.start_soon(fn, arg)
