"""Delegation (RFC 8693 token exchange): a child token never widens its parent. Pure.

Imports the standard library, pydantic and ``broker.core`` only. Time and the new ``jti`` are
passed in. `derive_child_claims` either returns the child's claims or raises `DelegationRefused`
carrying an OAuth error code; it never returns something wider than the parent:

- scopes: a subset of the parent's and of the child agent's allowed scopes;
- ``authorization_details``: the parent's, unchanged and first, then the extra ones (they AND);
- lifetime: ``exp`` at most the parent's and at most ``now`` + the child agent's maximum TTL;
- budget: at most the parent's when the parent has one (inherited when none is asked for);
- depth: parent depth + 1, at most ``min(max_depth, parent_agent.max_delegation_depth)``;
- the same ``sub`` and task id; ``client_id`` = the child agent; ``act`` and
  ``delegation.chain`` extended by one step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from broker.core.identity import Agent
from broker.core.tokens import ActorClaim, DelegationClaim, TaskClaim, TokenClaims

__all__ = ["DelegationRefused", "derive_child_claims"]

OAuthCode = Literal["invalid_request", "invalid_scope", "invalid_grant", "access_denied"]


class DelegationRefused(ValueError):
    """A token-exchange request cannot be granted; ``error`` is the RFC 6749/8693 code.

    ``description`` is safe to send to the client: it names what was asked and what the parent
    allows, never a token.
    """

    def __init__(self, error: OAuthCode, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error: OAuthCode = error
        self.description = description


def derive_child_claims(
    parent: TokenClaims,
    *,
    child_agent: Agent,
    parent_agent: Agent,
    requested_scopes: Sequence[str] | None,
    extra_details: Sequence[Mapping[str, Any]] | None,
    requested_ttl: int | None,
    budget: int | None,
    now: datetime,
    jti: str,
    max_depth: int,
    purpose: str | None,
) -> TokenClaims:
    """The claims of a child token for ``child_agent``, derived from a verified ``parent``.

    ``parent_agent`` is the agent the parent token was issued to (``parent.client_id``); its
    ``max_delegation_depth`` bounds the chain together with ``max_depth`` (config). The caller
    has already verified the parent token and checked its revocation state.

    Raises:
        DelegationRefused: ``invalid_scope`` (a scope the parent or the child agent lacks),
            ``invalid_request`` (bad ttl, budget, details or purpose; the child is already in the
            chain), ``invalid_grant`` (parent expired, or ``parent_agent`` does not match it),
            ``access_denied`` (child or parent agent not active, depth exceeded).
    """
    if parent_agent.id != parent.client_id:
        raise DelegationRefused("invalid_grant", "the parent token was not issued to that agent")
    if not parent_agent.is_active:
        raise DelegationRefused("invalid_grant", "the parent token's agent is not active")
    if not child_agent.is_active:
        raise DelegationRefused("access_denied", f"agent {child_agent.id} is not active")
    if child_agent.id in parent.agents_in_chain:
        raise DelegationRefused(
            "invalid_request", f"agent {child_agent.id} is already in the delegation chain"
        )
    depth = parent.depth + 1
    limit = min(max_depth, parent_agent.max_delegation_depth)
    if depth > limit:
        raise DelegationRefused("access_denied", f"delegation depth {depth} exceeds {limit}")
    t = int(now.timestamp())
    if parent.exp <= t:
        raise DelegationRefused("invalid_grant", "the parent token has expired")
    return _build(
        parent,
        child_agent=child_agent,
        scopes=_child_scopes(parent, child_agent, requested_scopes),
        details=_child_details(parent, extra_details),
        exp=_child_exp(parent, child_agent, requested_ttl, t),
        budget=_child_budget(parent, budget),
        iat=t,
        jti=jti,
        purpose=parent.task.purpose if purpose is None else purpose,
    )


def _child_scopes(
    parent: TokenClaims, child: Agent, requested: Sequence[str] | None
) -> tuple[str, ...]:
    allowed = set(child.allowed_scopes)
    if requested is None:
        scopes = tuple(s for s in parent.scopes if s in allowed)
        if not scopes:
            raise DelegationRefused(
                "invalid_scope", f"agent {child.id} may hold none of the parent token's scopes"
            )
        return scopes
    if not requested:
        raise DelegationRefused("invalid_scope", "no scope requested")
    held = set(parent.scopes)
    for name in requested:
        if name not in held:
            raise DelegationRefused("invalid_scope", f"scope {name!r} is not held by the parent")
        if name not in allowed:
            raise DelegationRefused(
                "invalid_scope", f"agent {child.id} may not request scope {name!r}"
            )
    return tuple(dict.fromkeys(requested))


def _child_details(
    parent: TokenClaims, extra: Sequence[Mapping[str, Any]] | None
) -> tuple[dict[str, Any], ...] | None:
    inherited = parent.authorization_details or ()
    if not extra:
        return parent.authorization_details
    return (*inherited, *(dict(d) for d in extra))


def _child_exp(parent: TokenClaims, child: Agent, requested_ttl: int | None, t: int) -> int:
    if requested_ttl is not None and requested_ttl < 1:
        raise DelegationRefused("invalid_request", "expires_in must be a positive number")
    ttl = child.max_ttl_seconds if requested_ttl is None else requested_ttl
    return min(parent.exp, t + min(ttl, child.max_ttl_seconds))


def _child_budget(parent: TokenClaims, budget: int | None) -> int | None:
    if budget is None:
        return parent.budget
    if budget < 1:
        raise DelegationRefused("invalid_request", "budget must be at least 1")
    if parent.budget is not None and budget > parent.budget:
        raise DelegationRefused(
            "invalid_request", f"budget {budget} exceeds the parent's {parent.budget}"
        )
    return budget


def _build(
    parent: TokenClaims,
    *,
    child_agent: Agent,
    scopes: tuple[str, ...],
    details: tuple[dict[str, Any], ...] | None,
    exp: int,
    budget: int | None,
    iat: int,
    jti: str,
    purpose: str,
) -> TokenClaims:
    try:
        return TokenClaims(
            iss=parent.iss,
            aud=parent.aud,
            sub=parent.sub,
            client_id=child_agent.id,
            exp=exp,
            iat=iat,
            nbf=iat,
            jti=jti,
            scope=" ".join(scopes),
            task=TaskClaim(id=parent.task.id, purpose=purpose),
            authorization_details=details,
            budget=budget,
            act=ActorClaim(sub=child_agent.id, act=parent.act),
            delegation=DelegationClaim(
                parent=parent.jti, chain=(*parent.ancestor_jtis, parent.jti), depth=parent.depth + 1
            ),
        )
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors(include_url=False)[0]["loc"]) or "claims"
        raise DelegationRefused(
            "invalid_request", f"the child token would be invalid: {where}"
        ) from None
