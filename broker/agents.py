"""Agent identities: registration and client authentication at the token endpoint.

A shell module (store, argon2, pyjwt); no HTTP here. An agent authenticates with exactly one of
``client_secret_basic``, ``client_secret_post`` (a 256-bit random secret, stored only as an
argon2id hash and checked in constant time) or ``private_key_jwt`` (RFC 7523: a short-lived
assertion signed with the agent's registered Ed25519 or P-256 key, each ``jti`` accepted once).
A failure says only ``invalid_client``; the reason goes to the log, never to the caller.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import unquote_plus

import anyio.to_thread
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from broker.core.identity import AGENT_NAME_RE, Agent, AgentStatus
from broker.errors import ClientAuthFailed, NotFound, OAuthError
from broker.ports import Store

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "MAX_ASSERTION_LIFETIME",
    "SCOPE_NAME_RE",
    "AuthMethod",
    "assertion_algorithm",
    "authenticate_client",
    "hash_secret",
    "parse_public_key",
    "register_agent",
    "validate_scope_names",
    "verify_secret",
]

logger = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 300
"""Seconds: a client assertion may not expire later than this after ``now``."""
ASSERTION_LEEWAY = 30
MAX_ASSERTION_BYTES = 8 * 1024
SCOPE_NAME_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
"""An RFC 6749 scope-token (printable ASCII without space, ``"`` and ``\\``), at most 128."""
MIN_TTL, MAX_TTL = 10, 86400

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]
_SIGNING_ALGS = frozenset({"EdDSA", "ES256"})
_EMBEDDED_KEY_PARAMS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
_JTI_RE = re.compile(r"[\x21-\x7e]{1,200}")


@functools.cache
def _hasher() -> PasswordHasher:
    # argon2-cffi's defaults are the RFC 9106 low-memory profile (argon2id, t=3, m=64 MiB, p=4).
    return PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    return _hasher().hash(secrets.token_urlsafe(32))


def hash_secret(secret: str) -> str:
    """The argon2id hash of a client secret (the only form in which it is stored)."""
    return _hasher().hash(secret)


def verify_secret(stored_hash: str, secret: str) -> bool:
    """Whether ``secret`` matches ``stored_hash`` (argon2's comparison is constant-time)."""
    try:
        return _hasher().verify(stored_hash, secret)
    except (VerificationError, InvalidHashError):
        return False


def validate_scope_names(scopes: Sequence[str]) -> tuple[str, ...]:
    """Scope names as a tuple, each an RFC 6749 scope-token, no duplicates.

    Raises:
        ValueError: a name is empty, too long or has a forbidden character, or appears twice.
    """
    out: list[str] = []
    for name in scopes:
        if not SCOPE_NAME_RE.fullmatch(name):
            raise ValueError(
                f"scope name {name!r}: expected 1-128 printable ASCII characters without "
                "space, '\"' or '\\'"
            )
        if name in out:
            raise ValueError(f"scope name {name!r} appears twice")
        out.append(name)
    return tuple(out)


def assertion_algorithm(public_jwk: Mapping[str, Any]) -> Literal["EdDSA", "ES256"]:
    """The one JWS algorithm a key may sign client assertions with (pinned to its type).

    Raises:
        ValueError: the JWK is not an Ed25519 (OKP) or P-256 (EC) public key.
    """
    kty, crv = public_jwk.get("kty"), public_jwk.get("crv")
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    raise ValueError(f"expected an Ed25519 (OKP) or P-256 (EC) public key, found {kty}/{crv}")


def _public_key(public_jwk: Mapping[str, Any]) -> Ed25519PublicKey | EllipticCurvePublicKey:
    alg = assertion_algorithm(public_jwk)
    data = json.dumps(dict(public_jwk))
    key = OKPAlgorithm.from_jwk(data) if alg == "EdDSA" else ECAlgorithm.from_jwk(data)
    if not isinstance(key, Ed25519PublicKey | EllipticCurvePublicKey):
        raise ValueError("expected a public key, found a private key")
    return key


def parse_public_key(text: str) -> dict[str, Any]:
    """An agent's public key (PEM ``PUBLIC KEY`` or a JWK JSON object) as a public-only JWK.

    Raises:
        ValueError: not a PEM public key or JWK, a private key, or neither Ed25519 nor P-256.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            raw = json.loads(stripped)
        except ValueError:
            raise ValueError("the key file is neither a PEM public key nor a JWK") from None
        if not isinstance(raw, dict):
            raise ValueError("a JWK must be a JSON object")
        jwk: dict[str, Any] = dict(raw)  # pyright: ignore[reportUnknownArgumentType]
        if "d" in jwk:
            raise ValueError("this is a private key: register the PUBLIC key only")
        key = _public_key(jwk)
    else:
        if "PRIVATE KEY" in stripped:
            raise ValueError("this is a private key: register the PUBLIC key only")
        try:
            loaded = load_pem_public_key(stripped.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise ValueError("the key file is neither a PEM public key nor a JWK") from None
        if isinstance(loaded, EllipticCurvePublicKey) and not isinstance(loaded.curve, SECP256R1):
            raise ValueError(f"expected a P-256 EC key, found {loaded.curve.name}")
        if not isinstance(loaded, Ed25519PublicKey | EllipticCurvePublicKey):
            raise ValueError("expected an Ed25519 or P-256 public key")
        key = loaded
    if isinstance(key, Ed25519PublicKey):
        out = OKPAlgorithm.to_jwk(key, as_dict=True)
    else:
        out = ECAlgorithm.to_jwk(key, as_dict=True)
    assertion_algorithm(out)
    return out


async def register_agent(
    store: Store,
    *,
    name: str,
    owner: str,
    scopes: Sequence[str],
    max_ttl: int,
    public_jwk: Mapping[str, Any] | None = None,
    now: datetime,
    max_delegation_depth: int = 2,
) -> tuple[Agent, str | None]:
    """Register an agent; returns it and its client secret (None for ``private_key_jwt``).

    The secret is shown to the caller once: only its argon2id hash is stored.

    Raises:
        ValueError: a bad name, owner, scope name, TTL, depth or public key.
        broker.store.errors.Conflict: the name is taken.
    """
    if not AGENT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"agent name {name!r}: expected a lowercase letter, then up to 63 of a-z 0-9 _ -"
        )
    owner = owner.strip()
    if not owner or len(owner) > 200 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in owner):
        raise ValueError("owner: expected 1-200 printable characters naming who is responsible")
    allowed = validate_scope_names(scopes)
    if not allowed:
        raise ValueError("an agent needs at least one scope it may request")
    if not MIN_TTL <= max_ttl <= MAX_TTL:
        raise ValueError(f"max TTL {max_ttl}s: expected {MIN_TTL}s to {MAX_TTL}s")
    if not 0 <= max_delegation_depth <= 10:
        raise ValueError("max delegation depth: expected 0 to 10")
    jwk: dict[str, Any] | None = None
    if public_jwk is not None:
        if "d" in public_jwk:
            raise ValueError("this is a private key: register the PUBLIC key only")
        _public_key(public_jwk)
        jwk = {k: public_jwk[k] for k in ("kty", "crv", "x", "y") if k in public_jwk}
    agent = Agent(
        id=f"agt_{secrets.token_hex(10)}",
        name=name,
        owner=owner,
        status=AgentStatus.ACTIVE,
        allowed_scopes=allowed,
        max_ttl_seconds=max_ttl,
        auth_method="private_key_jwt" if jwk is not None else "client_secret",
        created_at=now,
        public_jwk=jwk,
        max_delegation_depth=max_delegation_depth,
    )
    secret = None if jwk is not None else secrets.token_urlsafe(32)
    secret_hash = None if secret is None else await anyio.to_thread.run_sync(hash_secret, secret)
    await store.create_agent(agent, secret_hash=secret_hash)
    return agent, secret


def client_auth_method(form: Mapping[str, str], headers: Mapping[str, str]) -> AuthMethod | None:
    """Which client authentication method a request uses (None: none at all).

    Raises:
        OAuthError: ``invalid_request`` when it uses more than one (RFC 6749 §2.3).
    """
    used: list[AuthMethod] = []
    if headers.get("authorization", "").split(" ", 1)[0].lower() == "basic":
        used.append("client_secret_basic")
    if "client_secret" in form:
        used.append("client_secret_post")
    if "client_assertion" in form or "client_assertion_type" in form:
        used.append("private_key_jwt")
    if len(used) > 1:
        raise OAuthError(
            "invalid_request", "use exactly one client authentication method per request"
        )
    return used[0] if used else None


def _refuse(why: str, *, client_id: str | None, method: str | None) -> ClientAuthFailed:
    logger.info(
        "client authentication failed",
        extra={"client_id": client_id, "auth_method": method, "why": why},
    )
    return ClientAuthFailed("client authentication failed")


async def authenticate_client(
    store: Store,
    request_form: Mapping[str, str],
    headers: Mapping[str, str],
    *,
    token_endpoint_url: str,
    issuer: str,
    now: datetime,
) -> Agent:
    """The agent that authenticated this token request, whatever its status.

    ``headers`` must be keyed in lowercase (Starlette's ``Headers`` is). Status is the caller's
    business: a disabled or quarantined agent still authenticates here.

    Raises:
        ClientAuthFailed: no, malformed or wrong credentials, an unknown client, or a method the
            agent is not registered for. The message says nothing more; the log says why.
        OAuthError: ``invalid_request`` when more than one method is used.
    """
    method = client_auth_method(request_form, headers)
    if method is None:
        raise _refuse(
            "no client authentication", client_id=request_form.get("client_id"), method=None
        )
    if method == "private_key_jwt":
        return await _authenticate_assertion(
            store, request_form, token_endpoint_url=token_endpoint_url, issuer=issuer, now=now
        )
    if method == "client_secret_basic":
        client_id, secret = _basic_credentials(headers["authorization"])
        form_id = request_form.get("client_id")
        if client_id is None or secret is None or (form_id is not None and form_id != client_id):
            raise _refuse("malformed basic credentials", client_id=form_id, method=method)
    else:
        client_id, secret = request_form.get("client_id"), request_form["client_secret"]
        if not client_id:
            raise _refuse("client_secret without client_id", client_id=None, method=method)
    return await _authenticate_secret(store, client_id, secret, method=method)


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    parts = header.split(" ", 1)
    if len(parts) != 2:
        return None, None
    try:
        decoded = base64.b64decode(parts[1].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None, None
    # RFC 6749 §2.3.1: both halves are form-urlencoded before being joined.
    return unquote_plus(client_id), unquote_plus(secret)


async def _authenticate_secret(
    store: Store, client_id: str, secret: str, *, method: AuthMethod
) -> Agent:
    agent: Agent | None = None
    stored: str | None = None
    try:
        agent = await store.get_agent(client_id)
        stored = await store.agent_secret_hash(agent.id)
    except NotFound:
        agent = None
    # An unknown client (or one without a secret) costs one argon2 verify like any other, so
    # response times do not tell which client ids exist.
    ok = await anyio.to_thread.run_sync(verify_secret, stored or _dummy_hash(), secret)
    if agent is None:
        raise _refuse("unknown client id", client_id=client_id, method=method)
    if stored is None or agent.auth_method != "client_secret":
        raise _refuse("agent has no client secret", client_id=client_id, method=method)
    if not ok:
        raise _refuse("wrong client secret", client_id=client_id, method=method)
    return agent


async def _authenticate_assertion(
    store: Store,
    form: Mapping[str, str],
    *,
    token_endpoint_url: str,
    issuer: str,
    now: datetime,
) -> Agent:
    method: AuthMethod = "private_key_jwt"
    form_id = form.get("client_id")

    def refuse(why: str, client_id: str | None = form_id) -> ClientAuthFailed:
        return _refuse(why, client_id=client_id, method=method)

    if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
        raise refuse("wrong or missing client_assertion_type")
    assertion = form.get("client_assertion", "")
    if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
        raise refuse("missing or oversized client_assertion")
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise refuse("malformed client_assertion") from None
    if _EMBEDDED_KEY_PARAMS.intersection(header):
        raise refuse("client_assertion header names a key or critical extension")
    claimed = unverified.get("sub")
    if not isinstance(claimed, str) or not claimed:
        raise refuse("client_assertion has no sub")
    if form_id is not None and form_id != claimed:
        raise refuse("client_id differs from the assertion's sub")
    try:
        agent = await store.get_agent(claimed)
    except NotFound:
        raise refuse("unknown client id", claimed) from None
    if agent.auth_method != "private_key_jwt" or agent.public_jwk is None:
        raise refuse("agent is not registered for private_key_jwt", claimed)
    try:
        alg = assertion_algorithm(agent.public_jwk)
        key = _public_key(agent.public_jwk)
    except ValueError:
        logger.exception("stored agent public key is unusable", extra={"client_id": agent.id})
        raise refuse("stored public key unusable", claimed) from None
    # The algorithm comes from the registered key, never from the header: `none`, HS256 with
    # the public key as secret, or any other algorithm is refused before the signature check.
    if header.get("alg") != alg:
        raise refuse(f"algorithm {header.get('alg')!r} is not the key's {alg}", claimed)
    audiences = list(dict.fromkeys([token_endpoint_url, issuer, issuer.rstrip("/") + "/"]))
    try:
        claims = jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=audiences,
            issuer=agent.id,
            # Time rules are checked below against the injected clock, not pyjwt's wall clock.
            options={
                "require": ["iss", "sub", "aud", "exp", "jti"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidTokenError as exc:
        raise refuse(f"client_assertion rejected: {type(exc).__name__}", claimed) from None
    t = now.timestamp()
    exp, iat, nbf, jti = claims["exp"], claims.get("iat"), claims.get("nbf"), claims["jti"]
    if not isinstance(exp, int | float) or exp <= t - ASSERTION_LEEWAY:
        raise refuse("client_assertion expired", claimed)
    if exp > t + MAX_ASSERTION_LIFETIME + ASSERTION_LEEWAY:
        raise refuse("client_assertion lives longer than 5 minutes", claimed)
    for name, value in (("iat", iat), ("nbf", nbf)):
        if value is not None and (
            not isinstance(value, int | float) or value > t + ASSERTION_LEEWAY
        ):
            raise refuse(f"client_assertion {name} is in the future", claimed)
    if not isinstance(jti, str) or not _JTI_RE.fullmatch(jti):
        raise refuse("client_assertion jti malformed", claimed)
    expires_at = datetime.fromtimestamp(exp, now.tzinfo) + timedelta(seconds=ASSERTION_LEEWAY)
    # Namespaced by agent, so one agent cannot burn another agent's jtis.
    if not await store.remember_assertion_jti(f"{agent.id}:{jti}", expires_at):
        raise refuse("client_assertion replayed", claimed)
    return agent
