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

from broker.core.identity import Agent
from broker.core.tokens import TokenClaims

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
    raise NotImplementedError
