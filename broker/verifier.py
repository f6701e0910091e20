"""The mcp SDK `TokenVerifier`: capability tokens checked on every HTTP request.

Shell adapter: verification is `broker.core.tokens.verify_token` with the key ring's keys; then
revocation and agent status through the `RevocationCache`. A refusal is logged with its reason
and the token's jti (when the signature verified), never the token, and answered with None, which
the SDK turns into 401 with ``WWW-Authenticate``.

Verified tokens are remembered (`VerifiedTokens`): an agent presents the same token on every call
of its task, and the Ed25519 check (130-230 µs here) is the largest fixed cost of a mediated call.
What is remembered is the exact token string, so a hit proves the same bytes were verified
before; what can change since is re-checked on every use: the signing key must still verify
(a retired key's tokens stop at once), the time claims and issuer/audience against now
(`check_claims`), and revocation and agent status (the `RevocationCache`, in memory). A token
that was refused is never remembered.
"""

from __future__ import annotations

import logging
import time

from mcp.server.auth.provider import AccessToken

from broker.config import BrokerConfig
from broker.core.decision import Reason
from broker.core.tokens import (
    TokenClaims,
    TokenRejected,
    check_claims,
    unverified_header,
    verify_token,
)
from broker.errors import StoreUnavailable
from broker.keys import KeyRing
from broker.ports import Clock, Store
from broker.revocations import RevocationCache

__all__ = ["BrokerTokenVerifier"]

logger = logging.getLogger(__name__)

# An unknown kid may be a key another replica just rotated in; reloading the keys from the store
# is rate-limited so that tokens with random kids cannot turn into store queries.
KEY_REFRESH_INTERVAL = 5.0
VERIFIED_TOKENS_MAX = 4096
"""Tokens remembered at once; the whole memory is dropped when full (cheap, and bounded)."""


class VerifiedTokens:
    """Tokens whose signature and claims verified, by their exact string: ``(claims, kid)``.

    Bounded by ``limit``; an expired token is dropped when it is next seen, and everything is
    dropped at once when the memory is full (a flood of distinct valid tokens only costs the
    verification they would have cost anyway).
    """

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int = VERIFIED_TOKENS_MAX) -> None:
        self._entries: dict[str, tuple[TokenClaims, str]] = {}
        self._limit = limit

    def get(self, raw: str) -> tuple[TokenClaims, str] | None:
        return self._entries.get(raw)

    def put(self, raw: str, claims: TokenClaims, kid: str) -> None:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[raw] = (claims, kid)

    def drop(self, raw: str) -> None:
        self._entries.pop(raw, None)

    def __len__(self) -> int:
        return len(self._entries)


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
        self._last_key_refresh = -KEY_REFRESH_INTERVAL
        self.verified = VerifiedTokens()
        self._access: dict[str, tuple[TokenClaims, AccessToken]] = {}

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
        now = self.clock.now()
        keys = self.keyring.verification_keys(now)
        known = self.verified.get(raw)
        if known is not None:
            claims, kid = known
            if kid in keys:
                try:
                    check_claims(
                        claims,
                        audience=self.audience,
                        issuer=self.issuer,
                        now=now,
                        leeway=self.leeway,
                        max_lifetime=self.max_lifetime,
                    )
                except TokenRejected:
                    self.verified.drop(raw)
                    raise
                return claims
            self.verified.drop(raw)
        claims = verify_token(
            raw,
            keys=keys,
            audience=self.audience,
            issuer=self.issuer,
            now=now,
            leeway=self.leeway,
            max_lifetime=self.max_lifetime,
        )
        self.verified.put(raw, claims, str(unverified_header(raw)["kid"]))
        return claims

    async def authenticate(self, raw: str, *, closed_task_ok: bool = False) -> TokenClaims:
        """Signature, claims, revocation and agent status; refreshes keys on an unknown kid.

        ``closed_task_ok``: a token whose task was closed passes (``task-closed`` otherwise
        refuses it like the other reasons). Only the MCP door sets it: mediation then denies
        what the token asks (``task-closed``) and records it, so the use is on the record and
        reaches the detectors. Everywhere else (token exchange) a closed task's token is refused.

        Raises:
            TokenRejected: ``reason`` is a token reason or a `Reason` value (``token-revoked``,
                ``agent-quarantined``, ``agent-disabled``, ``store-unavailable``,
                ``task-closed``).
        """
        try:
            claims = self.verify_claims(raw)
        except TokenRejected as exc:
            if exc.reason != "unknown-key" or not await self._refresh_keys():
                raise
            claims = self.verify_claims(raw)
        reason = self.revocations.check(claims, self.clock.now())
        if reason is not None and not (closed_task_ok and reason is Reason.TASK_CLOSED):
            raise TokenRejected(reason.value, jti=claims.jti)
        return claims

    async def _refresh_keys(self) -> bool:
        if self.store is None:
            return False
        mono = time.monotonic()
        if mono - self._last_key_refresh < KEY_REFRESH_INTERVAL:
            return False
        self._last_key_refresh = mono
        await self.keyring.refresh(self.store)
        return True

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK hook: an `AccessToken` for a usable token, else None (401).

        A store failure while reloading keys is a refusal too (fail closed).
        """
        try:
            claims = await self.authenticate(token, closed_task_ok=True)
        except TokenRejected as exc:
            logger.info("token refused", extra={"reason": exc.reason, "jti": exc.jti})
            return None
        except StoreUnavailable:
            logger.warning("token refused", extra={"reason": "store-unavailable", "jti": None})
            return None
        known = self._access.get(token)
        if known is not None and known[0] is claims:
            # The same verified claims (checked again just now): the same answer, built once.
            return known[1]
        access = AccessToken(
            token=token,
            client_id=claims.client_id,
            scopes=list(claims.scopes),
            expires_at=claims.exp,
            resource=claims.aud,
            subject=claims.sub,
            claims=claims.to_payload(),
        )
        if len(self._access) >= VERIFIED_TOKENS_MAX:
            self._access.clear()
        self._access[token] = (claims, access)
        return access
