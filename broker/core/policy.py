"""The policy decision: may this call proceed, and with which canonical arguments? Pure.

Imports `scopes` and `broker.core` only; no I/O, no clock, no randomness (the decision id comes
in with the request).

`decide` runs the static stages of the mediation order, and the first stage that fails gives
the reason (so a denial has one clear cause, and the record holds the detail):

1. the token: its revocation/agent-status check, done by the shell against the revocation view,
   arrives as ``token_problem`` (``token-revoked``, ``agent-quarantined``, ``agent-disabled``,
   ``store-unavailable``);
2. grants: the token's scopes must hold a grant covering (connector, tool); when the token
   carries ``authorization_details``, at least one of them must cover the call too (they
   narrow: a token with details reaches only what they list). No grant, or an unknown tool:
   ``scope-missing``. An unknown tool and a forbidden one are indistinguishable to the agent;
3. the tool's pin: covered, but pending approval (``tool-unapproved``) or changed since approval
   (``tool-definition-changed``). This stage comes after the grant check on purpose: a caller
   whose scopes do not cover a tool learns nothing about its existence or state;
4. arguments: each covering scope grant is an alternative; for one, its constraints AND those of
   every covering authorization detail are checked together, and the first alternative that
   passes wins (scope order in the token, then grant order). None passes: ``constraint-violated``,
   with the violations of every alternative in ``detail`` (never argument values).

Budgets, rate limits, approvals and data-flow checks hold state, so the shell runs them after an
allow, each with its own pure rule in `broker.core`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from broker.core.decision import Decision, Reason
from broker.core.pinning import PinStatus
from scopes import (
    ApprovalMode,
    Constraints,
    Grant,
    JSONValue,
    Label,
    Realpath,
    ScopeDefinition,
    check_arguments,
)

__all__ = ["AccessRequest", "Authorization", "TokenPolicy", "decide"]


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What one token may do: its scopes resolved to definitions, plus its narrowing grants.

    Built once per token by the shell (scope names the broker does not define are dropped: they
    grant nothing) and reused for every call under that token.
    """

    scopes: tuple[ScopeDefinition, ...]
    narrowing: tuple[Grant, ...] = ()
    _index: dict[tuple[str, str], tuple[tuple[Grant, ScopeDefinition], ...]] = field(
        default_factory=dict[tuple[str, str], tuple[tuple[Grant, ScopeDefinition], ...]],
        repr=False,
        compare=False,
    )

    def covering(self, connector: str, tool: str) -> tuple[tuple[Grant, ScopeDefinition], ...]:
        """Scope grants covering (connector, tool), in token order; memoised per tool."""
        key = (connector, tool)
        found = self._index.get(key)
        if found is None:
            found = tuple(
                (grant, scope)
                for scope in self.scopes
                for grant in scope.grants
                if grant.covers(connector, tool)
            )
            self._index[key] = found
        return found

    def narrowing_for(self, connector: str, tool: str) -> tuple[Grant, ...] | None:
        """Covering authorization details; None when the token carries none (no narrowing)."""
        if not self.narrowing:
            return None
        return tuple(g for g in self.narrowing if g.covers(connector, tool))

    def reaches(self, connector: str, tool: str) -> bool:
        """Whether some grant (and, if present, some detail) covers the tool: for tools/list."""
        if not self.covering(connector, tool):
            return False
        narrowing = self.narrowing_for(connector, tool)
        return narrowing is None or bool(narrowing)


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """One call to decide. ``pin_status`` None means the broker knows no such tool."""

    decision_id: str
    connector: str
    tool: str
    arguments: Mapping[str, JSONValue]
    policy: TokenPolicy
    pin_status: PinStatus | None
    token_problem: Reason | None = None


@dataclass(frozen=True, slots=True)
class Authorization:
    """The decision, plus what the shell needs to act on an allow.

    ``arguments`` are the canonical values to forward (exactly what was checked); ``grant`` and
    ``scope`` name the alternative that allowed the call; ``approval`` and ``labels`` come from
    that scope.
    """

    decision: Decision
    arguments: dict[str, JSONValue] = field(default_factory=dict[str, JSONValue])
    grant: Grant | None = None
    scope: ScopeDefinition | None = None

    @property
    def approval(self) -> ApprovalMode:
        return ApprovalMode.NONE if self.scope is None else self.scope.approval

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset() if self.scope is None else self.scope.labels


_PIN_REASONS = {
    PinStatus.PENDING: Reason.TOOL_UNAPPROVED,
    PinStatus.CHANGED: Reason.TOOL_DEFINITION_CHANGED,
}


def decide(request: AccessRequest, *, realpath: Realpath | None = None) -> Authorization:
    """Decide ``request``: deny on the first failing stage, else allow with canonical arguments.

    Never raises to say no. An exception means the decision could not be made, and the shell
    must deny (fail closed).
    """
    did = request.decision_id
    if request.token_problem is not None:
        return Authorization(Decision.deny(did, request.token_problem))

    policy = request.policy
    covering = policy.covering(request.connector, request.tool)
    narrowing = policy.narrowing_for(request.connector, request.tool)
    if request.pin_status is None or not covering or (narrowing is not None and not narrowing):
        return Authorization(Decision.deny(did, Reason.SCOPE_MISSING))

    pin_reason = _PIN_REASONS.get(request.pin_status)
    if pin_reason is not None:
        return Authorization(Decision.deny(did, pin_reason))

    narrowing_sets: tuple[Constraints, ...] = tuple(g.constraints for g in narrowing or ())
    detail: list[str] = []
    for grant, scope in covering:
        sets = (grant.constraints, *narrowing_sets)
        result = check_arguments(sets, request.arguments, realpath=realpath)
        if result.ok:
            rule_ids = (grant.id, *(g.id for g in narrowing or ()))
            return Authorization(Decision.allow(did, rule_ids), result.arguments, grant, scope)
        detail.extend(f"{grant.id}: {v.path} {v.operator}: {v.message}" for v in result.violations)
    rule_ids = tuple(grant.id for grant, _ in covering)
    return Authorization(
        Decision.deny(did, Reason.CONSTRAINT_VIOLATED, rule_ids=rule_ids, detail=tuple(detail))
    )


def visible(policy: TokenPolicy, tools: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (connector, tool) pairs the token reaches, in the order given: what tools/list shows."""
    return [(c, t) for c, t in tools if policy.reaches(c, t)]
