"""Human approval, just in time: the shell around `broker.core.approvals`. Store and clock in.

Three pieces, one per caller:

- `CallApprovalGate` is mediation's `broker.mediation.CallApprovals`: ``gate`` records a pending
  approval for the exact (connector, tool, canonical arguments), holds the call for at most
  ``[approvals] call_timeout`` seconds, and releases it once when an approver approves (the
  approval is consumed atomically with its binding), or answers ``approval-denied`` (denied) or
  ``approval-required`` (timed out, withdrawn). A waiter is woken at once by a decision taken in
  this process (`ApprovalDesk`, the admin API), and otherwise notices a decision taken elsewhere
  (``broker approvals`` CLI, another replica) by reading the store every ``store_poll`` seconds.
  A call cancelled while held (quarantine, client gone) withdraws its approval.
- `TokenApprovals` answers token requests for ``approval = "token"`` scopes, following the
  OpenID CIBA poll pattern (see "Wire protocol").
- `ApprovalDesk` is the admin API's ``ApprovalsPort`` (list, approve, deny) and wakes waiters.

Wire protocol for token approvals (``POST /oauth/token``, client_credentials): the first
request for a gated scope is answered ``400 {"error": "authorization_pending", "auth_req_id":
ID, "expires_in": S, "interval": I}``. The agent repeats the same request (same scopes, task,
purpose, narrowing, budget, expires_in) adding ``auth_req_id=ID``, waiting ``interval`` seconds
between polls. It then gets the token (once), ``authorization_pending`` again, ``access_denied``
(an approver denied it), ``expired_token`` (nobody decided within ``token_request_ttl``; ask
again) or ``invalid_grant`` (unknown id, another client's id, already used, or a different
request than the one approved). The codes and ``auth_req_id`` are CIBA's (OpenID CIBA Core
§11); repeating the original grant instead of switching to CIBA's grant type keeps one code path
in the token service and lets the broker re-check the whole request against the approval.

Logs carry approval ids, decision ids and binding hashes, never arguments or purposes.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import anyio

from broker.config import ApprovalConfig
from broker.core.approvals import (
    Approval,
    ApprovalKind,
    ApprovalRefused,
    ApprovalStatus,
    Problem,
    effective_status,
    new_call_approval,
    new_token_approval,
    token_request_binding,
)
from broker.core.decision import Reason
from broker.errors import NotFound, OAuthError, StoreError
from broker.ports import Clock, Store
from broker.principal import Principal
from broker.store.errors import Conflict
from scopes import ApprovalMode, JSONValue, ScopeDefinition

__all__ = [
    "ApprovalDesk",
    "AuthorizationPending",
    "CallApprovalGate",
    "Denied",
    "PendingApproval",
    "TokenApprovals",
    "approval_json",
    "new_approval_id",
]

logger = logging.getLogger(__name__)

_WITHDRAW_DEADLINE = 5.0


def new_approval_id() -> str:
    """A fresh, unguessable approval id (``apr_`` + 22 URL-safe characters)."""
    return "apr_" + secrets.token_urlsafe(16)


def approval_json(approval: Approval, now: datetime) -> dict[str, Any]:
    """An approval as JSON for people and scripts: the CLI's ``--json`` and the admin API.

    A call shows the exact tool and canonical arguments that approving releases; a token
    request its scopes and the task's stated purpose.
    """

    def ts(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    out: dict[str, Any] = {
        "id": approval.id,
        "kind": approval.kind.value,
        "status": effective_status(approval, now).value,
        "agent_id": approval.agent_id,
        "client_id": approval.client_id,
        "task_id": approval.task_id,
        "purpose": approval.purpose,
        "scopes": list(approval.scopes),
        "created_at": ts(approval.created_at),
        "expires_at": ts(approval.expires_at),
        "decided_at": ts(approval.decided_at),
        "decided_by": approval.decided_by,
        "reason": approval.reason,
    }
    if approval.kind is ApprovalKind.CALL:
        out |= {
            "connector": approval.connector,
            "tool": approval.tool,
            "arguments": approval.arguments,
            "decision_id": approval.decision_id,
        }
    return out


# -- calls ---------------------------------------------------------------------------------------


class CallApprovalGate:
    """Holds calls of ``approval = "call"`` scopes until a human decides (`CallApprovals`)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: ApprovalConfig | None = None,
        *,
        store_poll: float = 1.0,
        new_id: Callable[[], str] = new_approval_id,
    ) -> None:
        """``store_poll``: seconds between store reads while a call is held (how soon a decision
        taken in another process is seen); a decision taken through `notify` is seen at once."""
        self.store = store
        self.clock = clock
        self.config = config or ApprovalConfig()
        self.store_poll = store_poll
        self._new_id = new_id
        self._wakers: dict[str, anyio.Event] = {}
        self._held: dict[str, Approval] = {}
        self._held_changed = anyio.Event()

    def notify(self, approval_id: str) -> None:
        """Wake the call waiting on ``approval_id`` (if it waits in this process)."""
        waker = self._wakers.get(approval_id)
        if waker is not None:
            waker.set()

    def held(self) -> list[Approval]:
        """The calls held in this process right now, oldest first."""
        return list(self._held.values())

    async def wait_until_held(self, count: int = 1) -> list[Approval]:
        """Wait until at least ``count`` calls are held here; returns them (for tests, demos)."""
        while len(self._held) < count:
            await self._held_changed.wait()
        return self.held()

    def _set_held(self, approval_id: str, approval: Approval | None) -> None:
        if approval is None:
            self._held.pop(approval_id, None)
        else:
            self._held[approval_id] = approval
        changed, self._held_changed = self._held_changed, anyio.Event()
        changed.set()

    async def gate(
        self,
        principal: Principal,
        decision_id: str,
        connector: str,
        tool: str,
        canonical_arguments: Mapping[str, JSONValue],
    ) -> Reason | None:
        """Hold the call until an approver decides: None releases it (once), else the reason."""
        timeout = self.config.call_timeout
        approval = new_call_approval(
            self._new_id(),
            agent_id=principal.agent_id,
            client_id=principal.client_id,
            task_id=principal.task_id,
            purpose=principal.task_purpose,
            token_jti=principal.token_id,
            decision_id=decision_id,
            connector=connector,
            tool=tool,
            arguments=dict(canonical_arguments),
            scopes=sorted(principal.scopes),
            now=self.clock.now(),
            ttl_seconds=timeout,
        )
        log = {"approval_id": approval.id, "decision_id": decision_id, "binding": approval.binding}
        try:
            await self.store.create_approval(approval)
        except StoreError:
            logger.exception("call approval could not be recorded", extra=log)
            return Reason.STORE_UNAVAILABLE
        logger.info(
            "call held for approval",
            extra=log | {"agent_id": principal.agent_id, "connector": connector, "tool": tool},
        )
        self._wakers[approval.id] = anyio.Event()
        self._set_held(approval.id, approval)
        settled = False
        try:
            outcome: Reason | None = Reason.APPROVAL_REQUIRED
            with anyio.move_on_after(timeout):
                outcome = await self._await_decision(approval)
                settled = True
            if not settled:
                outcome = await self._withdraw(approval)
                settled = True
        except StoreError:
            logger.exception("call approval could not be read", extra=log)
            outcome = Reason.STORE_UNAVAILABLE
        finally:
            self._wakers.pop(approval.id, None)
            self._set_held(approval.id, None)
            if not settled:
                # Cancelled or failed while held: nobody may approve a call no one waits for.
                with anyio.CancelScope(shield=True), anyio.move_on_after(_WITHDRAW_DEADLINE):
                    try:
                        await self.store.expire_approval(approval.id, at=self.clock.now())
                    except StoreError:
                        logger.exception("held call approval could not be withdrawn", extra=log)
        logger.info(
            "call approval settled",
            extra=log | {"outcome": "released" if outcome is None else outcome.value},
        )
        return outcome

    async def _await_decision(self, approval: Approval) -> Reason | None:
        while True:
            # A fresh waker before reading, so a decision landing in between is not missed.
            waker = self._wakers[approval.id] = anyio.Event()
            current = await self.store.get_approval(approval.id)
            status = effective_status(current, self.clock.now())
            if status is ApprovalStatus.APPROVED:
                return await self._release(approval)
            if status is ApprovalStatus.DENIED:
                return Reason.APPROVAL_DENIED
            if status is ApprovalStatus.EXPIRED:
                return await self._withdraw(approval)
            if status is not ApprovalStatus.PENDING:
                return Reason.APPROVAL_REQUIRED
            with anyio.move_on_after(self.store_poll):
                await waker.wait()

    async def _release(self, approval: Approval) -> Reason | None:
        try:
            await self.store.consume_approval(approval.id, approval.binding, at=self.clock.now())
        except ApprovalRefused as exc:
            logger.warning(
                "approved call not released",
                extra={"approval_id": approval.id, "problem": exc.problem.value},
            )
            return Reason.APPROVAL_REQUIRED
        return None

    async def _withdraw(self, approval: Approval) -> Reason | None:
        """Timed out: withdraw the request, unless an approval landed at the last moment."""
        after = await self.store.expire_approval(approval.id, at=self.clock.now())
        if after.status is ApprovalStatus.APPROVED:
            return await self._release(approval)
        if after.status is ApprovalStatus.DENIED:
            return Reason.APPROVAL_DENIED
        return Reason.APPROVAL_REQUIRED


# -- the approver's side -------------------------------------------------------------------------


class ApprovalDesk:
    """What approvers use in-process (the admin API's ``ApprovalsPort``): list, approve, deny."""

    def __init__(self, store: Store, clock: Clock, gate: CallApprovalGate | None = None) -> None:
        self.store = store
        self.clock = clock
        self.gate = gate

    async def list(self, *, state: str | None = None) -> Sequence[Mapping[str, Any]]:
        """Approvals as JSON, oldest first; ``state`` is a status or ``all`` (default pending).

        Raises:
            ValueError: an unknown state.
        """
        now = self.clock.now()
        if state in (None, "", "pending"):
            found = await self.store.list_approvals(status=ApprovalStatus.PENDING, limit=1000)
            found = [a for a in found if effective_status(a, now) is ApprovalStatus.PENDING]
        elif state == "all":
            found = await self.store.list_approvals(limit=1000)
        else:
            try:
                wanted = ApprovalStatus(state)
            except ValueError:
                names = ", ".join(s.value for s in ApprovalStatus)
                raise ValueError(f"state: expected one of {names} or all") from None
            found = [
                a
                for a in await self.store.list_approvals(limit=1000)
                if effective_status(a, now) is wanted
            ]
        return [approval_json(a, now) for a in found]

    async def decide_approval(
        self, approval_id: str, *, approve: bool, actor: str, reason: str
    ) -> Approval:
        """Approve or deny, and wake the call waiting on it in this process.

        Raises:
            NotFound: no such approval.
            ApprovalRefused: expired (nothing is released) or already decided.
        """
        decided = await self.store.decide_approval(
            approval_id, approve=approve, actor=actor, reason=reason, at=self.clock.now()
        )
        if self.gate is not None:
            self.gate.notify(approval_id)
        logger.info(
            "approval decided",
            extra={"approval_id": approval_id, "status": decided.status.value, "actor": actor},
        )
        return decided

    async def decide(
        self, approval_id: str, *, approve: bool, actor: str, reason: str
    ) -> Mapping[str, Any]:
        """`decide_approval` as JSON, for the admin API.

        Raises:
            NotFound: no such approval (404).
            Conflict: expired or already decided (409), with the core's message.
        """
        try:
            decided = await self.decide_approval(
                approval_id, approve=approve, actor=actor, reason=reason
            )
        except ApprovalRefused as exc:
            raise Conflict(str(exc)) from None
        return approval_json(decided, self.clock.now())


# -- token requests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingApproval:
    """The request waits for a human: tell the agent ``authorization_pending`` with these."""

    approval_id: str
    expires_in: int
    interval: int


@dataclass(frozen=True, slots=True)
class Denied:
    """The request will not be approved (as asked): the OAuth error to answer."""

    error: Literal["access_denied", "expired_token", "invalid_grant"]
    description: str


TokenApprovalOutcome = Literal["approved"] | PendingApproval | Denied


class AuthorizationPending(OAuthError):
    """A token request waits for a human (CIBA ``authorization_pending``).

    ``extra`` holds ``auth_req_id``, ``expires_in`` and ``interval``: the token endpoint adds
    them to the error body.
    """

    def __init__(self, pending: PendingApproval) -> None:
        super().__init__(
            "authorization_pending",
            "a human must approve this request: repeat it with auth_req_id after interval seconds",
        )
        self.pending = pending
        self.extra: dict[str, Any] = {
            "auth_req_id": pending.approval_id,
            "expires_in": pending.expires_in,
            "interval": pending.interval,
        }


_INVALID_ID = "auth_req_id is unknown, expired long ago, or was issued to another client"


class TokenApprovals:
    """Human approval of token requests for ``approval = "token"`` scopes (CIBA poll pattern)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: ApprovalConfig | None = None,
        *,
        scope_definitions: Mapping[str, ScopeDefinition],
        new_id: Callable[[], str] = new_approval_id,
    ) -> None:
        self.store = store
        self.clock = clock
        self.config = config or ApprovalConfig()
        self.scope_definitions = scope_definitions
        self._new_id = new_id

    def gated(self, scopes: Sequence[str]) -> tuple[str, ...]:
        """The scopes among ``scopes`` that need a human to approve the token."""
        defs = self.scope_definitions
        return tuple(n for n in scopes if n in defs and defs[n].approval is ApprovalMode.TOKEN)

    def _pending(self, approval: Approval, now: datetime) -> PendingApproval:
        left = max(1, math.ceil((approval.expires_at - now).total_seconds()))
        return PendingApproval(approval.id, left, self.config.poll_interval)

    async def check(
        self,
        agent_id: str,
        scopes: Sequence[str],
        *,
        task_id: str | None,
        purpose: str,
        request_fingerprint: str,
        auth_req_id: str | None = None,
    ) -> TokenApprovalOutcome:
        """Whether a token may be issued for this request now.

        ``"approved"``: no scope needs approval, or ``auth_req_id`` names this agent's approved
        approval for exactly this request (``request_fingerprint``, see
        `broker.core.approvals.token_request_binding`), now used up. `PendingApproval`: a human
        must decide (a new request, or the same one still pending). `Denied`: the OAuth error.
        """
        gated = self.gated(scopes)
        if not gated:
            return "approved"
        now = self.clock.now()
        if auth_req_id is None:
            return await self._ask(agent_id, scopes, gated, task_id, purpose, request_fingerprint)
        try:
            approval = await self.store.get_approval(auth_req_id)
        except NotFound:
            return Denied("invalid_grant", _INVALID_ID)
        if approval.kind is not ApprovalKind.TOKEN or approval.agent_id != agent_id:
            return Denied("invalid_grant", _INVALID_ID)
        status = effective_status(approval, now)
        if status is ApprovalStatus.PENDING:
            return self._pending(approval, now)
        if status is ApprovalStatus.DENIED:
            return Denied("access_denied", "an approver denied this token request")
        if status is ApprovalStatus.EXPIRED:
            return Denied(
                "expired_token", "the approval request expired before it was used; ask again"
            )
        try:
            await self.store.consume_approval(approval.id, request_fingerprint, at=now)
        except ApprovalRefused as exc:
            logger.info(
                "token approval not used",
                extra={"approval_id": approval.id, "problem": exc.problem.value},
            )
            if exc.problem is Problem.BINDING_MISMATCH:
                return Denied("invalid_grant", "auth_req_id was approved for a different request")
            if exc.problem is Problem.EXPIRED:
                return Denied("expired_token", "the approval expired before it was used")
            return Denied("invalid_grant", "auth_req_id was already used")
        logger.info("token approval used", extra={"approval_id": approval.id})
        return "approved"

    async def _ask(
        self,
        agent_id: str,
        scopes: Sequence[str],
        gated: Sequence[str],
        task_id: str | None,
        purpose: str,
        fingerprint: str,
    ) -> PendingApproval:
        now = self.clock.now()
        # The same request asked again without its id: answer with the one already waiting.
        waiting = await self.store.list_approvals(
            status=ApprovalStatus.PENDING, kind=ApprovalKind.TOKEN, agent_id=agent_id
        )
        for approval in waiting:
            if approval.binding == fingerprint and not approval.expired_at(now):
                return self._pending(approval, now)
        ordered = [*gated, *(s for s in dict.fromkeys(scopes) if s not in gated)]
        approval = new_token_approval(
            self._new_id(),
            agent_id=agent_id,
            task_id=task_id or "",
            purpose=purpose,
            scopes=ordered,
            binding=fingerprint,
            now=now,
            ttl_seconds=self.config.token_request_ttl,
        )
        await self.store.create_approval(approval)
        logger.info(
            "token request held for approval",
            extra={"approval_id": approval.id, "agent_id": agent_id, "scopes": list(gated)},
        )
        return self._pending(approval, now)

    async def require(
        self,
        agent_id: str,
        scopes: Sequence[str],
        *,
        task_id: str | None,
        purpose: str,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
        budget: int | None = None,
        expires_in: int | None = None,
        auth_req_id: str | None = None,
    ) -> None:
        """`check` for the token service: returns when the token may be minted, else raises.

        Call it after every other check of the request, right before minting: an approved
        approval is used up by this call.

        Raises:
            AuthorizationPending: ``authorization_pending`` with the approval id.
            OAuthError: ``access_denied``, ``expired_token`` or ``invalid_grant``.
        """
        fingerprint = token_request_binding(
            agent_id,
            scopes,
            task_id=task_id,
            purpose=purpose,
            authorization_details=authorization_details,
            budget=budget,
            expires_in=expires_in,
        )
        outcome = await self.check(
            agent_id,
            scopes,
            task_id=task_id,
            purpose=purpose,
            request_fingerprint=fingerprint,
            auth_req_id=auth_req_id,
        )
        if isinstance(outcome, PendingApproval):
            raise AuthorizationPending(outcome)
        if isinstance(outcome, Denied):
            raise OAuthError(outcome.error, outcome.description)
