"""The admin API ``/admin/api/v1``: JSON over bearer admin tokens, one role per endpoint. Shell.

Every endpoint is a row of `ENDPOINTS` (method, path, the least role that may call it, handler);
the role matrix is that table and nothing else: ``reviewer`` reads, ``approver`` also approves
tool definitions and human approvals, ``admin`` does everything (admin ⊇ approver ⊇ reviewer).

Order of checks on every request: the path and method (404/405), the credential (401: missing,
malformed, unknown, revoked; an agent's JWT never has an admin token's shape, so it is refused
here before any lookup), the role (403), then the body (415 unless ``application/json``, 413
past `MAX_BODY_BYTES`, 400 for bad JSON, a duplicate key, a non-finite number or a field that
fails validation), then the action (404, 409, 503 when the store is down). Every error is
``{"error": kebab-case code, "detail": text}``: never a stack trace, a token or an argument value.

Audit: no ``admin_actions`` table exists, so each admin token has its own hash-chained session
(``adm_<token id>``, agent ``admin:<token id>``, task ``admin-actions``) in the same tables as
agent sessions, verified by the same `verify_chain`. Each state-changing action writes an
``admin-action`` event *before* it acts (``phase: requested``; if that cannot be written the
action is refused with 503, fail closed) and one after (``phase: done`` or ``failed``); both
carry the action id in ``decision_id`` so `find_event_by_decision` finds them. `AdminActions` is
that logic, shared with the review page.

Sessions are paged newest first with an opaque ``cursor`` (the last seen start time and how many
sessions at that instant were already returned), so new sessions never shift a page. Filtering
by decision reads events, so one page examines at most `SCAN_LIMIT` sessions and may return
fewer than ``limit`` with a cursor to continue.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from broker.admin_tokens import authenticate_admin
from broker.core.identity import AdminRole, AdminToken, Agent, AgentStatus
from broker.core.pinning import PinStatus, ToolPin
from broker.core.recording import (
    ChainReport,
    EventKind,
    RecordedEvent,
    SessionRecord,
    format_timestamp,
    genesis_hash,
    seal_event,
    session_identity,
    verify_chain,
)
from broker.core.revocation import IssuedToken, Revocation
from broker.errors import AdminAuthFailed, NotFound, StoreError, StoreUnavailable
from broker.ports import role_allows
from broker.session_queries import (
    EVENT_BATCH,
    all_events,
    event_json,
    report_json,
)
from broker.session_queries import session_json as recorded_session_json
from broker.store.errors import Conflict

__all__ = [
    "ADMIN_ACTION_KIND",
    "ADMIN_API_PREFIX",
    "ENDPOINTS",
    "MAX_BODY_BYTES",
    "SCAN_LIMIT",
    "AdminActions",
    "AdminAudit",
    "ApiError",
    "ApprovalsPort",
    "Endpoint",
    "SessionFilters",
    "admin_routes",
    "agent_json",
    "all_events",
    "definition_diff",
    "event_json",
    "page_sessions",
    "parse_strict_json",
    "pin_json",
    "read_body",
    "report_json",
    "session_json",
    "verify_session",
]

logger = logging.getLogger(__name__)

ADMIN_API_PREFIX = "/admin/api/v1"
ADMIN_ACTION_KIND = "admin-action"
MAX_BODY_BYTES = 64 * 1024
SCAN_LIMIT = 500
"""Sessions (or events) one filtered page may examine before it answers with a cursor."""
MAX_LIMIT = 500
_AUDIT_ATTEMPTS = 12
_FLAG_RE = re.compile(r"[a-z0-9][a-z0-9:_.-]{0,63}")
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_ANY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""Every route takes every method so that a wrong one gets the JSON 405 of this module."""


# -- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than success: an HTTP status, a kebab-case code and a safe detail."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail

    def response(self) -> JSONResponse:
        headers = dict(_NO_STORE)
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="broker-admin"'
        return JSONResponse(
            {"error": self.error, "detail": self.detail}, self.status, headers=headers
        )


# -- JSON views ------------------------------------------------------------------------------


def _ts(at: datetime | None) -> str | None:
    return None if at is None else format_timestamp(at)


def agent_json(agent: Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "owner": agent.owner,
        "status": agent.status.value,
        "status_reason": agent.status_reason,
        "allowed_scopes": list(agent.allowed_scopes),
        "max_ttl_seconds": agent.max_ttl_seconds,
        "max_delegation_depth": agent.max_delegation_depth,
        "auth_method": agent.auth_method,
        "public_jwk": agent.public_jwk,
        "created_at": _ts(agent.created_at),
    }


def session_json(session: SessionRecord) -> dict[str, Any]:
    """A session as the admin API shows it: the shared view plus whether it is sealed."""
    return {**recorded_session_json(session), "sealed": session.head_hash is not None}


def _render_definition(definition: Mapping[str, Any]) -> str:
    # ASCII-only: a definition's text cannot smuggle control characters into a viewer.
    return json.dumps(definition, indent=2, sort_keys=True, ensure_ascii=True)


def definition_diff(approved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """A unified diff from the approved definition (nothing, for a new tool) to the current."""
    before = [] if approved is None else _render_definition(approved).splitlines()
    return "\n".join(
        difflib.unified_diff(
            before,
            _render_definition(current).splitlines(),
            fromfile="approved",
            tofile="current",
            lineterm="",
        )
    )


def pin_json(pin: ToolPin, *, with_diff: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "connector_id": pin.connector_id,
        "tool_name": pin.tool_name,
        "status": pin.status.value,
        "digest": pin.digest,
        "definition": dict(pin.definition),
        "first_seen": _ts(pin.first_seen),
        "updated_at": _ts(pin.updated_at),
        "approved_digest": pin.approved_digest,
        "approved_at": _ts(pin.approved_at),
        "approved_by": pin.approved_by,
    }
    if with_diff and pin.status is not PinStatus.APPROVED:
        out["diff"] = definition_diff(pin.approved_definition, pin.definition)
    return out


def _token_json(token: IssuedToken) -> dict[str, Any]:
    return {
        "jti": token.jti,
        "agent_id": token.agent_id,
        "task_id": token.task_id,
        "purpose": token.purpose,
        "scopes": list(token.scopes),
        "issued_at": _ts(token.issued_at),
        "expires_at": _ts(token.expires_at),
        "parent_jti": token.parent_jti,
        "chain": list(token.chain),
        "budget": token.budget,
    }


def _revocation_json(revocation: Revocation) -> dict[str, Any]:
    return {
        "seq": revocation.seq,
        "kind": revocation.kind.value,
        "subject": revocation.subject,
        "at": _ts(revocation.at),
        "reason": revocation.reason,
        "actor": revocation.actor,
    }


def _plain(value: object) -> Any:
    """Scope operands (tuples, sorted pairs) as plain JSON."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]  # pyright: ignore[reportUnknownVariableType]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}  # pyright: ignore[reportUnknownVariableType]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _scope_json(definition: Any) -> dict[str, Any]:
    return {
        "name": definition.name,
        "description": definition.description,
        "labels": sorted(str(label) for label in definition.labels),
        "approval": str(definition.approval),
        "source": str(definition.source),
        "grants": [
            {
                "id": g.id,
                "connector": g.connector,
                "tools": list(g.tools),
                "constraints": [
                    {"path": c.path, "operators": [[name, _plain(v)] for name, v in c.operators]}
                    for c in g.constraints.items
                ],
            }
            for g in definition.grants
        ],
    }


# -- sessions: filters, paging, verification --------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionFilters:
    agent_id: str | None = None
    task_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    flagged: bool | None = None
    decision: Literal["allowed", "denied"] | None = None


def _encode_cursor(at: datetime, skip: int) -> str:
    raw = json.dumps({"t": format_timestamp(at), "k": skip}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        at = datetime.fromisoformat(str(data["t"]).replace("Z", "+00:00"))
        skip = int(data["k"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ApiError(400, "bad-cursor", "the cursor is not one this API returned") from None
    if at.tzinfo is None or not 0 <= skip <= 1_000_000:
        raise ApiError(400, "bad-cursor", "the cursor is not one this API returned")
    return at, skip


async def _has_decision(store: Any, session_id: str, allowed: bool) -> bool:
    after = 0
    while True:
        batch: Sequence[RecordedEvent] = await store.session_events(
            session_id, after_seq=after, limit=EVENT_BATCH
        )
        for event in batch:
            if event.kind == EventKind.DECISION and bool(event.payload.get("allowed")) is allowed:
                return True
        if len(batch) < EVENT_BATCH:
            return False
        after = batch[-1].seq


async def page_sessions(
    store: Any, filters: SessionFilters, *, limit: int, cursor: str | None = None
) -> tuple[list[SessionRecord], str | None]:
    """One page of sessions, newest first, and the cursor of the next page (None at the end).

    Raises:
        ApiError: a malformed cursor (400).
        StoreUnavailable: the store cannot be read.
    """
    at, skip = _decode_cursor(cursor) if cursor else (None, 0)
    out: list[SessionRecord] = []
    examined = 0
    batch_size = min(max(limit, 50), SCAN_LIMIT)
    while len(out) < limit and examined < SCAN_LIMIT:
        until = filters.until
        if at is not None:
            bound = at + timedelta(microseconds=1)
            until = bound if until is None else min(until, bound)
        rows: Sequence[SessionRecord] = await store.list_sessions(
            agent_id=filters.agent_id,
            task_id=filters.task_id,
            since=filters.since,
            until=until,
            flagged=filters.flagged,
            limit=batch_size,
            offset=skip if at is not None else 0,
        )
        consumed = 0
        for session in rows:
            consumed += 1
            examined += 1
            if at is not None and session.started_at == at:
                skip += 1
            else:
                at, skip = session.started_at, 1
            if filters.decision is None or await _has_decision(
                store, session.id, filters.decision == "allowed"
            ):
                out.append(session)
            if len(out) >= limit or examined >= SCAN_LIMIT:
                break
        if len(rows) < batch_size and consumed == len(rows):
            return out, None
    if at is None:
        return out, None
    return out, _encode_cursor(at, skip)


async def verify_session(store: Any, session_id: str) -> ChainReport:
    """Recompute one session's chain from the store.

    Raises:
        NotFound: no such session. StoreUnavailable: the store cannot be read.
    """
    session = await store.get_session(session_id)
    return verify_chain(session, await all_events(store, session_id))


# -- audit and actions ------------------------------------------------------------------------


class AdminAudit:
    """Appends ``admin-action`` events to one hash-chained session per admin token.

    Safe against other writers (another replica, another instance): an append that loses a race
    is refused by the store (`Conflict`) and retried on the new head.
    """

    def __init__(self, store: Any, clock: Any) -> None:
        self._store = store
        self._clock = clock
        self._lock = anyio.Lock()
        self._sessions: dict[str, SessionRecord] = {}

    @staticmethod
    def session_id(token: AdminToken) -> str:
        return f"adm_{token.id}"

    async def _session(self, token: AdminToken) -> SessionRecord:
        known = self._sessions.get(token.id)
        if known is not None:
            return known
        sid = self.session_id(token)
        try:
            record = await self._store.get_session(sid)
        except NotFound:
            record = SessionRecord(
                id=sid,
                agent_id=f"admin:{token.id}",
                token_jti=f"admin:{token.id}",
                task_id="admin-actions",
                started_at=self._clock.now(),
                transport="admin",
                client_info={"name": token.name, "role": token.role.value},
            )
            try:
                await self._store.open_session(record)
            except Conflict:
                record = await self._store.get_session(sid)
        self._sessions[token.id] = record
        return record

    async def record(
        self, token: AdminToken, payload: Mapping[str, Any], *, action_id: str
    ) -> RecordedEvent:
        """Append one ``admin-action`` event; returns it once committed.

        Raises:
            StoreUnavailable: it could not be written.
        """
        async with self._lock:
            for attempt in range(_AUDIT_ATTEMPTS):
                session = await self._session(token)
                head = await self._store.session_head(session.id)
                events: list[RecordedEvent] = []
                if head is None:
                    opened = seal_event(
                        session.id,
                        1,
                        session.started_at,
                        EventKind.SESSION_OPENED,
                        session_identity(session),
                        None,
                        genesis_hash(session.id),
                    )
                    events.append(opened)
                    seq, prev = 1, opened.hash
                else:
                    seq, prev = head
                event = seal_event(
                    session.id,
                    seq + 1,
                    self._clock.now(),
                    ADMIN_ACTION_KIND,
                    payload,
                    action_id,
                    prev,
                )
                events.append(event)
                try:
                    await self._store.append_events(events)
                except Conflict:
                    # Another writer appended first: back off a random while, then retry on
                    # the new head (jitter keeps two writers from colliding in lock-step).
                    await anyio.sleep(secrets.randbelow(1 << min(attempt + 1, 7)) / 1000)
                    continue
                return event
        raise StoreUnavailable("the admin audit trail kept moving; the action was not recorded")


class ApprovalsPort(Protocol):
    """Human approvals of calls and token requests: `broker.approvals.ApprovalDesk`.

    ``list`` may raise ValueError for an unknown state (400); ``decide`` raises NotFound (404)
    or Conflict (409: expired or already decided).
    """

    async def list(self, *, state: str | None) -> Sequence[Mapping[str, Any]]: ...

    async def decide(
        self, approval_id: str, *, approve: bool, actor: str, reason: str
    ) -> Mapping[str, Any]: ...


class AdminActions:
    """State-changing admin operations, each recorded before and after it acts.

    ``channel`` in the audit says where the action came from (``api`` or ``review``).
    """

    def __init__(self, services: Any, audit: AdminAudit | None = None) -> None:
        self.services = services
        self.audit = audit or AdminAudit(services.store, services.clock)

    @property
    def store(self) -> Any:
        return self.services.store

    def _metrics(self) -> Any:
        return getattr(self.services, "metrics", None)

    async def _run(
        self,
        token: AdminToken,
        action: str,
        target: Mapping[str, Any],
        reason: str | None,
        channel: str,
        body: Callable[[str], Awaitable[Any]],
    ) -> Any:
        action_id = f"adm_act_{secrets.token_hex(10)}"
        base: dict[str, Any] = {
            "action": action,
            "target": dict(target),
            "actor": f"admin:{token.id}",
            "role": token.role.value,
            "channel": channel,
        }
        if reason is not None:
            base["reason"] = reason
        try:
            await self.audit.record(token, {**base, "phase": "requested"}, action_id=action_id)
        except StoreError:
            logger.exception("admin action not recorded; refused", extra={"action": action})
            raise StoreUnavailable("the audit trail cannot be written; nothing was done") from None
        try:
            result = await body(f"admin:{token.id}")
        except Exception as exc:
            code = _error_code(exc)
            try:
                await self.audit.record(
                    token, {**base, "phase": "failed", "error": code}, action_id=action_id
                )
            except StoreError:
                logger.exception("admin action outcome not recorded", extra={"action": action})
            raise
        try:
            await self.audit.record(token, {**base, "phase": "done"}, action_id=action_id)
        except StoreError:
            logger.exception(
                "admin action outcome not recorded", extra={"action": action, "id": action_id}
            )
        return result

    async def set_status(
        self,
        token: AdminToken,
        agent_ref: str,
        status: AgentStatus,
        reason: str,
        *,
        channel: str = "api",
    ) -> Agent:
        """Disable, quarantine or release an agent.

        Raises:
            NotFound: no such agent. ApiError: 409 when releasing an active agent or the status
            is already the one asked. StoreUnavailable.
        """
        agent = await self.store.find_agent(agent_ref)
        if agent.status is status:
            raise ApiError(409, "no-change", f"the agent is already {status.value}")
        action = {
            AgentStatus.ACTIVE: "agent.release",
            AgentStatus.QUARANTINED: "agent.quarantine",
            AgentStatus.DISABLED: "agent.disable",
        }[status]

        async def body(actor: str) -> Agent:
            at = self.services.clock.now()
            updated: Agent = await self.store.set_agent_status(
                agent.id, status, reason=reason, actor=actor, at=at
            )
            revocations = self.services.revocations
            if revocations is not None:
                revocations.apply_status(agent.id, status, at)
            front = getattr(self.services, "front", None)
            if status is not AgentStatus.ACTIVE and front is not None:
                # Takes effect at once: calls in flight are cancelled, live sessions closed.
                await front.cut_off(agent.id)
            metrics = self._metrics()
            if metrics is not None:
                metrics.agent_status_changed(status.value)
            return updated

        return await self._run(token, action, {"agent_id": agent.id}, reason, channel, body)

    async def create_agent(
        self, token: AdminToken, body_in: CreateAgentBody, *, channel: str = "api"
    ) -> tuple[Agent, str | None]:
        from broker.agents import register_agent

        async def body(_actor: str) -> tuple[Agent, str | None]:
            try:
                return await register_agent(
                    self.store,
                    name=body_in.name,
                    owner=body_in.owner,
                    scopes=body_in.scopes,
                    max_ttl=body_in.max_ttl_seconds,
                    public_jwk=body_in.public_jwk,
                    now=self.services.clock.now(),
                    max_delegation_depth=body_in.max_delegation_depth,
                )
            except ValueError as exc:
                raise ApiError(400, "invalid-request", str(exc)) from None

        return await self._run(token, "agent.create", {"name": body_in.name}, None, channel, body)

    async def approve_pin(
        self,
        token: AdminToken,
        connector_id: str,
        tool_name: str,
        digest: str,
        *,
        channel: str = "api",
    ) -> ToolPin:
        """Approve exactly ``digest`` of a tool's current definition.

        Raises:
            NotFound. Conflict: the definition changed since it was shown. StoreUnavailable.
        """

        async def body(actor: str) -> ToolPin:
            pin: ToolPin = await self.store.approve_pin(
                connector_id, tool_name, digest, actor, self.services.clock.now()
            )
            registry = self.services.registry
            if registry is not None:
                await registry.reload_pins()
            return pin

        target = {"connector_id": connector_id, "tool_name": tool_name, "digest": digest}
        return await self._run(token, "pin.approve", target, None, channel, body)

    async def revoke(
        self, token: AdminToken, kind: str, subject: str, reason: str, *, channel: str = "api"
    ) -> Revocation:
        tokens = self.services.tokens

        async def body(actor: str) -> Revocation:
            if kind == "jti":
                return await tokens.revoke_token(subject, reason=reason, actor=actor)
            if kind == "task":
                return await tokens.revoke_task(subject, reason=reason, actor=actor)
            return await tokens.revoke_agent(subject, reason=reason, actor=actor)

        return await self._run(token, f"revoke.{kind}", {kind: subject}, reason, channel, body)

    async def flag_session(
        self, token: AdminToken, session_id: str, flag: str, *, channel: str = "api"
    ) -> SessionRecord:
        async def body(_actor: str) -> SessionRecord:
            return await self.store.flag_session(session_id, flag)

        target = {"session_id": session_id, "flag": flag}
        return await self._run(token, "session.flag", target, None, channel, body)

    async def decide_approval(
        self,
        token: AdminToken,
        approvals: ApprovalsPort,
        approval_id: str,
        *,
        approve: bool,
        reason: str,
        channel: str = "api",
    ) -> Mapping[str, Any]:
        """Approve or deny a held call or token request through the approvals service.

        Raises:
            NotFound. Conflict: expired or already decided. StoreUnavailable.
        """

        async def body(actor: str) -> Mapping[str, Any]:
            return await approvals.decide(approval_id, approve=approve, actor=actor, reason=reason)

        action = "approval.approve" if approve else "approval.deny"
        target = {"approval_id": approval_id}
        return await self._run(token, action, target, reason or None, channel, body)

    async def revoke_admin_token(
        self, token: AdminToken, token_id: str, *, channel: str = "api"
    ) -> AdminToken:
        async def body(_actor: str) -> AdminToken:
            return await self.store.revoke_admin_token(token_id, self.services.clock.now())

        return await self._run(
            token, "admin-token.revoke", {"admin_token_id": token_id}, None, channel, body
        )


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.error
    if isinstance(exc, NotFound):
        return "not-found"
    if isinstance(exc, Conflict):
        return "conflict"
    if isinstance(exc, StoreUnavailable):
        return "store-unavailable"
    return "internal"


# -- request bodies ---------------------------------------------------------------------------


_B = TypeVar("_B", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ReasonBody(_Body):
    reason: str = Field(min_length=1, max_length=1000)


class CreateAgentBody(_Body):
    name: str = Field(min_length=1, max_length=64)
    owner: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(min_length=1, max_length=100)
    max_ttl_seconds: int = 600
    public_jwk: dict[str, Any] | None = None
    max_delegation_depth: int = 2


class ApprovePinBody(_Body):
    connector_id: str = Field(min_length=1, max_length=64)
    tool_name: str = Field(min_length=1, max_length=256)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


class RevokeBody(_Body):
    jti: str | None = Field(default=None, min_length=1, max_length=200)
    task: str | None = Field(default=None, min_length=1, max_length=200)
    agent: str | None = Field(default=None, min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=1000)


class FlagBody(_Body):
    flag: str = Field(pattern=_FLAG_RE.pattern)


class DecideApprovalBody(_Body):
    reason: str = Field(default="", max_length=1000)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ApiError(400, "invalid-json", "a JSON object repeats a key")
        out[key] = value
    return out


def _no_constants(_name: str) -> Any:
    raise ApiError(400, "invalid-json", "NaN and Infinity are not JSON")


def parse_strict_json(raw: bytes) -> Any:
    """JSON with no duplicate keys and no NaN/Infinity.

    Raises:
        ApiError: 400 ``invalid-json``.
    """
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid-json", "the body is not valid UTF-8 JSON") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad-request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, "body-too-large", f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body-too-large", f"the body is larger than {limit} bytes")
    return bytes(body)


async def _json_body(request: Request, model: type[_B]) -> _B:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported-media-type", "send the body as application/json")
    data = parse_strict_json(await read_body(request, MAX_BODY_BYTES))
    if not isinstance(data, dict):
        raise ApiError(400, "invalid-request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, "invalid-request", f"{where}: {first['msg']}") from None


# -- handlers ---------------------------------------------------------------------------------


@dataclass
class Ctx:
    """One authenticated request."""

    request: Request
    services: Any
    actions: AdminActions
    approvals: ApprovalsPort | None
    token: AdminToken
    params: Mapping[str, str] = field(default_factory=dict[str, str])

    @property
    def store(self) -> Any:
        return self.services.store

    def query(self, name: str) -> str | None:
        value = self.request.query_params.get(name)
        return None if value is None or value == "" else value


Handler = Callable[[Ctx], Awaitable[Response]]


def _ok(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status, headers=_NO_STORE)


def _int_param(ctx: Ctx, name: str, default: int, low: int, high: int) -> int:
    raw = ctx.query(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, "invalid-query", f"{name}: expected an integer from {low} to {high}")
    return int(raw)


def _time_param(ctx: Ctx, name: str) -> datetime | None:
    raw = ctx.query(name)
    if raw is None:
        return None
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "invalid-query", f"{name}: expected an RFC 3339 time") from None
    if at.tzinfo is None:
        raise ApiError(400, "invalid-query", f"{name}: the time needs a UTC offset")
    return at


def _bool_param(ctx: Ctx, name: str) -> bool | None:
    raw = ctx.query(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise ApiError(400, "invalid-query", f"{name}: expected true or false")
    return raw == "true"


async def whoami(ctx: Ctx) -> Response:
    return _ok({"id": ctx.token.id, "name": ctx.token.name, "role": ctx.token.role.value})


async def list_agents(ctx: Ctx) -> Response:
    status = ctx.query("status")
    if status is not None and status not in {s.value for s in AgentStatus}:
        raise ApiError(400, "invalid-query", "status: expected active, quarantined or disabled")
    agents: Sequence[Agent] = await ctx.store.list_agents()
    return _ok(
        {"agents": [agent_json(a) for a in agents if status is None or a.status.value == status]}
    )


async def get_agent(ctx: Ctx) -> Response:
    return _ok(agent_json(await ctx.store.find_agent(ctx.params["agent_id"])))


async def create_agent(ctx: Ctx) -> Response:
    body = await _json_body(ctx.request, CreateAgentBody)
    agent, secret = await ctx.actions.create_agent(ctx.token, body)
    return _ok({"agent": agent_json(agent), "client_secret": secret}, 201)


def _status_handler(status: AgentStatus) -> Handler:
    async def handler(ctx: Ctx) -> Response:
        body = await _json_body(ctx.request, ReasonBody)
        reason = body.reason.strip()
        if not reason:
            raise ApiError(400, "invalid-request", "reason: say why")
        agent = await ctx.actions.set_status(ctx.token, ctx.params["agent_id"], status, reason)
        return _ok(agent_json(agent))

    return handler


async def _connector_rows(ctx: Ctx) -> list[tuple[Any, str]]:
    from broker.registry import connector_configs

    stored = await ctx.store.list_connectors()
    stored_ids = {c.id for c in stored}
    return [
        (c, "store" if c.id in stored_ids else "config")
        for c in connector_configs(ctx.services.config, stored)
    ]


def _connector_json(connector: Any, source: str, pins: Sequence[ToolPin]) -> dict[str, Any]:
    counts = {s.value: 0 for s in PinStatus}
    for pin in pins:
        counts[pin.status.value] += 1
    return {
        "id": connector.id,
        "kind": connector.kind,
        "tool_prefix": connector.tool_prefix,
        "source": source,
        "pins": counts,
    }


async def list_connectors(ctx: Ctx) -> Response:
    pins: Sequence[ToolPin] = await ctx.store.list_pins()
    by_id: dict[str, list[ToolPin]] = {}
    for pin in pins:
        by_id.setdefault(pin.connector_id, []).append(pin)
    rows = await _connector_rows(ctx)
    return _ok({"connectors": [_connector_json(c, s, by_id.get(c.id, [])) for c, s in rows]})


async def get_connector(ctx: Ctx) -> Response:
    wanted = ctx.params["connector_id"]
    for connector, source in await _connector_rows(ctx):
        if connector.id == wanted:
            pins: Sequence[ToolPin] = await ctx.store.get_pins(wanted)
            out = _connector_json(connector, source, pins)
            out["tools"] = [pin_json(p) for p in pins]
            return _ok(out)
    raise NotFound("no such connector")


async def list_pins(ctx: Ctx) -> Response:
    raw = ctx.query("status") or "pending,changed"
    wanted: set[PinStatus] = set()
    for part in raw.split(","):
        if part == "all":
            wanted.update(PinStatus)
            continue
        try:
            wanted.add(PinStatus(part))
        except ValueError:
            raise ApiError(
                400, "invalid-query", "status: expected pending, changed, approved or all"
            ) from None
    pins: Sequence[ToolPin] = await ctx.store.list_pins()
    return _ok({"pins": [pin_json(p) for p in pins if p.status in wanted]})


async def approve_pin(ctx: Ctx) -> Response:
    body = await _json_body(ctx.request, ApprovePinBody)
    pin = await ctx.actions.approve_pin(ctx.token, body.connector_id, body.tool_name, body.digest)
    return _ok(pin_json(pin))


async def list_scopes(ctx: Ctx) -> Response:
    scopes: Mapping[str, Any] = ctx.services.scopes or {}
    return _ok({"scopes": [_scope_json(scopes[name]) for name in sorted(scopes)]})


async def list_tokens(ctx: Ctx) -> Response:
    active = _bool_param(ctx, "active")
    limit = _int_param(ctx, "limit", 100, 1, MAX_LIMIT)
    tokens: Sequence[IssuedToken] = await ctx.store.list_tokens(
        agent_id=ctx.query("agent"),
        task_id=ctx.query("task"),
        active_at=ctx.services.clock.now() if active else None,
    )
    newest = sorted(tokens, key=lambda t: (t.issued_at, t.jti), reverse=True)
    return _ok({"tokens": [_token_json(t) for t in newest[:limit]], "total": len(tokens)})


async def revoke_tokens(ctx: Ctx) -> Response:
    body = await _json_body(ctx.request, RevokeBody)
    given = [
        (k, v) for k, v in (("jti", body.jti), ("task", body.task), ("agent", body.agent)) if v
    ]
    if len(given) != 1:
        raise ApiError(400, "invalid-request", "name exactly one of jti, task or agent")
    reason = body.reason.strip()
    if not reason:
        raise ApiError(400, "invalid-request", "reason: say why")
    kind, subject = given[0]
    revocation = await ctx.actions.revoke(ctx.token, kind, subject, reason)
    return _ok(_revocation_json(revocation))


def _filters(ctx: Ctx) -> SessionFilters:
    decision = ctx.query("decision")
    if decision not in (None, "allowed", "denied"):
        raise ApiError(400, "invalid-query", "decision: expected allowed or denied")
    return SessionFilters(
        agent_id=ctx.query("agent"),
        task_id=ctx.query("task"),
        since=_time_param(ctx, "since"),
        until=_time_param(ctx, "until"),
        flagged=_bool_param(ctx, "flagged"),
        decision=decision,  # type: ignore[arg-type]  # narrowed by the check above
    )


async def list_sessions(ctx: Ctx) -> Response:
    filters = _filters(ctx)
    limit = _int_param(ctx, "limit", 50, 1, MAX_LIMIT)
    sessions, cursor = await page_sessions(
        ctx.store, filters, limit=limit, cursor=ctx.query("cursor")
    )
    return _ok({"sessions": [session_json(s) for s in sessions], "next_cursor": cursor})


async def get_session(ctx: Ctx) -> Response:
    return _ok(session_json(await ctx.store.get_session(ctx.params["session_id"])))


async def session_events(ctx: Ctx) -> Response:
    session_id = ctx.params["session_id"]
    await ctx.store.get_session(session_id)
    after = _int_param(ctx, "after", 0, 0, 2**62)
    limit = _int_param(ctx, "limit", 100, 1, MAX_LIMIT)
    kind = ctx.query("kind")
    decision = ctx.query("decision")
    if decision not in (None, "allowed", "denied"):
        raise ApiError(400, "invalid-query", "decision: expected allowed or denied")
    if decision is not None:
        kind = EventKind.DECISION.value
    filtering = kind is not None
    batch_size = EVENT_BATCH if filtering else limit
    out: list[RecordedEvent] = []
    last = after
    examined = 0
    while True:
        batch: Sequence[RecordedEvent] = await ctx.store.session_events(
            session_id, after_seq=last, limit=batch_size
        )
        for event in batch:
            examined += 1
            last = event.seq
            if (kind is None or event.kind == kind) and (
                decision is None or bool(event.payload.get("allowed")) is (decision == "allowed")
            ):
                out.append(event)
            if len(out) >= limit or examined >= SCAN_LIMIT * 10:
                return _ok({"events": [event_json(e) for e in out], "next_after": last})
        if len(batch) < batch_size:
            return _ok({"events": [event_json(e) for e in out], "next_after": None})


async def verify(ctx: Ctx) -> Response:
    return _ok(report_json(await verify_session(ctx.store, ctx.params["session_id"])))


async def flag(ctx: Ctx) -> Response:
    body = await _json_body(ctx.request, FlagBody)
    session = await ctx.actions.flag_session(ctx.token, ctx.params["session_id"], body.flag)
    return _ok(session_json(session))


async def decision_event(ctx: Ctx) -> Response:
    return _ok(event_json(await ctx.store.find_event_by_decision(ctx.params["decision_id"])))


async def list_admin_tokens(ctx: Ctx) -> Response:
    tokens: Sequence[AdminToken] = await ctx.store.list_admin_tokens()
    return _ok(
        {
            "admin_tokens": [
                {
                    "id": t.id,
                    "name": t.name,
                    "role": t.role.value,
                    "created_at": _ts(t.created_at),
                    "revoked_at": _ts(t.revoked_at),
                }
                for t in tokens
            ]
        }
    )


async def revoke_admin_token(ctx: Ctx) -> Response:
    await _json_body(ctx.request, ReasonBody)
    revoked = await ctx.actions.revoke_admin_token(ctx.token, ctx.params["token_id"])
    return _ok({"id": revoked.id, "revoked_at": _ts(revoked.revoked_at)})


_NO_APPROVALS = ApiError(
    501, "not-implemented", "human approvals of calls are not available in this build"
)


async def list_approvals(ctx: Ctx) -> Response:
    if ctx.approvals is None:
        raise _NO_APPROVALS
    try:
        items = await ctx.approvals.list(state=ctx.query("state"))
    except ValueError as exc:
        raise ApiError(400, "invalid-query", str(exc)) from None
    return _ok({"approvals": [dict(i) for i in items]})


def _decide_handler(approve: bool) -> Handler:
    async def handler(ctx: Ctx) -> Response:
        body = await _json_body(ctx.request, DecideApprovalBody)
        if ctx.approvals is None:
            raise _NO_APPROVALS
        result = await ctx.actions.decide_approval(
            ctx.token,
            ctx.approvals,
            ctx.params["approval_id"],
            approve=approve,
            reason=body.reason.strip(),
        )
        return _ok(dict(result))

    return handler


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: Literal["GET", "POST"]
    path: str
    """Relative to `ADMIN_API_PREFIX`, in Starlette's ``{param}`` syntax."""
    needs: AdminRole
    handler: Handler


_R, _P, _A = AdminRole.REVIEWER, AdminRole.APPROVER, AdminRole.ADMIN

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/whoami", _R, whoami),
    Endpoint("GET", "/agents", _R, list_agents),
    Endpoint("POST", "/agents", _A, create_agent),
    Endpoint("GET", "/agents/{agent_id}", _R, get_agent),
    Endpoint("POST", "/agents/{agent_id}/disable", _A, _status_handler(AgentStatus.DISABLED)),
    Endpoint("POST", "/agents/{agent_id}/quarantine", _A, _status_handler(AgentStatus.QUARANTINED)),
    Endpoint("POST", "/agents/{agent_id}/release", _A, _status_handler(AgentStatus.ACTIVE)),
    Endpoint("GET", "/connectors", _R, list_connectors),
    Endpoint("GET", "/connectors/{connector_id}", _R, get_connector),
    Endpoint("GET", "/pins", _R, list_pins),
    Endpoint("POST", "/pins/approve", _P, approve_pin),
    Endpoint("GET", "/scopes", _R, list_scopes),
    Endpoint("GET", "/tokens", _R, list_tokens),
    Endpoint("POST", "/tokens/revoke", _A, revoke_tokens),
    Endpoint("GET", "/sessions", _R, list_sessions),
    Endpoint("GET", "/sessions/{session_id}", _R, get_session),
    Endpoint("GET", "/sessions/{session_id}/events", _R, session_events),
    Endpoint("GET", "/sessions/{session_id}/verify", _R, verify),
    Endpoint("POST", "/sessions/{session_id}/flags", _A, flag),
    Endpoint("GET", "/decisions/{decision_id}", _R, decision_event),
    Endpoint("GET", "/admin-tokens", _A, list_admin_tokens),
    Endpoint("POST", "/admin-tokens/{token_id}/revoke", _A, revoke_admin_token),
    Endpoint("GET", "/approvals", _R, list_approvals),
    Endpoint("POST", "/approvals/{approval_id}/approve", _P, _decide_handler(True)),
    Endpoint("POST", "/approvals/{approval_id}/deny", _P, _decide_handler(False)),
)


async def _authenticate(request: Request, store: Any) -> AdminToken:
    header = request.headers.get("authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise ApiError(401, "unauthenticated", "send an admin token as 'Authorization: Bearer'")
    try:
        return await authenticate_admin(store, raw.strip(), needs=AdminRole.REVIEWER)
    except AdminAuthFailed:
        raise ApiError(401, "unauthenticated", "the admin token is not valid") from None


def _dispatcher(
    services: Any,
    actions: AdminActions,
    approvals: ApprovalsPort | None,
    by_method: Mapping[str, Endpoint],
) -> Callable[[Request], Awaitable[Response]]:
    allowed = ", ".join(sorted(by_method))

    async def endpoint(request: Request) -> Response:
        try:
            spec = by_method.get(request.method)
            if spec is None:
                error = ApiError(405, "method-not-allowed", f"use {allowed}")
                response = error.response()
                response.headers["Allow"] = allowed
                return response
            token = await _authenticate(request, services.store)
            if not role_allows(token.role, spec.needs):
                raise ApiError(
                    403,
                    "forbidden",
                    f"role '{token.role.value}' may not do this (needs '{spec.needs.value}')",
                )
            ctx = Ctx(request, services, actions, approvals, token, dict(request.path_params))
            return await spec.handler(ctx)
        except ApiError as exc:
            return exc.response()
        except NotFound:
            return ApiError(404, "not-found", "no such resource").response()
        except Conflict as exc:
            return ApiError(409, "conflict", str(exc)).response()
        except StoreUnavailable:
            logger.exception("admin API: store unavailable")
            return ApiError(503, "store-unavailable", "the store cannot be reached").response()
        except Exception:
            logger.exception("admin API request failed", extra={"path": request.url.path})
            return ApiError(500, "internal", "the request failed; see the broker log").response()

    return endpoint


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await ApiError(404, "not-found", "no such endpoint").response()(scope, receive, send)


def admin_routes(
    services: Any,
    *,
    actions: AdminActions | None = None,
    approvals: ApprovalsPort | None = None,
) -> list[BaseRoute]:
    """The admin API mounted at `ADMIN_API_PREFIX`.

    ``actions`` may be shared with the review page (one audit writer per process);
    ``approvals`` is the human-approval service (`broker.approvals.ApprovalDesk`); without it
    the approval endpoints answer 501.
    """
    actions = actions or AdminActions(services)
    by_path: dict[str, dict[str, Endpoint]] = {}
    for spec in ENDPOINTS:
        by_path.setdefault(spec.path, {})[spec.method] = spec
    routes: list[BaseRoute] = [
        Route(path, _dispatcher(services, actions, approvals, methods), methods=_ANY_METHOD)
        for path, methods in by_path.items()
    ]
    return [Mount(ADMIN_API_PREFIX, app=Router(routes=routes, default=_not_found))]
