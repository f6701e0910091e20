"""Review-page logins: opaque server-side sessions, CSRF tokens and same-origin checks. Shell.

The cookie holds only a random 256-bit id; this process maps it (by its SHA-256) to the admin
token's id and role, with an idle and an absolute expiry. The admin token itself is never kept,
and every request re-reads the token's record, so revoking it ends its review sessions at once.
Sessions live in this process's memory: a restart logs everyone out, and behind several broker
replicas the review page needs sticky routing.

A form's CSRF token is ``HMAC-SHA256(process key, session id)``: bound to the login, compared in
constant time, useless to anyone without the cookie. State-changing requests must also be
same-origin: ``Sec-Fetch-Site``, when the browser sends it, must be ``same-origin``, and
``Origin``, when sent, must be the page's own origin (or the configured public URL's); an
``Origin: null`` (what ``no-referrer`` pages send) passes only with ``Sec-Fetch-Site:
same-origin``.
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

__all__ = [
    "ABSOLUTE_LIFETIME",
    "COOKIE_NAME",
    "IDLE_TIMEOUT",
    "Login",
    "LoginStore",
    "is_same_origin",
]

COOKIE_NAME = "broker_review"
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_LIFETIME = timedelta(hours=8)
MAX_LOGINS = 10_000


@dataclass(slots=True)
class Login:
    token_id: str
    name: str
    role: AdminRole
    created_at: datetime
    last_seen: datetime
    csrf: str


class LoginStore:
    """The review page's logged-in sessions (this process only)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._logins: dict[str, Login] = {}

    @staticmethod
    def _index(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def csrf_for(self, session_id: str) -> str:
        return hmac.new(self._key, b"csrf\x00" + session_id.encode(), hashlib.sha256).hexdigest()

    def create(self, token: AdminToken, now: datetime) -> str:
        """A new session for ``token``; returns the id to put in the cookie."""
        self._prune(now)
        if len(self._logins) >= MAX_LOGINS:
            oldest = min(self._logins, key=lambda k: self._logins[k].last_seen)
            del self._logins[oldest]
        session_id = secrets.token_urlsafe(32)
        self._logins[self._index(session_id)] = Login(
            token_id=token.id,
            name=token.name,
            role=token.role,
            created_at=now,
            last_seen=now,
            csrf=self.csrf_for(session_id),
        )
        return session_id

    def get(self, session_id: str | None, now: datetime) -> Login | None:
        """The live login for ``session_id`` (touching its idle timer), or None."""
        if not session_id or len(session_id) > 128:
            return None
        index = self._index(session_id)
        login = self._logins.get(index)
        if login is None:
            return None
        if now - login.last_seen > IDLE_TIMEOUT or now - login.created_at > ABSOLUTE_LIFETIME:
            del self._logins[index]
            return None
        login.last_seen = now
        return login

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._logins.pop(self._index(session_id), None)

    def drop_token(self, token_id: str) -> None:
        """End every session of an admin token (it was revoked)."""
        for index in [k for k, v in self._logins.items() if v.token_id == token_id]:
            del self._logins[index]

    def csrf_ok(self, session_id: str, given: str | None) -> bool:
        if not given:
            return False
        return hmac.compare_digest(self.csrf_for(session_id), given)

    def _prune(self, now: datetime) -> None:
        for index in [
            k
            for k, v in self._logins.items()
            if now - v.last_seen > IDLE_TIMEOUT or now - v.created_at > ABSOLUTE_LIFETIME
        ]:
            del self._logins[index]


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
