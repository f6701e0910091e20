"""Mediation: the one place where verify -> decide -> forward -> record -> watch meet. Shell.

`Mediator.call_tool` runs every ``tools/call`` through these stages; the first that says no
gives the answer (deny overrides allow; nothing granting means deny):

 1. principal: no verified token -> ``token-invalid`` (nothing is recorded: there is no session);
 2. recorded session, opened lazily (see "Sessions") -> ``store-unavailable`` if it cannot be;
 3. token problem from the revocation view: ``token-revoked``, ``agent-quarantined``,
    ``agent-disabled``, or ``store-unavailable`` when the view is staler than its bound; and
    ``task-closed`` for a token whose task its agent closed (the only one of these the detectors
    are fed: the use of a closed task's token is what ``task-closed-use`` watches for);
 4. route and pin status from the registry snapshot (a covered tool whose connector announced a
    change waits for its re-pinning, else ``upstream-unavailable``);
 5. `broker.core.policy.decide` with the token's `TokenPolicy` (built once per token, bounded
    LRU): ``scope-missing``, ``tool-unapproved``, ``tool-definition-changed``,
    ``constraint-violated``; an exception here is ``decision-error`` (fail closed);
 6. rate limits (token buckets per agent and per connector, then concurrent calls per agent and
    per connector, from ``[limits]``) -> ``rate-limited`` with "retry after N s";
 7. budget (only for a token with a ``budget`` claim: one atomic store update) ->
    ``budget-exhausted``. Rate limits run first on purpose: a refused call must not spend the
    durable budget, while a spent rate-limit token refills by itself;
 8. approval gate for ``approval = "call"`` scopes: the injected `CallApprovals`, else
    ``approval-required``;
 9. the decision event is written ahead (committed; its flush rides on step 11's); then EXACTLY
    the canonical arguments ``decide`` checked are forwarded (progress relayed, cancellation
    flowing down, deadline kept by the connector) -> ``upstream-timeout`` /
    ``upstream-unavailable``;
10. output policy (`broker.core.output`): secrets redacted, size capped (truncation marker, or
    ``result-too-large``), and the session flagged ``untrusted-content`` when the allowing scope
    is labelled ``untrusted``;
11. the result event is recorded durably, and only then is the result returned.

What recording guarantees (when a recorder is wired): every answer the agent receives for a
``tools/call`` that got past stage 1 was preceded by a committed event carrying its decision id.
A denial's decision event is committed before the denial is returned; an allowed call's decision
event (with the redacted canonical arguments) is committed before anything is sent downstream,
and its result event before the result is returned. The decision of a forwarded call is
committed without waiting for the flush to disk (`Recorder.record`'s ``durable=False``): it is in
the store's log and survives the broker dying, and the result's flush, which comes before the
answer, covers it too; only a power loss mid-call could drop it, and then the agent heard
nothing. That saves one flush on every allowed call. When a write fails, the call is refused
with ``store-unavailable``: before forwarding, the downstream never sees the call; after it, the
downstream ran it but the agent never sees the result. A ``store-unavailable`` answer given
because recording failed is itself not in the record (the store is what failed). The request is
folded into the decision event (one commit before forwarding, not two).

Sessions: one recorded session per 2025-era HTTP session (``mcp-session-id``) and token; on the
2026 era (stateless), stdio and in-process transports, one per token (``jti``). Sessions are
sealed when `close_sessions` ends them (quarantine, shutdown) and swept once their token expired.

Quarantine: every running call is registered under its agent id; `cancel_agent` cancels them
(the call answers with the reason given).

Detectors (when a `DetectorBook` is wired): after stage 5 every call the policy decided on (not
the ones refused for a token problem: they are already stopped) is fed to ``precheck`` as an
`Observation`. A verdict that ``blocks`` refuses the call with ``flow-blocked`` or
``anomaly-blocked`` (the detector ids go to the decision's ``rule_ids``); after an allowed call
its result is fed to ``observe_result`` (size, and for ``private`` scopes the secret-looking
values it carried, kept in memory only). Every signal is recorded as a ``detector-signal`` event
under the call's decision id, before the decision event; a verdict whose action is stronger than
``block-call`` is handed to the injected `DetectorResponder` (revoke the token or the task,
quarantine the agent), awaited before the answer so it is in effect when the agent hears back.

Client fingerprint (token misuse): SHA-256 over the client's self-description (``name`` and
``version`` from ``initialize``) and the peer host (``ctx.request.client``, without the port,
which changes per connection); stdio and in-process transports have no peer and use the constant
``local``. Behind a reverse proxy every client shares the proxy's host, so there only the client
info tells clients apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import anyio
import mcp.types as types
from pydantic import ValidationError

from broker.config import LimitsConfig, OutputConfig
from broker.core.decision import Decision, Reason
from broker.core.detectors import (
    Declarations,
    DetectorBook,
    DetectorsConfig,
    Observation,
    Response,
    ResultObservation,
    Signal,
    Verdict,
    declarations,
    purpose_category,
)
from broker.core.limits import Bucket, RateLimit, take
from broker.core.output import OutputPolicy, shape_result
from broker.core.pinning import PinStatus
from broker.core.policy import AccessRequest, Authorization, TokenPolicy, decide
from broker.core.recording import EventKind
from broker.core.redaction import (
    _ASSIGNMENT,  # pyright: ignore[reportPrivateUsage] - reuse the record's secret shapes
    _CANDIDATE,  # pyright: ignore[reportPrivateUsage]
    _SHAPED,  # pyright: ignore[reportPrivateUsage]
    _high_entropy,  # pyright: ignore[reportPrivateUsage]
    _secret_key,  # pyright: ignore[reportPrivateUsage]
)
from broker.core.tokens import TokenClaims
from broker.errors import StoreError
from broker.ports import Clock, SystemClock
from broker.principal import Principal
from broker.registry import Registry, ToolRoute
from connectors import CallTimeout, ConnectorError, JSONValue, ProgressCallback
from scopes import ApprovalMode, Label, ScopeDefinition, ScopeError, parse_authorization_details

__all__ = [
    "CallApprovals",
    "CallContext",
    "CallObserver",
    "ForwardedCall",
    "CallRecorder",
    "DECISION_META",
    "DetectorResponder",
    "MediationStore",
    "Mediator",
    "TokenCheck",
    "client_fingerprint",
    "denial",
    "new_decision_id",
    "token_policy",
]

logger = logging.getLogger("broker.mediation")

UNTRUSTED_FLAG = "untrusted-content"
DECISION_META = "mcp-authz-broker/decision_id"
"""The ``_meta`` key under which an allowed call's result carries its decision id."""
_RECORDED_ARGS_MAX = 16 * 1024
_EXCERPT_CHARS = 2048
_CONCURRENCY_RETRY = 1
_WATCH_TEXT_MAX = 256 * 1024
_WATCH_VALUES_MAX = 16
LOCAL_PEER = "local"
_UNOBSERVED = frozenset(
    {
        Reason.TOKEN_INVALID,
        Reason.TOKEN_REVOKED,
        Reason.AGENT_QUARANTINED,
        Reason.AGENT_DISABLED,
        Reason.STORE_UNAVAILABLE,
        Reason.DECISION_ERROR,
        Reason.UPSTREAM_UNAVAILABLE,
    }
)
"""Denials the detectors are not fed: the token is already stopped, or nothing was decided."""


def new_decision_id() -> str:
    """A fresh, unguessable decision id (``dec_`` + 20 hex digits)."""
    return "dec_" + secrets.token_hex(10)


def denial(
    decision_id: str, *reasons: Reason, retry_after: float | None = None
) -> types.CallToolResult:
    """The wire shape of a denied call: the reasons and the decision id (and a retry hint)."""
    text = f"denied ({','.join(sorted(reasons))}); decision {decision_id}"
    if retry_after is not None:
        text += f"; retry after {max(1, math.ceil(retry_after))} s"
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


# -- seams -------------------------------------------------------------------------------------


class CallApprovals(Protocol):
    """The human-approval gate for calls of ``approval = "call"`` scopes (issue 4, item 5).

    ``gate`` holds the call (bounded by ``[approvals] call_timeout``) while an approver sees the
    exact tool and canonical arguments; it returns None to release the call once, or the reason
    to deny it (``approval-denied``, ``approval-required`` on timeout). An approval must be bound
    to these canonical arguments and be single-use. Cancellation (quarantine) may interrupt it.
    """

    async def gate(
        self,
        principal: Principal,
        decision_id: str,
        connector: str,
        tool: str,
        canonical_arguments: Mapping[str, JSONValue],
    ) -> Reason | None: ...


class TokenCheck(Protocol):
    """The revocation view (`broker.revocations.RevocationCache`)."""

    def check(self, claims: TokenClaims, now: Any) -> Reason | None: ...

    def closed_ref(self, task_id: str) -> str | None: ...


class MediationStore(Protocol):
    """The store operations on the call path (`broker.store.SqlStore`)."""

    async def consume_budget(self, jti: str, limit: int) -> int | None: ...

    async def flag_session(self, session_id: str, flag: str) -> Any: ...


class CallRecorder(Protocol):
    """`broker.recorder.Recorder`, as mediation uses it."""

    async def open_session(
        self,
        *,
        agent_id: str,
        token_jti: str,
        task_id: str,
        session_id: str | None = None,
        protocol_version: str = "",
        transport: str = "",
        client_info: Mapping[str, Any] | None = None,
    ) -> Any: ...

    async def record(
        self,
        session_id: str,
        kind: Any,
        payload: Mapping[str, Any],
        decision_id: str | None = None,
        *,
        durable: bool = True,
        alone: bool = False,
    ) -> Any: ...

    async def close_session(self, session_id: str, *, reason: str | None = None) -> Any: ...


class DetectorResponder(Protocol):
    """`broker.responses.AgentResponder`: carries out a verdict's action (revoke, quarantine).

    ``respond`` must put the action into effect in this process before it returns (the agent
    hears back only afterwards) and must not wait on anything slow (alerts go in the background).
    """

    async def respond(
        self, verdict: Verdict, principal: Principal, decision_id: str, session_id: str | None
    ) -> None: ...

    def bind(self, cut_off: Callable[[str, Reason], Awaitable[int]]) -> None:
        """The front's ``cut_off(agent_id, reason)``: cancel calls in flight, close sessions."""
        ...


class CallObserver(Protocol):
    """Metrics (`broker.metrics.Metrics`): what the call path reports; never raises."""

    def observe_call(
        self,
        decision: str | bool,
        reasons: Iterable[str] = (),
        *,
        overhead_s: float,
        downstream_s: float | None = None,
    ) -> None: ...

    def store_write_failed(self, events: int = 1) -> None: ...

    def session_opened(self) -> None: ...

    def session_closed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling, over what, as the MCP front saw it."""

    principal: Principal | None
    http_session_id: str | None = None
    """The 2025-era ``mcp-session-id``; None on 2026, stdio and in-process transports."""
    protocol_version: str = ""
    transport: str = ""
    client_info: Mapping[str, Any] = field(default_factory=dict[str, Any])
    progress: ProgressCallback | None = None
    peer: str | None = None
    """The client's host as the transport saw it (HTTP); None on stdio and in-process."""


# -- per-token state ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Token:
    policy: TokenPolicy
    claims: TokenClaims | None
    budget: int | None
    expires: int | None
    problem: Reason | None = None
    _wide: frozenset[str] | None = None
    _declared: Declarations | None = None

    def declared(self, raw: Mapping[str, Any] | None) -> Declarations:
        """The flows and tools the token declares (`broker.core.detectors.declarations`)."""
        if self._declared is None:
            details = raw.get("authorization_details") if raw else None
            try:
                self._declared = declarations(details if isinstance(details, list) else None)  # pyright: ignore[reportUnknownArgumentType]
            except ValueError:
                # The token service validated the details at issue; a bad one declares nothing.
                self._declared = Declarations()
        return self._declared

    def wide_connectors(self) -> frozenset[str]:
        """Connectors open beyond tools (resources, prompts, completion): an unconstrained
        ``"*"`` grant, and, when the token narrows, an unconstrained ``"*"`` detail too."""
        if self._wide is None:
            wide = {
                g.connector
                for s in self.policy.scopes
                for g in s.grants
                if "*" in g.tools and not g.constraints.items
            }
            if self.policy.narrowing:
                wide &= {
                    g.connector
                    for g in self.policy.narrowing
                    if "*" in g.tools and not g.constraints.items
                }
            self._wide = frozenset(wide)
        return self._wide


class ForwardedCall(NamedTuple):
    """A call forwarded to a connector and not yet answered: who made it, under which decision."""

    decision_id: str
    agent_id: str
    session_id: str | None
    """The recorded session of the call; None when nothing records (no recorder wired)."""


@dataclass(slots=True)
class _Session:
    agent_id: str
    expires: int | None
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    id: str | None = None
    flags: set[str] = field(default_factory=set[str])


_PIN_STATUS = {
    None: PinStatus.APPROVED,
    Reason.TOOL_UNAPPROVED: PinStatus.PENDING,
    Reason.TOOL_DEFINITION_CHANGED: PinStatus.CHANGED,
}


_CUT_OFF = {
    Response.QUARANTINE_AGENT: Reason.AGENT_QUARANTINED,
    Response.REVOKE_TOKEN: Reason.TOKEN_REVOKED,
    Response.REVOKE_TASK: Reason.TOKEN_REVOKED,
}
"""Detector responses that cut the caller off, and the reason its answer names."""


class _Refused(Exception):
    """A stage said no (internal control flow; never leaves the mediator)."""

    def __init__(
        self,
        *reasons: Reason,
        retry_after: float | None = None,
        decision: Decision | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        super().__init__(",".join(reasons))
        self.reasons = reasons
        self.retry_after = retry_after
        self.decision = decision
        self.verdict = verdict


# -- the mediator ------------------------------------------------------------------------------


class Mediator:
    """Decides, limits, forwards, shapes and records tool calls (see the module docstring).

    Everything but ``registry`` and ``scopes`` is optional so the front works before it is fully
    wired: without ``recorder`` nothing is recorded; without ``revocations`` no revocation view
    is consulted (the SDK verifier still checks it per request); without ``store`` a token that
    carries a budget is refused (``store-unavailable``: its budget cannot be counted).
    ``local_connectors`` names connectors running on this host whose ``within`` paths are also
    checked after resolving symlinks (``realpath``), and forwarded resolved.
    """

    def __init__(
        self,
        registry: Registry,
        scopes: Sequence[ScopeDefinition],
        *,
        clock: Clock | None = None,
        revocations: TokenCheck | None = None,
        store: MediationStore | None = None,
        recorder: CallRecorder | None = None,
        approvals: CallApprovals | None = None,
        limits: LimitsConfig | None = None,
        output: OutputConfig | None = None,
        known_secrets: Iterable[str] = (),
        local_connectors: Collection[str] = (),
        realpath: Callable[[str], str] = os.path.realpath,
        observer: CallObserver | None = None,
        token_cache_size: int = 4096,
        detectors: DetectorBook | DetectorsConfig | None = None,
        responder: DetectorResponder | None = None,
    ) -> None:
        self.registry = registry
        self.clock: Clock = clock or SystemClock()
        self.revocations = revocations
        self.store = store
        self.recorder = recorder
        self.approvals = approvals
        self.limits = limits or LimitsConfig()
        out = output or OutputConfig()
        self.output = OutputPolicy(
            max_result_bytes=out.max_result_bytes,
            oversize=out.oversize,
            redact_secrets=out.redact_secrets,
            known_secrets=tuple(known_secrets),
        )
        self.local_connectors = frozenset(local_connectors)
        self.realpath = realpath
        self.observer = observer
        self._by_name = {d.name: d for d in scopes}
        self._tokens: OrderedDict[tuple[str, frozenset[str]], _Token] = OrderedDict()
        self._token_cache_size = token_cache_size
        self._sessions: dict[tuple[str, ...], _Session] = {}
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._running: Counter[tuple[str, str]] = Counter()
        self._calls = 0
        """Tool calls being mediated right now (see `_record`)."""
        self._agent_limit = _rate(self.limits.agent_calls_per_minute, self.limits.agent_burst)
        self._connector_limit = _rate(
            self.limits.connector_calls_per_minute, self.limits.connector_burst
        )
        self._inflight: dict[str, set[anyio.CancelScope]] = {}
        self._cut: dict[anyio.CancelScope, Reason] = {}
        self._forwarded: dict[str, dict[str, ForwardedCall]] = {}
        """Calls being forwarded, by connector then decision id (for egress attribution)."""
        if isinstance(detectors, DetectorsConfig):
            detectors = DetectorBook(detectors) if detectors.enabled else None
        self.detectors = detectors
        self.responder = responder

    # -- per token ---------------------------------------------------------------------------

    def token(self, principal: Principal) -> _Token:
        """The token's policy and parsed claims, built once per (jti, scopes); bounded LRU."""
        key = (principal.token_id, principal.scopes)
        entry = self._tokens.get(key)
        if entry is not None:
            self._tokens.move_to_end(key)
            return entry
        entry = self._build_token(principal)
        self._tokens[key] = entry
        if len(self._tokens) > self._token_cache_size:
            self._tokens.popitem(last=False)
        return entry

    def _build_token(self, principal: Principal) -> _Token:
        raw = principal.claims
        claims: TokenClaims | None = None
        problem: Reason | None = None
        if raw:
            try:
                claims = TokenClaims.model_validate(dict(raw))
            except ValidationError:
                logger.warning("unusable verified claims", extra={"jti": principal.token_id})
                problem = Reason.TOKEN_INVALID
        order = claims.scopes if claims is not None else tuple(sorted(principal.scopes))
        details = raw.get("authorization_details") if raw else None
        try:
            policy = token_policy(
                [n for n in order if n in principal.scopes], details, self._by_name
            )
        except (ScopeError, TypeError):
            logger.warning("unusable authorization_details", extra={"jti": principal.token_id})
            policy = TokenPolicy(())
            problem = problem or Reason.DECISION_ERROR
        budget = claims.budget if claims is not None else None
        if claims is None and raw and isinstance(raw.get("budget"), int):
            budget = raw["budget"]
        expires = claims.exp if claims is not None else None
        return _Token(policy, claims, budget, expires, problem)

    def token_problem(self, principal: Principal, token: _Token) -> Reason | None:
        """Why this token may not be used now (revocation view), or None."""
        if token.problem is not None:
            return token.problem
        if self.revocations is None:
            return None
        if token.claims is None:
            return Reason.TOKEN_INVALID
        return self.revocations.check(token.claims, self.clock.now())

    def visible_tools(self, principal: Principal) -> list[types.Tool]:
        """What ``tools/list`` shows: enabled tools some grant (and detail) of the token covers."""
        token = self.token(principal)
        if self.token_problem(principal, token) is not None:
            return []
        policy = token.policy
        return [
            r.tool
            for r in self.registry.snapshot.listed
            if r.tool is not None and policy.reaches(r.connector_id, r.tool_name)
        ]

    def wide_connectors(self, principal: Principal | None) -> frozenset[str]:
        """Connectors whose resources, prompts and completions the caller may use."""
        if principal is None:
            return frozenset()
        token = self.token(principal)
        if self.token_problem(principal, token) is not None:
            return frozenset()
        return token.wide_connectors()

    # -- the call path -----------------------------------------------------------------------

    async def call_tool(
        self, call: CallContext, name: str, arguments: Mapping[str, Any] | None
    ) -> types.CallToolResult:
        """Mediate one ``tools/call``; never raises (every failure is a denial value)."""
        self._calls += 1
        try:
            return await self._call_tool(call, name, arguments)
        finally:
            self._calls -= 1

    async def _call_tool(
        self, call: CallContext, name: str, arguments: Mapping[str, Any] | None
    ) -> types.CallToolResult:
        decision_id = new_decision_id()
        started = time.perf_counter()
        principal = call.principal
        if principal is None:
            self._log_denied(decision_id, (Reason.TOKEN_INVALID,), None)
            return denial(decision_id, Reason.TOKEN_INVALID)
        try:
            session = await self._session(call, principal)
        except Exception:
            logger.exception(
                "opening the recorded session failed", extra={"agent": principal.agent_id}
            )
            self._log_denied(decision_id, (Reason.STORE_UNAVAILABLE,), principal)
            return denial(decision_id, Reason.STORE_UNAVAILABLE)

        held: list[tuple[str, str]] = []
        route: ToolRoute | None = None
        raw_args: dict[str, Any] = dict(arguments or {})
        verdict = Verdict()
        try:
            try:
                route, auth = await self._decide(principal, decision_id, name, raw_args)
                verdict = self._precheck(
                    call, session, principal, decision_id, name, route, auth, raw_args
                )
                if not auth.decision.allowed or route is None:
                    reasons = auth.decision.reasons or {Reason.SCOPE_MISSING}
                    raise _Refused(*reasons, decision=auth.decision, verdict=verdict)
                if verdict.blocks and verdict.reason is not None:
                    blocked = Decision.deny(
                        decision_id,
                        verdict.reason,
                        rule_ids=verdict.detectors,
                        detail=tuple(_signal_detail(s) for s in verdict.signals),
                    )
                    raise _Refused(verdict.reason, decision=blocked, verdict=verdict)
                self._limit(principal.agent_id, route.connector_id, held)
                await self._spend_budget(principal)
            except _Refused as refused:
                if refused.verdict is None:
                    refused.verdict = verdict
                return await self._refuse(
                    session, principal, decision_id, name, route, raw_args, refused, started
                )
            except Exception:
                logger.exception("deciding a tool call failed", extra={"decision_id": decision_id})
                refused = _Refused(Reason.DECISION_ERROR, verdict=verdict)
                return await self._refuse(
                    session, principal, decision_id, name, route, raw_args, refused, started
                )
            if not await self._signals(session, principal, decision_id, verdict):
                return self._store_failed(decision_id, principal, started)
            return await self._allowed(call, session, principal, decision_id, route, auth, started)
        finally:
            for key in held:
                self._running[key] -= 1

    async def _decide(
        self, principal: Principal, decision_id: str, name: str, arguments: Mapping[str, Any]
    ) -> tuple[ToolRoute | None, Authorization]:
        token = self.token(principal)
        problem = self.token_problem(principal, token)
        if problem is not None:
            return None, Authorization(Decision.deny(decision_id, problem))
        route = self.registry.snapshot.tools.get(name)
        if (
            route is not None
            and token.policy.covering(route.connector_id, route.tool_name)
            and self.registry.is_stale(route.connector_id)
        ):
            # The downstream announced a change: decide on the re-pinned definition.
            if not await self.registry.settled(route.connector_id):
                return route, Authorization(Decision.deny(decision_id, Reason.UPSTREAM_UNAVAILABLE))
            route = self.registry.snapshot.tools.get(name)
        request = AccessRequest(
            decision_id=decision_id,
            connector=route.connector_id if route else "",
            tool=route.tool_name if route else name,
            arguments=arguments,
            policy=token.policy,
            pin_status=_PIN_STATUS.get(route.disabled, PinStatus.CHANGED) if route else None,
        )
        local = route is not None and route.connector_id in self.local_connectors
        return route, decide(request, realpath=self.realpath if local else None)

    def _limit(self, agent_id: str, connector_id: str, held: list[tuple[str, str]]) -> None:
        """Rate (token buckets) then concurrency, per agent and per connector."""
        now = self.clock.now()
        waits: list[float] = []
        for key, limit in (
            (("agent", agent_id), self._agent_limit),
            (("connector", connector_id), self._connector_limit),
        ):
            if limit is None:
                continue
            bucket, wait = take(self._buckets.get(key), limit, now)
            self._buckets[key] = bucket
            if wait is not None:
                waits.append(wait)
        if waits:
            raise _Refused(Reason.RATE_LIMITED, retry_after=max(waits))
        for key, most in (
            (("agent", agent_id), self.limits.agent_max_concurrent),
            (("connector", connector_id), self.limits.connector_max_concurrent),
        ):
            if most and self._running[key] >= most:
                raise _Refused(Reason.RATE_LIMITED, retry_after=_CONCURRENCY_RETRY)
        for key in (("agent", agent_id), ("connector", connector_id)):
            self._running[key] += 1
            held.append(key)

    async def _spend_budget(self, principal: Principal) -> None:
        budget = self.token(principal).budget
        if budget is None:
            return
        if self.store is None:
            raise _Refused(Reason.STORE_UNAVAILABLE)
        try:
            left = await self.store.consume_budget(principal.token_id, budget)
        except StoreError:
            raise _Refused(Reason.STORE_UNAVAILABLE) from None
        if left is None:
            raise _Refused(Reason.BUDGET_EXHAUSTED)

    async def _allowed(
        self,
        call: CallContext,
        session: _Session | None,
        principal: Principal,
        decision_id: str,
        route: ToolRoute,
        auth: Authorization,
        started: float,
    ) -> types.CallToolResult:
        agent = principal.agent_id
        canonical = auth.arguments
        result: types.CallToolResult | None = None
        downstream = 0.0
        with anyio.CancelScope() as scope:
            self._inflight.setdefault(agent, set()).add(scope)
            try:
                if auth.approval == ApprovalMode.CALL:
                    reason = await self._approve(principal, decision_id, route, canonical)
                    if reason is not None:
                        refused = _Refused(reason)
                        return await self._refuse(
                            session,
                            principal,
                            decision_id,
                            route.name,
                            route,
                            canonical,
                            refused,
                            started,
                        )
                # Write-ahead: written before the call can have any effect, so a store that cannot
                # write stops it (fail closed) and a crash mid-call leaves the decision on record.
                # Not waiting for the flush is safe for acknowledgement: the result is recorded
                # durably before the agent hears anything, and that flush covers this record.
                if not await self._record(
                    session,
                    EventKind.DECISION,
                    lambda: _decision_payload(route.name, route, auth.decision, canonical, auth),
                    decision_id,
                    durable=False,
                ):
                    return self._store_failed(decision_id, principal, started)
                sent = time.perf_counter()
                forwarded = self._forwarded.setdefault(route.connector_id, {})
                forwarded[decision_id] = ForwardedCall(
                    decision_id, agent, session.id if session is not None else None
                )
                try:
                    result = await route.connector.call_tool(
                        route.tool_name, canonical, progress=call.progress
                    )
                except CallTimeout:
                    logger.warning("tool call timed out", extra=_ids(decision_id, route))
                    return await self._upstream_failed(
                        session, principal, decision_id, Reason.UPSTREAM_TIMEOUT, started
                    )
                except ConnectorError:
                    logger.warning("tool call failed upstream", extra=_ids(decision_id, route))
                    return await self._upstream_failed(
                        session, principal, decision_id, Reason.UPSTREAM_UNAVAILABLE, started
                    )
                except Exception:
                    logger.exception(
                        "forwarding a tool call failed", extra=_ids(decision_id, route)
                    )
                    return await self._upstream_failed(
                        session, principal, decision_id, Reason.UPSTREAM_UNAVAILABLE, started
                    )
                finally:
                    downstream = time.perf_counter() - sent
                    forwarded.pop(decision_id, None)
                    if not forwarded:
                        self._forwarded.pop(route.connector_id, None)
            finally:
                running = self._inflight.get(agent)
                if running is not None:
                    running.discard(scope)
                    if not running:
                        del self._inflight[agent]
        cut = self._cut.pop(scope, None)
        if result is None or cut is not None:
            reason = cut or Reason.UPSTREAM_UNAVAILABLE
            return await self._upstream_failed(session, principal, decision_id, reason, started)
        return await self._deliver(
            session, principal, decision_id, route, auth, result, started, downstream
        )

    async def _approve(
        self,
        principal: Principal,
        decision_id: str,
        route: ToolRoute,
        canonical: Mapping[str, JSONValue],
    ) -> Reason | None:
        if self.approvals is None:
            return Reason.APPROVAL_REQUIRED
        return await self.approvals.gate(
            principal, decision_id, route.connector_id, route.tool_name, canonical
        )

    async def _deliver(
        self,
        session: _Session | None,
        principal: Principal,
        decision_id: str,
        route: ToolRoute,
        auth: Authorization,
        result: types.CallToolResult,
        started: float,
        downstream: float,
    ) -> types.CallToolResult:
        wire = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        shaped = shape_result(wire, self.output)
        if shaped.refused or shaped.result is None:
            return await self._upstream_failed(
                session, principal, decision_id, Reason.RESULT_TOO_LARGE, started
            )
        after = self._observe_result(principal, decision_id, route, auth, wire, shaped.size, result)
        if after.signals and not await self._signals(session, principal, decision_id, after):
            return self._store_failed(decision_id, principal, started)
        cut = self._cut_off_by(after)
        if cut is not None:
            # What this result showed got the caller cut off: it does not get the result.
            await self._respond(after, principal, decision_id, session)
            return await self._upstream_failed(session, principal, decision_id, cut, started)
        if shaped.changed:
            result = types.CallToolResult.model_validate(shaped.result)
        flags: list[str] = []
        if Label.UNTRUSTED in auth.labels:
            flags.append(UNTRUSTED_FLAG)
            if not await self._flag(session, UNTRUSTED_FLAG):
                return self._store_failed(decision_id, principal, started)
        elapsed = time.perf_counter() - started
        shown = result

        def payload() -> dict[str, Any]:
            return {
                "is_error": bool(shown.is_error),
                "bytes": shaped.size,
                "excerpt": _excerpt(shown),
                "latency_ms": round(elapsed * 1000, 3),
                "downstream_ms": round(downstream * 1000, 3),
                "truncated": shaped.truncated,
                "redactions": list(shaped.redactions),
                "flags": flags,
            }

        if not await self._record(session, EventKind.RESULT, payload, decision_id):
            return self._store_failed(decision_id, principal, started)
        await self._respond(after, principal, decision_id, session)
        self._observe("allowed", (), elapsed - downstream, downstream)
        meta = {**(result.meta or {}), DECISION_META: decision_id}
        return result.model_copy(update={"meta": meta})

    async def _flag(self, session: _Session | None, flag: str) -> bool:
        """Flag the recorded session once; False when the store could not."""
        if session is None or session.id is None or flag in session.flags:
            return True
        if self.store is None:
            return True
        try:
            await self.store.flag_session(session.id, flag)
        except Exception:
            logger.exception("flagging the session failed", extra={"flag": flag})
            return False
        session.flags.add(flag)
        return True

    # -- detectors ---------------------------------------------------------------------------

    def _precheck(
        self,
        call: CallContext,
        session: _Session | None,
        principal: Principal,
        decision_id: str,
        name: str,
        route: ToolRoute | None,
        auth: Authorization,
        raw_args: Mapping[str, Any],
    ) -> Verdict:
        """Run the detectors on a decided call (not on token problems: those are stopped).

        A closed task's call is observed: the detectors hear of the close here, from the
        revocation view, so a task closed through another replica is known on this one too.
        """
        book = self.detectors
        if book is None or auth.decision.reasons & _UNOBSERVED:
            return Verdict()
        if Reason.TASK_CLOSED in auth.decision.reasons and self.revocations is not None:
            closed = self.revocations.closed_ref(principal.task_id)
            if closed is not None:
                book.close_task(principal.task_id, closed)
        token = self.token(principal)
        allowed = auth.decision.allowed and route is not None
        observation = Observation(
            decision_id=decision_id,
            agent_id=principal.agent_id,
            jti=principal.token_id,
            task_id=principal.task_id,
            session_id=(session.id if session is not None else None) or principal.token_id,
            client_fingerprint=client_fingerprint(call.client_info, call.peer),
            category=purpose_category(principal.scopes),
            connector=route.connector_id if route is not None else "",
            tool=route.tool_name if route is not None else name,
            arguments=auth.arguments if allowed else raw_args,
            labels=auth.labels if allowed else frozenset(),
            allowed=allowed,
            reasons=auth.decision.reasons,
            declared=token.declared(principal.claims),
        )
        return book.precheck(observation, self.clock.now())

    def _observe_result(
        self,
        principal: Principal,
        decision_id: str,
        route: ToolRoute,
        auth: Authorization,
        wire: Mapping[str, Any],
        size: int,
        result: types.CallToolResult,
    ) -> Verdict:
        """Feed a forwarded call's result to the detectors (watched values for private reads)."""
        book = self.detectors
        if book is None:
            return Verdict()
        watched: tuple[str, ...] = ()
        if Label.PRIVATE in auth.labels:
            watched = watched_values(wire)
        return book.observe_result(
            ResultObservation(
                decision_id=decision_id,
                agent_id=principal.agent_id,
                task_id=principal.task_id,
                connector=route.connector_id,
                tool=route.tool_name,
                labels=auth.labels,
                ok=not result.is_error,
                result_bytes=size,
                secrets=watched,
            ),
            self.clock.now(),
        )

    async def _signals(
        self, session: _Session | None, principal: Principal, decision_id: str, verdict: Verdict
    ) -> bool:
        """Record one ``detector-signal`` event per signal; False when the store could not."""
        for signal in verdict.signals:
            logger.warning(
                "detector signal",
                extra={
                    "decision_id": decision_id,
                    "agent": principal.agent_id,
                    "detector": signal.detector.value,
                    "response": signal.response.value,
                    "shadow": signal.shadow,
                },
            )
            if not await self._record(
                session, EventKind.DETECTOR_SIGNAL, lambda s=signal: signal_payload(s), decision_id
            ):
                return False
        return True

    def forwarded_calls(self, connector_id: str) -> tuple[ForwardedCall, ...]:
        """The calls this mediator is forwarding to ``connector_id`` right now."""
        return tuple(self._forwarded.get(connector_id, {}).values())

    def _cut_off_by(self, verdict: Verdict) -> Reason | None:
        """The reason a verdict's response cuts the caller off (quarantine, revocation), if any.

        Only a response this mediator carries out counts (a responder is wired, not shadow).
        """
        if self.responder is None:
            return None
        return _CUT_OFF.get(verdict.action)

    async def _respond(
        self, verdict: Verdict, principal: Principal, decision_id: str, session: _Session | None
    ) -> None:
        """Carry out an action stronger than blocking the call (revoke, quarantine)."""
        if verdict.action.rank <= Response.BLOCK_CALL.rank or self.responder is None:
            return
        try:
            await self.responder.respond(
                verdict, principal, decision_id, session.id if session is not None else None
            )
        except Exception:
            logger.exception(
                "responding to a detector signal failed",
                extra={"decision_id": decision_id, "agent": principal.agent_id},
            )

    # -- denials and failures ----------------------------------------------------------------

    async def _refuse(
        self,
        session: _Session | None,
        principal: Principal,
        decision_id: str,
        name: str,
        route: ToolRoute | None,
        arguments: Mapping[str, Any],
        refused: _Refused,
        started: float,
    ) -> types.CallToolResult:
        decision = refused.decision or Decision.deny(decision_id, *refused.reasons)
        verdict = refused.verdict or Verdict()
        cut = self._cut_off_by(verdict)
        if cut is not None and cut not in refused.reasons:
            # The detectors cut the caller off on this very call: its answer and its record
            # say so, not only its next call.
            refused.reasons = (*refused.reasons, cut)
            decision = Decision.deny(
                decision_id,
                *decision.reasons,
                cut,
                rule_ids=decision.rule_ids,
                detail=decision.detail,
            )
        if not await self._signals(session, principal, decision_id, verdict):
            return self._store_failed(decision_id, principal, started)
        if not await self._record(
            session,
            EventKind.DECISION,
            lambda: _decision_payload(name, route, decision, arguments, None),
            decision_id,
        ):
            return self._store_failed(decision_id, principal, started)
        self._log_denied(decision_id, refused.reasons, principal)
        await self._respond(verdict, principal, decision_id, session)
        self._observe("denied", refused.reasons, time.perf_counter() - started, None)
        return denial(decision_id, *refused.reasons, retry_after=refused.retry_after)

    async def _upstream_failed(
        self,
        session: _Session | None,
        principal: Principal,
        decision_id: str,
        reason: Reason,
        started: float,
    ) -> types.CallToolResult:
        """After an allow: the call failed downstream, was cut off, or its result was refused."""
        latency = _ms(started)
        if not await self._record(
            session,
            EventKind.ERROR,
            lambda: {"error": str(reason), "latency_ms": latency},
            decision_id,
        ):
            return self._store_failed(decision_id, principal, started)
        self._log_denied(decision_id, (reason,), principal)
        self._observe("denied", (reason,), time.perf_counter() - started, None)
        return denial(decision_id, reason)

    def _store_failed(
        self, decision_id: str, principal: Principal, started: float
    ) -> types.CallToolResult:
        self._log_denied(decision_id, (Reason.STORE_UNAVAILABLE,), principal)
        self._observe("denied", (Reason.STORE_UNAVAILABLE,), time.perf_counter() - started, None)
        return denial(decision_id, Reason.STORE_UNAVAILABLE)

    def _log_denied(
        self, decision_id: str, reasons: Iterable[Reason], principal: Principal | None
    ) -> None:
        logger.info(
            "tool call denied",
            extra={
                "decision_id": decision_id,
                "reasons": sorted(str(r) for r in reasons),
                "agent": principal.agent_id if principal else None,
            },
        )

    def _observe(
        self, decision: str, reasons: Iterable[Reason], overhead: float, downstream: float | None
    ) -> None:
        if self.observer is None:
            return
        try:
            self.observer.observe_call(
                decision, [str(r) for r in reasons], overhead_s=overhead, downstream_s=downstream
            )
        except Exception:
            logger.exception("metrics observer failed")

    def _notify(self, event: str) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)()
        except Exception:
            logger.exception("metrics observer failed")

    # -- recording ---------------------------------------------------------------------------

    async def _record(
        self,
        session: _Session | None,
        kind: EventKind,
        payload: Callable[[], Mapping[str, Any]],
        decision_id: str | None,
        *,
        durable: bool = True,
    ) -> bool:
        """Record; False when the store could not (the caller refuses the call).

        ``payload`` is built only when something is recorded. ``durable=False`` only for the
        write-ahead decision of a call about to be forwarded (see `Recorder.record`). With at
        most one tool call in progress the recorder is told it is ``alone``: a quiet broker
        then waits for its flush on the loop instead of paying two thread hops per call.
        """
        if self.recorder is None or session is None or session.id is None:
            return True
        try:
            await self.recorder.record(
                session.id, kind, payload(), decision_id, durable=durable, alone=self._calls <= 1
            )
        except Exception:
            logger.exception("recording failed", extra={"decision_id": decision_id})
            self._notify("store_write_failed")
            return False
        return True

    async def _session(self, call: CallContext, principal: Principal) -> _Session | None:
        """The recorded session of this call, opened on first use.

        Raises:
            StoreUnavailable: the session cannot be opened (or anything the recorder raises).
        """
        if self.recorder is None:
            return None
        if call.http_session_id is not None:
            key: tuple[str, ...] = ("http", call.http_session_id, principal.token_id)
        else:
            key = ("token", principal.token_id)
        state = self._sessions.get(key)
        if state is None:
            await self._sweep()
            state = self._sessions.setdefault(
                key, _Session(principal.agent_id, self.token(principal).expires)
            )
        if state.id is not None:
            return state
        async with state.lock:
            if state.id is None:
                handle = await self.recorder.open_session(
                    agent_id=principal.agent_id,
                    token_jti=principal.token_id,
                    task_id=principal.task_id,
                    protocol_version=call.protocol_version,
                    transport=call.transport,
                    client_info=dict(call.client_info),
                )
                state.id = str(handle.id)
                self._notify("session_opened")
        return state

    async def _sweep(self) -> None:
        """Seal the sessions of tokens that have expired (bounded work: a dict walk)."""
        now = int(self.clock.now().timestamp())
        expired = [
            k for k, s in self._sessions.items() if s.expires is not None and s.expires < now
        ]
        for key in expired:
            await self._close(key, "token-expired")

    async def _close(self, key: tuple[str, ...], reason: str) -> None:
        state = self._sessions.pop(key, None)
        if state is None or state.id is None or self.recorder is None:
            return
        self._notify("session_closed")
        try:
            await self.recorder.close_session(state.id, reason=reason)
        except Exception:
            logger.exception("sealing a session failed", extra={"session_id": state.id})

    async def close_sessions(
        self, *, agent_id: str | None = None, http_session_id: str | None = None, reason: str
    ) -> int:
        """Seal recorded sessions (all, an agent's, or one HTTP session's); returns how many."""
        keys = [
            k
            for k, s in self._sessions.items()
            if (agent_id is None or s.agent_id == agent_id)
            and (http_session_id is None or (k[0] == "http" and k[1] == http_session_id))
        ]
        for key in keys:
            await self._close(key, reason)
        return len(keys)

    # -- quarantine --------------------------------------------------------------------------

    async def cancel_agent(self, agent_id: str, reason: Reason) -> int:
        """Cancel ``agent_id``'s calls in flight; each answers ``reason``. Returns how many."""
        scopes = list(self._inflight.get(agent_id, ()))
        for scope in scopes:
            self._cut[scope] = reason
            scope.cancel()
        return len(scopes)


# -- helpers -----------------------------------------------------------------------------------


def token_policy(
    scope_names: Iterable[str],
    authorization_details: object,
    definitions: Mapping[str, ScopeDefinition],
) -> TokenPolicy:
    """A token's policy: its scopes (in token order) resolved to definitions, plus narrowing.

    Scope names the broker does not define grant nothing. ``authorization_details`` None means
    no narrowing. ``data_flow`` entries declare flows for the detectors (`_Token.declared`) and
    narrow nothing; every other entry must parse as ``tool_call``.

    Raises:
        ScopeError: the authorization details cannot be parsed (the token reaches nothing).
    """
    resolved = tuple(definitions[n] for n in scope_names if n in definitions)
    narrowing = ()
    if authorization_details is not None:
        if not isinstance(authorization_details, list | tuple):
            raise TypeError("authorization_details must be an array")
        tool_calls = [
            d
            for d in authorization_details  # pyright: ignore[reportUnknownVariableType]
            if not (isinstance(d, Mapping) and d.get("type") == "data_flow")  # pyright: ignore[reportUnknownMemberType]
        ]
        narrowing = parse_authorization_details(tool_calls)
    return TokenPolicy(resolved, narrowing)


def client_fingerprint(client_info: Mapping[str, Any], peer: str | None) -> str:
    """An opaque client fingerprint: SHA-256 of client name, version and peer host or ``local``."""
    parts = (
        str(client_info.get("name", "")),
        str(client_info.get("version", "")),
        peer or LOCAL_PEER,
    )
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "replace")).hexdigest()[:32]


def watched_values(wire: Mapping[str, Any]) -> tuple[str, ...]:
    """Secret-looking strings in a result's text (credential shapes, ``KEY=value`` assignments
    under secret-sounding keys, long high-entropy strings), for the secret-echo detector."""
    texts: list[str] = []
    for block in wire.get("content") or ():
        if isinstance(block, Mapping) and isinstance(block.get("text"), str):
            texts.append(str(block["text"]))  # pyright: ignore[reportUnknownArgumentType]
    structured = wire.get("structuredContent")
    if structured is not None:
        texts.append(json.dumps(structured, ensure_ascii=False))
    text = "\n".join(texts)[:_WATCH_TEXT_MAX]
    found: dict[str, None] = {}
    for m in _SHAPED.finditer(text):
        found[m.group(0)] = None
    for m in _ASSIGNMENT.finditer(text):
        if _secret_key(m.group(1)) and not m.group(3).isdigit():
            found[m.group(3)] = None
    for m in _CANDIDATE.finditer(text):
        if _high_entropy(m.group(0)):
            found[m.group(0)] = None
    return tuple(found)[:_WATCH_VALUES_MAX]


def signal_payload(signal: Signal) -> dict[str, Any]:
    """A ``detector-signal`` event: detector, values, triggering events, response and mode."""
    return {
        "detector": signal.detector.value,
        "score": signal.severity.value,
        "action": signal.response.value,
        "would": signal.would.value,
        "shadow": signal.shadow,
        "untrusted": signal.untrusted,
        "values": dict(signal.values),
        "refs": list(signal.refs),
        "detail": _signal_detail(signal),
    }


def _signal_detail(signal: Signal) -> str:
    values = ", ".join(f"{k}={v}" for k, v in signal.values)
    mode = " (shadow)" if signal.shadow else ""
    return f"{signal.detector.value}: {values} -> {signal.would.value}{mode}"


def _rate(per_minute: float, burst: int) -> RateLimit | None:
    return RateLimit(per_minute, burst) if per_minute > 0 else None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _ids(decision_id: str, route: ToolRoute) -> dict[str, str]:
    return {"decision_id": decision_id, "connector": route.connector_id, "tool": route.tool_name}


def _bounded(arguments: Mapping[str, Any]) -> Any:
    """The arguments to record, or a digest of them when they are too large to keep whole."""
    try:
        text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return {"omitted": "not JSON"}
    if len(text) <= _RECORDED_ARGS_MAX:
        return dict(arguments)
    digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
    return {"omitted": "too large", "bytes": len(text.encode("utf-8", "replace")), "sha256": digest}


def _decision_payload(
    name: str,
    route: ToolRoute | None,
    decision: Decision,
    arguments: Mapping[str, Any],
    auth: Authorization | None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "method": "tools/call",
        "tool": name,
        "connector": route.connector_id if route else None,
        "allowed": decision.allowed,
        "reasons": sorted(str(r) for r in decision.reasons),
        "rule_ids": list(decision.rule_ids),
        "arguments": _bounded(arguments),
    }
    if decision.detail:
        payload["detail"] = list(decision.detail)
    if auth is not None and auth.scope is not None:
        payload["scope"] = auth.scope.name
    return payload


def _excerpt(result: types.CallToolResult) -> dict[str, Any]:
    text = "".join(b.text for b in result.content if isinstance(b, types.TextContent))
    return {
        "text": text[:_EXCERPT_CHARS],
        "chars": len(text),
        "truncated": len(text) > _EXCERPT_CHARS,
    }
