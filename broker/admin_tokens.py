"""Admin-API credentials: creation and authentication. Disjoint from agent tokens by format.

An admin token is ``bat_<id>.<secret>``: the id names the record, the secret (256 random bits) is
stored only as its SHA-256. A fast hash is right here because the secret is a high-entropy
random value, not a password (nothing to brute-force); comparison is constant-time. Agent
capability tokens are JWTs and can never take this shape, so an agent token is refused by the
admin API before any lookup (design "What must hold" 10).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime

from broker.core.identity import AdminRole, AdminToken
from broker.errors import AdminAuthFailed, NotFound
from broker.ports import Store, role_allows

__all__ = ["authenticate_admin", "create_admin_token"]

_TOKEN_RE = re.compile(r"^bat_([a-z0-9]{16})\.([A-Za-z0-9_-]{43})$")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


async def create_admin_token(
    store: Store, *, role: AdminRole, name: str, now: datetime
) -> tuple[AdminToken, str]:
    """Create an admin token; returns its record and the raw token, which is shown only once."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = AdminToken(id=token_id, name=name, role=role, created_at=now)
    await store.create_admin_token(record, secret_hash=_digest(secret))
    return record, f"bat_{token_id}.{secret}"


async def authenticate_admin(store: Store, raw: str, *, needs: AdminRole) -> AdminToken:
    """The admin token behind ``raw`` if it is valid, unrevoked and its role covers ``needs``.

    Raises:
        AdminAuthFailed: malformed, unknown, revoked, wrong secret, or the role is too weak.
    """
    match = _TOKEN_RE.match(raw)
    if match is None:
        raise AdminAuthFailed("not an admin token")
    token_id, secret = match.groups()
    try:
        record, stored = await store.get_admin_token(token_id)
    except NotFound:
        # Same work as a hit, so an unknown id is not told apart by timing.
        hmac.compare_digest(_digest(secret), _digest(""))
        raise AdminAuthFailed("unknown admin token") from None
    if not hmac.compare_digest(_digest(secret), stored):
        raise AdminAuthFailed("unknown admin token")
    if record.revoked_at is not None:
        raise AdminAuthFailed("admin token revoked")
    if not role_allows(record.role, needs):
        raise AdminAuthFailed(f"role '{record.role}' may not do this (needs '{needs}')")
    return record
