"""Capability tokens: the claim schema, minting and verification. Pure and synchronous.

Imports the standard library, pydantic, pyjwt and cryptography only. Keys and time are passed in.

The token is a JWT (RFC 9068 access token) signed with Ed25519: header exactly
``{"alg": "EdDSA", "typ": "at+jwt", "kid": <kid>}``. Claims (see `TokenClaims`): ``iss``,
``aud`` (a string), ``sub`` (the principal: the root agent), ``client_id`` (the agent presenting
the token), ``exp``/``iat``/``nbf`` (int seconds), ``jti``, ``scope``, ``task``, optionally
``authorization_details`` (RFC 9396) and ``budget``, and for delegated tokens ``act`` (RFC 8693)
and ``delegation``.

`verify_token` refuses with one `TokenRejected` reason per failed check, in this order:

1. ``malformed``: not three base64url segments, too long, header or payload not a strict JSON
   object (duplicate keys refused), an unknown header parameter (``crit``, ``b64``, ...).
2. ``embedded-key``: the header carries ``jku``, ``x5u``, ``jwk`` or ``x5c``. These are never
   fetched or used; we refuse them outright rather than ignore them, because the broker never
   mints one and a token that carries one was made by someone else.
3. ``bad-type``: ``typ`` missing or other than ``at+jwt`` / ``application/at+jwt`` (any case).
4. ``bad-algorithm``: ``alg`` other than ``EdDSA`` (``none``, ``HS256``, ``RS256``, ...).
5. ``unknown-key``: ``kid`` missing, not a plain short url-safe string, or not among the keys.
   The kid is only ever a dictionary key here, never part of a path or URL.
6. ``bad-signature``: the signature does not verify under that key. The algorithm is pinned to
   the key's type (an Ed25519 key verifies EdDSA only), never taken from the header.
7. ``missing-claim:<name>`` / ``bad-claim:<name>``: a required claim is absent, or a claim has
   the wrong shape, an unknown claim is present, or the claims contradict each other.
8. ``issuer-mismatch`` / ``audience-mismatch``: exact string comparison.
9. ``issued-in-future`` / ``not-yet-valid`` / ``expired`` / ``lifetime-too-long``: against the
   ``now`` passed in, with the fixed ``leeway``. pyjwt's own time checks are switched off because
   they read the wall clock; every time rule lives here, so tests and replicas decide on ``now``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, LiteralString, Self

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "KID_RE",
    "MAX_TOKEN_BYTES",
    "REQUIRED_CLAIMS",
    "ActorClaim",
    "DelegationClaim",
    "TaskClaim",
    "TokenClaims",
    "TokenRejected",
    "check_claims",
    "mint_token",
    "unverified_header",
    "verify_token",
]

KID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A key id: short, url-safe, never a path."""
JTI_RE = r"^[A-Za-z0-9_-]{22,128}$"
"""At least 22 url-safe characters: 132 bits when random."""
MAX_TOKEN_BYTES = 16 * 1024
REQUIRED_CLAIMS = (
    "iss",
    "aud",
    "sub",
    "client_id",
    "exp",
    "iat",
    "nbf",
    "jti",
    "scope",
    "task",
)
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SCOPE_TOKEN_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_EMBEDDED_KEY_PARAMS = frozenset({"jku", "x5u", "jwk", "x5c"})
_HEADER_PARAMS = frozenset({"alg", "typ", "kid"})
_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_ALGORITHM = "EdDSA"
# pyjwt's EdDSA primitive, called on the segments we parsed: PyJWS.decode would parse the token
# a second time (its base64 check alone costs more than the signature), and its claim checks read
# the wall clock; claims and time rules live here instead.
_EDDSA = OKPAlgorithm()
# Agent ids, task ids: printable, no whitespace or control characters.
_ID = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
_TEXT = Annotated[StrictStr, Field(max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*$")]


class TokenRejected(ValueError):
    """A token failed verification; ``reason`` names the one check that failed (kebab-case).

    The caller's fault (or an attacker's). ``jti`` is set once the signature has verified, so a
    refusal can be logged by token id; the token itself is never part of the message.
    """

    def __init__(self, reason: str, *, jti: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.jti = jti


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskClaim(_Frozen):
    """``task``: the one task the token is for, and the purpose the agent stated."""

    id: _ID
    purpose: _TEXT = ""

    def to_json(self) -> dict[str, JsonValue]:
        return {"id": self.id, "purpose": self.purpose}


class ActorClaim(_Frozen):
    """``act`` (RFC 8693): the current actor, with the previous actors nested inside."""

    sub: _ID
    act: ActorClaim | None = None

    @property
    def actors(self) -> tuple[str, ...]:
        """Actor ids, current first."""
        out: list[str] = []
        node: ActorClaim | None = self
        while node is not None:
            out.append(node.sub)
            node = node.act
        return tuple(out)

    def to_json(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {"sub": self.sub}
        if self.act is not None:
            out["act"] = self.act.to_json()
        return out


class DelegationClaim(_Frozen):
    """``delegation``: the parent token, every ancestor (root first) and the depth."""

    parent: Annotated[StrictStr, Field(pattern=JTI_RE)]
    chain: tuple[Annotated[StrictStr, Field(pattern=JTI_RE)], ...] = Field(min_length=1)
    depth: StrictInt = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.depth != len(self.chain) or self.chain[-1] != self.parent:
            raise PydanticCustomError(
                "delegation_chain", "depth must equal len(chain) and chain must end with parent"
            )
        return self

    def to_json(self) -> dict[str, JsonValue]:
        return {"parent": self.parent, "chain": list(self.chain), "depth": self.depth}


def _claim_error(name: str, message: LiteralString) -> PydanticCustomError:
    return PydanticCustomError("claims_inconsistent", message, {"claim": name})


class TokenClaims(_Frozen):
    """The claims of a capability token. Construct it to mint; `verify_token` returns it.

    Raises ``pydantic.ValidationError`` on construction when a claim has the wrong shape or the
    claims contradict each other (``exp`` not after ``iat``, a delegated token without ``act``,
    ``act.sub`` not the ``client_id``, ...).
    """

    iss: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    aud: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    sub: _ID
    client_id: _ID
    exp: StrictInt = Field(ge=0)
    iat: StrictInt = Field(ge=0)
    nbf: StrictInt = Field(ge=0)
    jti: Annotated[StrictStr, Field(pattern=JTI_RE)]
    scope: Annotated[StrictStr, Field(max_length=4096)]
    task: TaskClaim
    authorization_details: tuple[dict[str, JsonValue], ...] | None = None
    budget: StrictInt | None = Field(default=None, ge=1)
    act: ActorClaim | None = None
    delegation: DelegationClaim | None = None

    @field_validator("scope")
    @classmethod
    def _scope_syntax(cls, v: str) -> str:
        names = v.split(" ") if v else []
        if any(not _SCOPE_TOKEN_RE.fullmatch(n) for n in names):
            raise ValueError("scope names are RFC 6749 scope-tokens separated by single spaces")
        if len(set(names)) != len(names):
            raise ValueError("a scope name appears twice")
        return v

    @field_validator("authorization_details")
    @classmethod
    def _details_typed(
        cls, v: tuple[dict[str, JsonValue], ...] | None
    ) -> tuple[dict[str, JsonValue], ...] | None:
        if v is not None:
            for detail in v:
                kind = detail.get("type")
                if not isinstance(kind, str) or not kind:
                    raise ValueError("every authorization detail needs a string 'type'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.exp <= self.iat:
            raise _claim_error("exp", "exp must be after iat")
        if self.nbf >= self.exp:
            raise _claim_error("nbf", "nbf must be before exp")
        if self.act is None and self.delegation is None:
            if self.sub != self.client_id:
                raise _claim_error("sub", "a token that is not delegated has sub == client_id")
        elif self.act is None or self.delegation is None:
            raise _claim_error("act", "act and delegation come together, on delegated tokens only")
        else:
            if self.act.sub != self.client_id:
                raise _claim_error("act", "act.sub must be the client_id")
            if len(self.act.actors) != self.delegation.depth:
                raise _claim_error("act", "one actor per delegation step")
            if self.jti in self.delegation.chain:
                raise _claim_error("jti", "a token cannot be its own ancestor")
        return self

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.scope.split(" ")) if self.scope else ()

    @property
    def depth(self) -> int:
        """0 for a client-credentials token, else the number of delegation steps."""
        return 0 if self.delegation is None else self.delegation.depth

    @property
    def ancestor_jtis(self) -> tuple[str, ...]:
        """Ancestor token ids, root first (empty for a client-credentials token)."""
        return () if self.delegation is None else self.delegation.chain

    @property
    def agents_in_chain(self) -> tuple[str, ...]:
        """Every agent the token speaks for or through: sub, each actor (oldest first)."""
        out = [self.sub]
        if self.act is not None:
            out.extend(reversed(self.act.actors))
        out.append(self.client_id)
        return tuple(dict.fromkeys(out))

    @property
    def issued_at(self) -> datetime:
        return datetime.fromtimestamp(self.iat, UTC)

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.exp, UTC)

    def to_payload(self) -> dict[str, JsonValue]:
        """The JWT payload: optional claims appear only when set."""
        out: dict[str, JsonValue] = {
            "iss": self.iss,
            "aud": self.aud,
            "sub": self.sub,
            "client_id": self.client_id,
            "exp": self.exp,
            "iat": self.iat,
            "nbf": self.nbf,
            "jti": self.jti,
            "scope": self.scope,
            "task": self.task.to_json(),
        }
        if self.authorization_details is not None:
            out["authorization_details"] = [dict(d) for d in self.authorization_details]
        if self.budget is not None:
            out["budget"] = self.budget
        if self.act is not None:
            out["act"] = self.act.to_json()
        if self.delegation is not None:
            out["delegation"] = self.delegation.to_json()
        return out


def mint_token(claims: TokenClaims, *, private_key: Ed25519PrivateKey, kid: str) -> str:
    """Sign ``claims`` as an ``at+jwt`` with Ed25519 under ``kid``.

    Raises:
        ValueError: ``kid`` is not a short url-safe id.
    """
    if not KID_RE.fullmatch(kid):
        raise ValueError("a kid is 1-64 url-safe characters")
    return jwt.encode(
        claims.to_payload(),
        private_key,
        algorithm=_ALGORITHM,
        headers={"typ": "at+jwt", "kid": kid},
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:  # pragma: no cover - the token regex admits only base64url
        raise TokenRejected("malformed") from None
    return _json_object(raw)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise TokenRejected("malformed") from None
    if not isinstance(value, dict):
        raise TokenRejected("malformed")
    return value  # pyright: ignore[reportUnknownVariableType]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def unverified_header(raw: str) -> dict[str, Any]:
    """The token's header, parsed strictly but NOT verified: for diagnostics only.

    Raises:
        TokenRejected: ``malformed``.
    """
    if len(raw) > MAX_TOKEN_BYTES or not _TOKEN_RE.fullmatch(raw):
        raise TokenRejected("malformed")
    return _b64json(raw.split(".", 1)[0])


def _key_for(header: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> Ed25519PublicKey:
    if not _HEADER_PARAMS.issuperset(header):
        if _EMBEDDED_KEY_PARAMS.intersection(header):
            raise TokenRejected("embedded-key")
        raise TokenRejected("malformed")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _TYPES:
        raise TokenRejected("bad-type")
    if header.get("alg") != _ALGORITHM:
        raise TokenRejected("bad-algorithm")
    kid = header.get("kid")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        raise TokenRejected("unknown-key")
    key = keys.get(kid)
    # The key's type decides the algorithm; only Ed25519 keys exist in this broker.
    if not isinstance(key, Ed25519PublicKey):
        raise TokenRejected("unknown-key")
    return key


def _parse_claims(payload: Mapping[str, Any]) -> TokenClaims:
    for name in REQUIRED_CLAIMS:
        if name not in payload:
            raise TokenRejected(f"missing-claim:{name}")
    try:
        return TokenClaims.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        ctx = err.get("ctx") or {}
        claim = ctx.get("claim") or (err["loc"][0] if err["loc"] else "claims")
        raise TokenRejected(f"bad-claim:{claim}") from None


def verify_token(
    raw: str,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    audience: str,
    issuer: str,
    now: datetime,
    leeway: int,
    max_lifetime: int,
) -> TokenClaims:
    """Verify a capability token's header, signature and claims at ``now``; return its claims.

    Revocation and agent status are not checked here (see `broker.core.revocation`).

    Raises:
        TokenRejected: one reason per failed check, as listed in the module docstring.
    """
    header = unverified_header(raw)
    key = _key_for(header, keys)
    header_b64, payload_b64, signature_b64 = raw.split(".")
    signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    # Canonical base64url only, so one signature has one spelling.
    if len(signature) != 64 or _b64(signature) != signature_b64:
        raise TokenRejected("bad-signature")
    if not _EDDSA.verify(f"{header_b64}.{payload_b64}".encode("ascii"), key, signature):
        raise TokenRejected("bad-signature")
    payload = _b64json(payload_b64)
    jti = payload.get("jti")
    jti = jti if isinstance(jti, str) and re.fullmatch(JTI_RE, jti) else None
    try:
        claims = _parse_claims(payload)
    except TokenRejected as exc:
        exc.jti = jti
        raise
    check_claims(
        claims, audience=audience, issuer=issuer, now=now, leeway=leeway, max_lifetime=max_lifetime
    )
    return claims


def check_claims(
    claims: TokenClaims,
    *,
    audience: str,
    issuer: str,
    now: datetime,
    leeway: int,
    max_lifetime: int,
) -> None:
    """The claim checks of `verify_token` that depend on the verifier and the time.

    A verifier that remembers tokens whose signature it already checked runs these again on
    every use, since a token verified a minute ago may have expired since.

    Raises:
        TokenRejected: issuer or audience mismatch, issued or valid only in the future,
            expired, or a lifetime beyond ``max_lifetime``.
    """

    def refuse(reason: str) -> TokenRejected:
        return TokenRejected(reason, jti=claims.jti)

    if claims.iss != issuer:
        raise refuse("issuer-mismatch")
    if claims.aud != audience:
        raise refuse("audience-mismatch")
    t = now.timestamp()
    if claims.iat > t + leeway:
        raise refuse("issued-in-future")
    if claims.nbf > t + leeway:
        raise refuse("not-yet-valid")
    if claims.exp <= t - leeway:
        raise refuse("expired")
    if claims.exp - claims.iat > max_lifetime:
        raise refuse("lifetime-too-long")
