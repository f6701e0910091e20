"""Review-page logins: opaque server-side sessions, CSRF tokens and same-origin checks. Shell.

The cookie holds only a random 256-bit id; the store keeps, under the id's SHA-256, the admin
token's id and the login's creation and last-seen times (`broker.ports.Store`'s review-login
methods), so every process and replica sharing the store serves the login and a logout or
expiry seen by one holds for all. A login ends after `IDLE_TIMEOUT` without a request or
`ABSOLUTE_LIFETIME` after it began; an expired one is refused and deleted, expired ones are
pruned whenever someone logs in, and at most `MAX_LOGINS` are kept (the least recently seen go
first). The admin token itself is never kept, and every request re-reads the token's record
(its name and role come from there), so revoking it ends its review logins at once.

A form's CSRF token is ``HMAC-SHA256(csrf key, "csrf" 0x00 session id)`` with the csrf key
``HMAC-SHA256(recording key, "review-csrf")``: the same in every process holding the broker's
recording key, bound to the login, compared in constant time, useless to anyone without the
cookie. State-changing requests must also be same-origin: ``Sec-Fetch-Site``, when the browser
sends it, must be ``same-origin``, and ``Origin``, when sent, must be the page's own origin (or
the configured public URL's); an ``Origin: null`` (what ``no-referrer`` pages send) passes only
with ``Sec-Fetch-Site: same-origin``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from starlette.requests import Request

from broker.core.identity import AdminRole, AdminToken
from broker.errors import NotFound
from broker.ports import ReviewLoginRecord, Store

__all__ = [
    "ABSOLUTE_LIFETIME",
    "COOKIE_NAME",
    "IDLE_TIMEOUT",
    "MAX_LOGINS",
    "Login",
    "LoginStore",
    "is_same_origin",
]

COOKIE_NAME = "broker_review"
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_LIFETIME = timedelta(hours=8)
MAX_LOGINS = 10_000
_CSRF_LABEL = b"review-csrf"


@dataclass(frozen=True, slots=True)
class Login:
    token_id: str
    name: str
    role: AdminRole
    created_at: datetime
    last_seen: datetime
    csrf: str


class LoginStore:
    """The review page's logins, kept in ``store``; CSRF tokens keyed by ``recording_key``."""

    def __init__(self, store: Store, recording_key: bytes) -> None:
        self._store = store
        self._key = hmac.new(recording_key, _CSRF_LABEL, hashlib.sha256).digest()

    @staticmethod
    def _index(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def csrf_for(self, session_id: str) -> str:
        return hmac.new(self._key, b"csrf\x00" + session_id.encode(), hashlib.sha256).hexdigest()

    async def create(self, token: AdminToken, now: datetime) -> str:
        """A new login for ``token``; returns the id to put in the cookie."""
        await self._store.prune_review_logins(
            seen_before=now - IDLE_TIMEOUT, created_before=now - ABSOLUTE_LIFETIME
        )
        session_id = secrets.token_urlsafe(32)
        record = ReviewLoginRecord(
            id_hash=self._index(session_id), token_id=token.id, created_at=now, last_seen=now
        )
        await self._store.create_review_login(record, keep=MAX_LOGINS)
        return session_id

    async def get(self, session_id: str | None, now: datetime) -> Login | None:
        """The live login for ``session_id`` (touching its idle timer), or None.

        None also when it expired (it is deleted) or its admin token is revoked or gone (every
        login of the token is deleted).
        """
        if not session_id or len(session_id) > 128:
            return None
        index = self._index(session_id)
        try:
            record = await self._store.get_review_login(index)
        except NotFound:
            return None
        if now - record.last_seen > IDLE_TIMEOUT or now - record.created_at > ABSOLUTE_LIFETIME:
            await self._store.delete_review_login(index)
            return None
        try:
            token, _ = await self._store.get_admin_token(record.token_id)
        except NotFound:
            token = None
        if token is None or token.revoked_at is not None:
            await self.drop_token(record.token_id)
            return None
        try:
            await self._store.touch_review_login(index, now)
        except NotFound:
            return None  # logged out meanwhile, perhaps on another replica
        return Login(
            token_id=token.id,
            name=token.name,
            role=token.role,
            created_at=record.created_at,
            last_seen=now,
            csrf=self.csrf_for(session_id),
        )

    async def drop(self, session_id: str | None) -> None:
        if session_id and len(session_id) <= 128:
            await self._store.delete_review_login(self._index(session_id))

    async def drop_token(self, token_id: str) -> None:
        """End every login of an admin token (it was revoked)."""
        await self._store.delete_review_logins_of(token_id)

    def csrf_ok(self, session_id: str, given: str | None) -> bool:
        if not given:
            return False
        return hmac.compare_digest(self.csrf_for(session_id), given)


def _origin_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def is_same_origin(request: Request, public_url: str) -> bool:
    """Whether a state-changing request comes from this site's own pages (see the module note)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        # Our own `Referrer-Policy: no-referrer` makes Chromium send `Origin: null` on form
        # posts; then only the browser's Sec-Fetch-Site can vouch for the request.
        return site == "same-origin"
    own = {f"{request.url.scheme}://{request.url.netloc}".lower()}
    public = _origin_of(public_url) if public_url else None
    if public:
        own.add(public)
    return origin.lower() in own
