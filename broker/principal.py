"""Who is calling: the principal behind one MCP request, taken from the verified token.

Shell module. The SDK's auth middleware has already verified the bearer token (see
`broker.verifier`) and put an `AccessToken` whose ``claims`` are the token's claims as JSON into
a contextvar; this module only reads them. Nothing here verifies anything: a request without a
verified token has no principal, and every caller treats that as "deny".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp.server import ServerRequestContext
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken

__all__ = [
    "Principal",
    "PrincipalCache",
    "PrincipalLookup",
    "principal_from_access_token",
    "principal_from_request",
]


@dataclass(frozen=True, slots=True)
class Principal:
    """The agent behind a request and what its token says it may do.

    ``agent_id`` is the token's ``sub`` (the root agent); ``client_id`` the agent presenting it
    (differs under delegation). ``claims`` is the whole verified claim set, for the mediation
    step (authorization_details, budget, act, delegation) and the record.
    """

    agent_id: str
    client_id: str
    scopes: frozenset[str]
    token_id: str
    task_id: str = ""
    task_purpose: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict[str, Any], compare=False)

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Principal:
        """Build from verified claims (``TokenClaims.model_dump(mode="json")``).

        Raises:
            ValueError: a claim the broker needs is missing or mistyped (a verifier bug: deny).
        """
        sub, client_id, jti = claims.get("sub"), claims.get("client_id"), claims.get("jti")
        scope, task = claims.get("scope", ""), claims.get("task") or {}
        if not (isinstance(sub, str) and isinstance(jti, str) and isinstance(scope, str)):
            raise ValueError("verified claims lack sub, jti or scope")
        if not isinstance(task, Mapping):
            raise ValueError("verified claims have a malformed task")
        task_id, purpose = task.get("id", ""), task.get("purpose", "")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        return cls(
            agent_id=sub,
            client_id=client_id if isinstance(client_id, str) else sub,
            scopes=frozenset(scope.split()),
            token_id=jti,
            task_id=task_id if isinstance(task_id, str) else "",
            task_purpose=purpose if isinstance(purpose, str) else "",
            claims=claims,
        )


PrincipalLookup = Callable[[ServerRequestContext[Any, Any]], Principal | None]
"""How the MCP front learns who is calling; tests of an in-process `Client(server)` inject one."""


class PrincipalCache:
    """Principals parsed once per token id, per MCP front (bounded; no module-level state).

    The claims of a verified token never change, so a hit needs only a dict lookup and an
    identity-or-equality check of the claims.
    """

    __slots__ = ("_cache", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._cache: dict[str, Principal] = {}
        self._limit = limit

    def from_access_token(self, token: AccessToken | None) -> Principal | None:
        """The principal for a verified `AccessToken`, or None (no token, or unusable claims)."""
        if token is None or not token.claims:
            return None
        jti = token.claims.get("jti")
        if isinstance(jti, str):
            cached = self._cache.get(jti)
            if cached is not None and (
                cached.claims is token.claims or cached.claims == token.claims
            ):
                return cached
        try:
            principal = Principal.from_claims(token.claims)
        except ValueError:
            return None
        if len(self._cache) >= self._limit:
            self._cache.clear()
        self._cache[principal.token_id] = principal
        return principal

    def from_request(self, _ctx: ServerRequestContext[Any, Any]) -> Principal | None:
        """The SDK's verified token for this request (HTTP), else None."""
        return self.from_access_token(get_access_token())


def principal_from_access_token(token: AccessToken | None) -> Principal | None:
    """The principal for a verified `AccessToken`, or None; parsed every time (no cache)."""
    if token is None or not token.claims:
        return None
    try:
        return Principal.from_claims(token.claims)
    except ValueError:
        return None


def principal_from_request(_ctx: ServerRequestContext[Any, Any]) -> Principal | None:
    """The SDK's verified token for this request (HTTP), else None; uncached."""
    return principal_from_access_token(get_access_token())
