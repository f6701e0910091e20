"""Token minting, exchange and revocation: the orchestration behind ``POST /oauth/token``.

Shell module: store, key ring, revocation cache and clock in; `broker.core.tokens` and
`broker.core.delegation` decide the claims. No HTTP here: refusals are `OAuthError` with an
RFC 6749 / 8693 / 8707 / 9396 code and a description safe to send to the agent.

Decisions (see also `broker.oauth`):

- **Agent status.** A disabled agent is answered ``invalid_client``, exactly as an unknown client
  (its credential no longer names anyone). A quarantined agent authenticated, but may not get
  tokens until a human releases it: ``access_denied`` (the design's vocabulary, and the code
  `derive_child_claims` uses for an agent that is not active).
- **Scope.** When ``scope`` is given, every name must be among the agent's allowed scopes (and
  among the defined scopes when scope files are configured): else ``invalid_scope``. When it is
  omitted, the token carries the agent's registered scopes that are defined and need no human
  approval (RFC 6749 §3.3 "pre-defined default"; none left is ``invalid_scope``). Why not
  require it: SDK 2.3's stock ``ClientCredentialsOAuthProvider`` replaces the scope it was
  configured with by what discovery advertises, so with nothing advertised (pitfall 20) it sends
  no scope at all; requiring one would lock stock clients out. Agents that want a narrower token
  name its scopes. The response's ``scope`` always says what was granted.
- **Scopes that need human approval** (``approval = "token"``) are refused with
  ``access_denied`` until approvals exist (fail closed).
- **TTL** is ``min(expires_in or tokens.default_ttl, agent.max_ttl_seconds, tokens.max_ttl)``.
- **Exchange** (RFC 8693): the parent agent authenticates as itself and presents its own token
  as ``subject_token``; ``actor`` (a broker extension) names the sub-agent by id or name. A
  subject token that does not verify, is revoked, or was issued to another client is
  ``invalid_grant`` (the grant being exchanged is bad; RFC 6749 §5.2).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from broker.config import BrokerConfig
from broker.core.delegation import DelegationRefused, derive_child_claims
from broker.core.identity import Agent, AgentStatus
from broker.core.revocation import IssuedToken, Revocation, RevocationKind
from broker.core.tokens import TaskClaim, TokenClaims, TokenRejected, mint_token
from broker.errors import NotFound, OAuthError
from broker.keys import KeyRing
from broker.ports import Clock, Store
from broker.revocations import RevocationCache
from broker.verifier import BrokerTokenVerifier

if TYPE_CHECKING:
    from broker.approvals import TokenApprovals

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "MAX_BUDGET",
    "TokenResponse",
    "TokenService",
]

logger = logging.getLogger(__name__)

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
MAX_BUDGET = 1_000_000
MAX_PURPOSE = 1000
_TASK_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_SCOPE_NAME_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A granted token: `to_json` is the RFC 6749 §5.1 body; ``claims`` stay server-side."""

    access_token: str
    expires_in: int
    scope: str
    claims: TokenClaims
    issued_token_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        }
        if self.issued_token_type is not None:
            body["issued_token_type"] = self.issued_token_type
        return body


def _scope_list(scope: str | None) -> tuple[str, ...] | None:
    if scope is None:
        return None
    names = scope.split(" ")
    # RFC 6749 §3.3: scope-tokens separated by single spaces.
    if not scope or any(not _SCOPE_NAME_RE.fullmatch(n) for n in names):
        raise OAuthError("invalid_scope", "scope must be scope names separated by single spaces")
    return tuple(dict.fromkeys(names))


class TokenService:
    """Mints capability tokens for authenticated agents, exchanges them, and revokes them."""

    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        revocations: RevocationCache,
        config: BrokerConfig,
        clock: Clock,
        *,
        scope_definitions: Mapping[str, Any] | None = None,
        verifier: BrokerTokenVerifier | None = None,
        approvals: TokenApprovals | None = None,
    ) -> None:
        """``scope_definitions`` (name -> `scopes.ScopeDefinition`): when None they are loaded
        from ``config.scope_files``; with no scope files, scope names are checked only against
        each agent's allowed scopes. ``approvals``: without it, scopes whose approval mode is
        ``token`` are refused (fail closed); with it, a request for one is held for a human
        (``authorization_pending``)."""
        self.approvals = approvals
        self.store = store
        self.keyring = keyring
        self.revocations = revocations
        self.config = config
        self.clock = clock
        if scope_definitions is None and config.scope_files:
            from scopes import load_scope_files

            scope_definitions = {d.name: d for d in load_scope_files(config.scope_files)}
        self.scope_definitions = scope_definitions
        self.verifier = verifier or BrokerTokenVerifier.from_config(
            config, keyring, revocations, clock, store
        )

    @property
    def issuer(self) -> str:
        return self.config.server.base_url

    @property
    def resource(self) -> str:
        return self.config.server.resource_url

    # checks shared by both grants

    def _check_status(self, agent: Agent) -> None:
        if agent.status is AgentStatus.DISABLED:
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        if agent.status is not AgentStatus.ACTIVE:
            raise OAuthError(
                "access_denied",
                f"agent is {agent.status.value}; a human must release it before it gets tokens",
            )

    def _check_resource(self, resource: str | None, audience: str | None = None) -> None:
        for name, value in (("resource", resource), ("audience", audience)):
            if value is not None and value != self.resource:
                raise OAuthError(
                    "invalid_target", f"{name} must be this broker's MCP resource {self.resource}"
                )

    def _check_scope_names(self, names: Sequence[str]) -> None:
        defs = self.scope_definitions
        if defs is None:
            return
        unknown = [n for n in names if n not in defs]
        if unknown:
            raise OAuthError("invalid_scope", f"unknown scope: {' '.join(unknown)}")
        gated = [n for n in names if str(getattr(defs[n], "approval", "none")) == "token"]
        if gated and self.approvals is None:
            raise OAuthError(
                "access_denied",
                f"scope needs human approval before a token is issued: {' '.join(gated)}",
            )

    def _check_task_open(self, task_id: str) -> None:
        """A closed or revoked task is over: it is never reopened by a new token."""
        view = self.revocations.view
        if task_id in view.closed_tasks:
            raise OAuthError("invalid_request", "this task is closed: name a new task")
        if task_id in view.revoked_tasks:
            raise OAuthError("invalid_request", "this task is revoked: name a new task")

    async def _check_task_owner(self, task_id: str, agent: Agent) -> None:
        for issued in await self.store.list_tokens(task_id=task_id):
            if issued.parent_jti is None and issued.agent_id != agent.id:
                raise OAuthError(
                    "invalid_request", "task id is in use by another agent: name another"
                )

    def _default_scopes(self, agent: Agent) -> tuple[str, ...]:
        """The agent's registered scopes that can be granted without a human (omitted scope)."""
        defs = self.scope_definitions
        names = tuple(
            n
            for n in agent.allowed_scopes
            if defs is None or (n in defs and str(getattr(defs[n], "approval", "none")) != "token")
        )
        if not names:
            raise OAuthError(
                "invalid_scope", "name the scopes this task needs in the 'scope' parameter"
            )
        return names

    def _check_details(
        self,
        details: Sequence[Mapping[str, Any]] | None,
        *,
        parent: TokenClaims | None = None,
    ) -> None:
        """Validate ``authorization_details`` by type; refuse any type the broker does not know.

        ``tool_call`` entries narrow what the token reaches (the scopes language parses them);
        ``data_flow`` entries declare flows the detectors let through (``private->egress``).
        A declared flow widens rather than narrows, so a delegated child may only declare flows
        its parent declared.
        """
        if details is None:
            return
        from broker.core.detectors import declarations
        from scopes import ScopeError, parse_authorization_details

        tool_calls = [dict(d) for d in details if d.get("type") == "tool_call"]
        flows = [dict(d) for d in details if d.get("type") == "data_flow"]
        unknown = sorted({str(d.get("type")) for d in details} - {"tool_call", "data_flow"})
        if unknown:
            raise OAuthError(
                "invalid_authorization_details",
                f"unknown authorization_details type(s): {', '.join(unknown)} "
                "(expected tool_call or data_flow)",
            )
        try:
            parse_authorization_details(tool_calls)
            declared = declarations(flows).flows
        except (ScopeError, ValueError) as exc:
            raise OAuthError("invalid_authorization_details", str(exc)) from None
        if parent is not None and declared:
            inherited = declarations(parent.authorization_details or ()).flows
            if not declared <= inherited:
                raise OAuthError(
                    "invalid_authorization_details",
                    "a delegated token may only declare data flows its parent token declares",
                )

    @staticmethod
    def _check_budget(budget: int | None) -> None:
        if budget is not None and not 1 <= budget <= MAX_BUDGET:
            raise OAuthError("invalid_request", f"budget must be 1 to {MAX_BUDGET} calls")

    @staticmethod
    def _check_purpose(purpose: str | None) -> str:
        purpose = purpose or ""
        if len(purpose) > MAX_PURPOSE or any(ord(c) < 0x20 or ord(c) == 0x7F for c in purpose):
            raise OAuthError(
                "invalid_request", f"purpose: at most {MAX_PURPOSE} characters, no control ones"
            )
        return purpose

    def _mint(self, claims: TokenClaims) -> str:
        kid, key = self.keyring.signing_key()
        return mint_token(claims, private_key=key, kid=kid)

    async def _record(self, claims: TokenClaims, agent_id: str, purpose: str) -> None:
        await self.store.record_token(
            IssuedToken(
                jti=claims.jti,
                agent_id=agent_id,
                task_id=claims.task.id,
                purpose=purpose,
                scopes=claims.scopes,
                issued_at=claims.issued_at,
                expires_at=claims.expires_at,
                parent_jti=None if claims.delegation is None else claims.delegation.parent,
                chain=claims.ancestor_jtis,
                budget=claims.budget,
            )
        )

    # grants

    async def client_credentials(
        self,
        agent: Agent,
        *,
        scope: str | None = None,
        resource: str | None = None,
        task_id: str | None = None,
        purpose: str | None = None,
        expires_in: int | None = None,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
        budget: int | None = None,
        auth_req_id: str | None = None,
    ) -> TokenResponse:
        """A token for ``agent`` (already authenticated) for one task.

        A task id the agent names must not be one another agent's tokens already carry:
        revoking a task, and the detectors' per-task state, must never reach across agents.

        Raises:
            OAuthError: ``invalid_client`` (disabled), ``access_denied`` (quarantined, or a
                scope that needs approval), ``invalid_scope``, ``invalid_target``,
                ``invalid_authorization_details``, ``invalid_request``;
                `broker.approvals.AuthorizationPending` while a human has not decided.
        """
        self._check_status(agent)
        self._check_resource(resource)
        requested = _scope_list(scope)
        names = self._default_scopes(agent) if requested is None else requested
        refused = [n for n in names if n not in agent.allowed_scopes]
        if refused:
            raise OAuthError(
                "invalid_scope", f"this agent may not request: {' '.join(sorted(refused))}"
            )
        self._check_scope_names(names)
        self._check_details(authorization_details)
        self._check_budget(budget)
        purpose = self._check_purpose(purpose)
        if task_id is not None and not _TASK_ID_RE.fullmatch(task_id):
            raise OAuthError("invalid_request", "task: 1-128 printable ASCII characters, no space")
        if expires_in is not None and expires_in < 1:
            raise OAuthError("invalid_request", "expires_in must be a positive number of seconds")
        if task_id is not None:
            await self._check_task_owner(task_id, agent)
            self._check_task_open(task_id)
        tokens = self.config.tokens
        ttl = min(expires_in or tokens.default_ttl, agent.max_ttl_seconds, tokens.max_ttl)
        now = int(self.clock.now().timestamp())
        try:
            claims = TokenClaims(
                iss=self.issuer,
                aud=self.resource,
                sub=agent.id,
                client_id=agent.id,
                exp=now + ttl,
                iat=now,
                nbf=now,
                jti=secrets.token_urlsafe(24),
                scope=" ".join(names),
                task=TaskClaim(id=task_id or f"tsk_{secrets.token_urlsafe(12)}", purpose=purpose),
                authorization_details=(
                    None
                    if authorization_details is None
                    else tuple(dict(d) for d in authorization_details)
                ),
                budget=budget,
            )
        except ValidationError:
            logger.info("token claims refused", extra={"client_id": agent.id}, exc_info=True)
            raise OAuthError("invalid_request", "the requested token is not well-formed") from None
        if self.approvals is not None:
            # Last: an approved approval is used up here.
            await self.approvals.require(
                agent.id,
                names,
                task_id=task_id,
                purpose=purpose,
                authorization_details=authorization_details,
                budget=budget,
                expires_in=expires_in,
                auth_req_id=auth_req_id,
            )
        access_token = self._mint(claims)
        await self._record(claims, agent.id, purpose)
        logger.info(
            "token issued",
            extra={"jti": claims.jti, "client_id": agent.id, "task_id": claims.task.id, "ttl": ttl},
        )
        return TokenResponse(
            access_token=access_token, expires_in=ttl, scope=claims.scope, claims=claims
        )

    async def exchange(
        self,
        agent: Agent,
        *,
        subject_token: str,
        subject_token_type: str,
        actor: str,
        scope: str | None = None,
        resource: str | None = None,
        audience: str | None = None,
        requested_token_type: str | None = None,
        expires_in: int | None = None,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
        budget: int | None = None,
        purpose: str | None = None,
    ) -> TokenResponse:
        """RFC 8693 exchange: ``agent`` trades its own token for a narrower one for ``actor``.

        Raises:
            OAuthError: ``invalid_request`` (token types, unknown actor, bad values),
                ``invalid_grant`` (subject token invalid, revoked or not the caller's),
                ``invalid_scope``, ``invalid_target``, ``access_denied``, ``invalid_client``.
        """
        self._check_status(agent)
        if subject_token_type != ACCESS_TOKEN_TYPE:
            raise OAuthError("invalid_request", f"subject_token_type must be {ACCESS_TOKEN_TYPE}")
        if requested_token_type not in (None, ACCESS_TOKEN_TYPE):
            raise OAuthError("invalid_request", f"requested_token_type must be {ACCESS_TOKEN_TYPE}")
        self._check_resource(resource, audience)
        try:
            parent = await self.verifier.authenticate(subject_token)
        except TokenRejected as exc:
            logger.info(
                "token exchange refused",
                extra={"client_id": agent.id, "reason": exc.reason, "jti": exc.jti},
            )
            raise OAuthError(
                "invalid_grant", "subject_token is not a valid, unrevoked token"
            ) from None
        if parent.client_id != agent.id:
            # A token stolen from another agent cannot be exchanged by the thief.
            logger.warning(
                "token exchange by a client the token was not issued to",
                extra={"client_id": agent.id, "jti": parent.jti, "token_client": parent.client_id},
            )
            raise OAuthError("invalid_grant", "subject_token was not issued to this client")
        try:
            child = await self.store.find_agent(actor)
        except NotFound:
            raise OAuthError("invalid_request", "actor names no registered agent") from None
        requested = _scope_list(scope)
        if requested is not None:
            self._check_scope_names(requested)
        self._check_details(authorization_details, parent=parent)
        self._check_budget(budget)
        if purpose is not None:
            purpose = self._check_purpose(purpose)
        if expires_in is not None and expires_in < 1:
            raise OAuthError("invalid_request", "expires_in must be a positive number of seconds")
        jti = secrets.token_urlsafe(24)
        try:
            claims = derive_child_claims(
                parent,
                child_agent=child,
                parent_agent=agent,
                requested_scopes=requested,
                extra_details=authorization_details,
                requested_ttl=(
                    min(expires_in, self.config.tokens.max_ttl) if expires_in is not None else None
                ),
                budget=budget,
                now=self.clock.now(),
                jti=jti,
                max_depth=self.config.tokens.max_delegation_depth,
                purpose=purpose,
            )
        except DelegationRefused as exc:
            raise OAuthError(exc.error, exc.description) from None
        access_token = self._mint(claims)
        await self._record(claims, child.id, claims.task.purpose)
        expires = max(claims.exp - int(self.clock.now().timestamp()), 0)
        logger.info(
            "token exchanged",
            extra={
                "jti": claims.jti,
                "parent_jti": parent.jti,
                "client_id": child.id,
                "by": agent.id,
                "depth": claims.depth,
            },
        )
        return TokenResponse(
            access_token=access_token,
            expires_in=expires,
            scope=claims.scope,
            claims=claims,
            issued_token_type=ACCESS_TOKEN_TYPE,
        )

    async def mint_for(
        self,
        agent_ref: str,
        *,
        scope: str | None,
        task_id: str | None = None,
        purpose: str | None = None,
        expires_in: int | None = None,
        authorization_details: Sequence[Mapping[str, Any]] | None = None,
        budget: int | None = None,
    ) -> TokenResponse:
        """An admin mint (``broker token mint``): no client authentication, same rules.

        Raises:
            NotFound: no agent with that id or name.
            OAuthError: as `client_credentials`.
        """
        agent = await self.store.find_agent(agent_ref)
        return await self.client_credentials(
            agent,
            scope=scope,
            task_id=task_id,
            purpose=purpose,
            expires_in=expires_in,
            authorization_details=authorization_details,
            budget=budget,
        )

    # revocation

    async def _revoke(
        self, kind: RevocationKind, subject: str, reason: str, actor: str
    ) -> Revocation:
        if not reason.strip():
            raise ValueError("a revocation needs a reason")
        revocation = await self.store.revoke(
            kind, subject, reason=reason.strip(), actor=actor, at=self.clock.now()
        )
        # Effective in this process at once; other replicas learn it from the store.
        self.revocations.apply_local(revocation)
        logger.info(
            "revoked",
            extra={"kind": kind.value, "subject": subject, "actor": actor, "seq": revocation.seq},
        )
        return revocation

    async def revoke_token(self, jti: str, *, reason: str, actor: str) -> Revocation:
        """Revoke one token, and with it every token delegated from it.

        Raises:
            NotFound: no token with that id was issued. ValueError: an empty reason.
        """
        await self.store.get_token(jti)
        return await self._revoke(RevocationKind.TOKEN, jti, reason, actor)

    async def revoke_task(self, task_id: str, *, reason: str, actor: str) -> Revocation:
        """Revoke every token of a task (delegated ones share their parent's task id).

        Raises:
            ValueError: an empty reason.
        """
        return await self._revoke(RevocationKind.TASK, task_id, reason, actor)

    async def close_task(self, claims: TokenClaims, agent: Agent) -> int:
        """End the task of ``claims`` (a token ``agent`` holds): its work is over.

        Only the agent that started the task may close it, with a token it was issued by client
        credentials: a delegated sub-agent's token shares its parent's task id but closes
        nothing (it can revoke its own token instead). Closing is for good and idempotent: the
        first close is the one on record, and no new token is issued for the task afterwards.
        Returns the seq of the revocation that closed it.
        The task's tokens (delegated ones included) still authenticate; every call they make is
        denied ``task-closed``, recorded, and seen by the ``task-closed-use`` detector (see
        `broker.core.revocation`).

        Raises:
            OAuthError: ``unauthorized_client`` when ``agent`` did not start the task.
        """
        if claims.delegation is not None or claims.sub != agent.id:
            raise OAuthError(
                "unauthorized_client",
                "only the agent that started a task can close it (a delegated token cannot)",
            )
        task_id = claims.task.id
        seq = self.revocations.view.closed_tasks.get(task_id)
        if seq is not None:
            return seq
        closed = await self._revoke(
            RevocationKind.TASK_CLOSED,
            task_id,
            "closed by the agent that started it",
            f"agent:{agent.id}",
        )
        return closed.seq

    async def revoke_agent(self, agent_ref: str, *, reason: str, actor: str) -> Revocation:
        """Revoke every token issued to (or delegated through) an agent until now.

        The agent may get new tokens afterwards; quarantine or disable it to stop that.

        Raises:
            NotFound: no agent with that id or name. ValueError: an empty reason.
        """
        agent = await self.store.find_agent(agent_ref)
        return await self._revoke(RevocationKind.AGENT, agent.id, reason, actor)
