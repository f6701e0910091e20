"""The mcp SDK `TokenVerifier`: capability tokens checked on every HTTP request.

Shell adapter: verification is `broker.core.tokens.verify_token` with the key ring's keys; then
revocation and agent status through the `RevocationCache`. A refusal is logged with its reason
and the token's jti (when the signature verified), never the token, and answered with None, which
the SDK turns into 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

from mcp.server.auth.provider import AccessToken

from broker.config import BrokerConfig
from broker.core.tokens import TokenClaims
from broker.keys import KeyRing
from broker.ports import Clock, Store
from broker.revocations import RevocationCache

__all__ = ["BrokerTokenVerifier"]


class BrokerTokenVerifier:
    """Verifies capability tokens for the MCP front (and the CLI / admin API)."""

    def __init__(
        self,
        keyring: KeyRing,
        revocations: RevocationCache,
        clock: Clock,
        *,
        audience: str,
        issuer: str,
        leeway: int,
        max_lifetime: int,
        store: Store | None = None,
    ) -> None:
        self.keyring = keyring
        self.revocations = revocations
        self.clock = clock
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.store = store

    @classmethod
    def from_config(
        cls,
        config: BrokerConfig,
        keyring: KeyRing,
        revocations: RevocationCache,
        clock: Clock,
        store: Store | None = None,
    ) -> BrokerTokenVerifier:
        return cls(
            keyring,
            revocations,
            clock,
            audience=config.server.resource_url,
            issuer=config.server.base_url,
            leeway=config.tokens.leeway,
            max_lifetime=config.tokens.max_ttl,
            store=store,
        )

    def verify_claims(self, raw: str) -> TokenClaims:
        """Signature and claims only (no revocation check): for ``token inspect`` and admin.

        Raises:
            TokenRejected: the token is not valid now; ``reason`` says why.
        """
        raise NotImplementedError

    async def authenticate(self, raw: str) -> TokenClaims:
        """Signature, claims, revocation and agent status; refreshes keys on an unknown kid.

        Raises:
            TokenRejected: ``reason`` is a token reason or a `Reason` value (``token-revoked``,
                ``agent-quarantined``, ``agent-disabled``, ``store-unavailable``).
        """
        raise NotImplementedError

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK hook: an `AccessToken` for a usable token, else None (401)."""
        raise NotImplementedError
