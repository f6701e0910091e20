"""Agent registration and client authentication against a real SQLite store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key as rsa_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import OKPAlgorithm

import broker.agents as agents_mod
from broker.agents import (
    CLIENT_ASSERTION_TYPE,
    authenticate_client,
    parse_public_key,
    register_agent,
)
from broker.errors import ClientAuthFailed, OAuthError
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url, temporary_postgres_url

ISSUER = "http://127.0.0.1:8765"
TOKEN_URL = ISSUER + "/oauth/token"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with migrated_store(sqlite_url(tmp_path)) as s:
        yield s


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"authorization": f"Basic {raw}"}


def ed25519_jwk(key: Ed25519PrivateKey) -> dict[str, Any]:
    return OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)


def assertion(
    key: Any,
    client_id: str,
    now: datetime,
    *,
    alg: str = "EdDSA",
    aud: str = ISSUER,
    lifetime: int = 60,
    jti: str = "jti-1",
    **extra: Any,
) -> str:
    t = int(now.timestamp())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "iat": t, "exp": t + lifetime}
    claims["jti"] = jti
    claims.update(extra)
    return jwt.encode(claims, key, algorithm=alg)


def jwt_form(token: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": token,
    }


async def auth(store: SqlStore, form: dict[str, str], headers: dict[str, str], now: datetime):
    return await authenticate_client(
        store, form, headers, token_endpoint_url=TOKEN_URL, issuer=ISSUER, now=now
    )


async def test_registration_returns_the_secret_once_and_stores_only_an_argon2id_hash(
    store: SqlStore, now: datetime
) -> None:
    agent, secret = await register_agent(
        store, name="ci-bot", owner="ops", scopes=["files:read"], max_ttl=600, now=now
    )
    assert secret is not None
    assert agent.id.startswith("agt_")
    assert agent.auth_method == "client_secret"
    stored = await store.agent_secret_hash(agent.id)
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert secret not in stored
    assert (await store.get_agent(agent.id)).allowed_scopes == ("files:read",)


@pytest.mark.parametrize(
    ("name", "scopes", "max_ttl"),
    [
        ("Bad Name", ["a"], 600),
        ("ok", [], 600),
        ("ok", ["has space"], 600),
        ("ok", ["a", "a"], 600),
        ("ok", ["a"], 5),
        ("ok", ["a"], 10**6),
    ],
    ids=["bad-name", "no-scopes", "bad-scope", "dup-scope", "ttl-too-short", "ttl-too-long"],
)
async def test_registration_refuses_bad_values(
    store: SqlStore, now: datetime, name: str, scopes: list[str], max_ttl: int
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        await register_agent(store, name=name, owner="ops", scopes=scopes, max_ttl=max_ttl, now=now)


async def test_a_private_key_jwt_agent_gets_no_secret(store: SqlStore, now: datetime) -> None:
    jwk = ed25519_jwk(Ed25519PrivateKey.generate())
    agent, secret = await register_agent(
        store, name="signer", owner="ops", scopes=["a"], max_ttl=600, public_jwk=jwk, now=now
    )
    assert secret is None
    assert agent.auth_method == "private_key_jwt"
    assert await store.agent_secret_hash(agent.id) is None


async def test_registering_a_private_key_is_refused(store: SqlStore, now: datetime) -> None:
    jwk = OKPAlgorithm.to_jwk(Ed25519PrivateKey.generate(), as_dict=True)
    with pytest.raises(ValueError, match="PUBLIC"):
        await register_agent(
            store, name="signer", owner="ops", scopes=["a"], max_ttl=600, public_jwk=jwk, now=now
        )


def test_public_keys_are_read_from_pem_or_jwk_and_only_ed25519_or_p256() -> None:
    ed = Ed25519PrivateKey.generate().public_key()
    pem = ed.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    assert parse_public_key(pem)["crv"] == "Ed25519"
    ec = generate_private_key(SECP256R1()).public_key()
    ec_pem = ec.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    assert parse_public_key(ec_pem)["crv"] == "P-256"
    assert parse_public_key(json.dumps(OKPAlgorithm.to_jwk(ed, as_dict=True)))["kty"] == "OKP"
    rsa = rsa_key(public_exponent=65537, key_size=2048).public_key()
    rsa_pem = rsa.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="Ed25519"):
        parse_public_key(rsa_pem)
    with pytest.raises(ValueError, match="PUBLIC"):
        parse_public_key("-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----")
    with pytest.raises(ValueError, match="neither"):
        parse_public_key("not a key")


async def test_client_secret_basic_and_post_authenticate(store: SqlStore, now: datetime) -> None:
    agent, secret = await register_agent(
        store, name="ci-bot", owner="ops", scopes=["a"], max_ttl=600, now=now
    )
    assert secret is not None
    got = await auth(store, {"grant_type": "client_credentials"}, basic(agent.id, secret), now)
    assert got.id == agent.id
    form = {"grant_type": "client_credentials", "client_id": agent.id, "client_secret": secret}
    assert (await auth(store, form, {}, now)).id == agent.id


async def test_a_wrong_secret_and_an_unknown_client_fail_alike(
    store: SqlStore, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, secret = await register_agent(
        store, name="ci-bot", owner="ops", scopes=["a"], max_ttl=600, now=now
    )
    assert secret is not None
    verified: list[str] = []
    real = agents_mod.verify_secret

    def counting(stored: str, candidate: str) -> bool:
        verified.append(stored)
        return real(stored, candidate)

    monkeypatch.setattr(agents_mod, "verify_secret", counting)
    with pytest.raises(ClientAuthFailed) as wrong:
        await auth(store, {}, basic(agent.id, secret + "x"), now)
    with pytest.raises(ClientAuthFailed) as unknown:
        await auth(store, {}, basic("agt_nobody", secret), now)
    assert str(wrong.value) == str(unknown.value) == "client authentication failed"
    # The unknown client still cost one argon2 verification (no timing oracle).
    assert len(verified) == 2
    assert all(h.startswith("$argon2id$") for h in verified)


async def test_no_credentials_or_malformed_basic_fail(store: SqlStore, now: datetime) -> None:
    with pytest.raises(ClientAuthFailed):
        await auth(store, {"client_id": "agt_x"}, {}, now)
    with pytest.raises(ClientAuthFailed):
        await auth(store, {}, {"authorization": "Basic !!!"}, now)


async def test_two_authentication_methods_at_once_are_an_invalid_request(
    store: SqlStore, now: datetime
) -> None:
    agent, secret = await register_agent(
        store, name="ci-bot", owner="ops", scopes=["a"], max_ttl=600, now=now
    )
    assert secret is not None
    with pytest.raises(OAuthError) as err:
        await auth(
            store, {"client_id": agent.id, "client_secret": secret}, basic(agent.id, secret), now
        )
    assert err.value.error == "invalid_request"


async def test_private_key_jwt_authenticates_once_per_jti(store: SqlStore, now: datetime) -> None:
    key = Ed25519PrivateKey.generate()
    agent, _ = await register_agent(
        store, name="signer", owner="ops", scopes=["a"], max_ttl=600,
        public_jwk=ed25519_jwk(key), now=now,
    )  # fmt: skip
    token = assertion(key, agent.id, now)
    assert (await auth(store, jwt_form(token), {}, now)).id == agent.id
    with pytest.raises(ClientAuthFailed):
        await auth(store, jwt_form(token), {}, now)
    other = assertion(key, agent.id, now, jti="jti-2", aud=TOKEN_URL)
    assert (await auth(store, jwt_form(other), {}, now)).id == agent.id
    # The SDK renders the issuer with a trailing slash as the assertion's audience.
    slash = assertion(key, agent.id, now, jti="jti-3", aud=ISSUER + "/")
    assert (await auth(store, jwt_form(slash), {}, now)).id == agent.id


async def test_an_es256_key_signs_es256_assertions(store: SqlStore, now: datetime) -> None:
    key = generate_private_key(SECP256R1())
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    agent, _ = await register_agent(
        store, name="signer", owner="ops", scopes=["a"], max_ttl=600,
        public_jwk=parse_public_key(pem), now=now,
    )  # fmt: skip
    token = assertion(key, agent.id, now, alg="ES256")
    assert (await auth(store, jwt_form(token), {}, now)).id == agent.id


def _seg(v: dict[str, Any] | bytes) -> str:
    raw = v if isinstance(v, bytes) else json.dumps(v).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any], alg: str) -> str:
    return f"{_seg({'alg': alg, 'typ': 'JWT'})}.{_seg(claims)}."


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """HS256 keyed with the public key: the classic algorithm-confusion forgery."""
    signing_input = f"{_seg({'alg': 'HS256', 'typ': 'JWT'})}.{_seg(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_seg(mac)}"


@pytest.mark.parametrize(
    "case",
    [
        "alg-none",
        "hs256-with-public-key",
        "es256-for-an-ed25519-key",
        "wrong-audience",
        "expired",
        "lives-too-long",
        "issued-in-future",
        "iss-is-not-the-client",
        "no-jti",
        "signed-by-another-key",
        "embedded-jwk",
        "wrong-assertion-type",
        "client-id-differs",
    ],
)
async def test_bad_client_assertions_are_refused(store: SqlStore, now: datetime, case: str) -> None:
    key = Ed25519PrivateKey.generate()
    jwk = ed25519_jwk(key)
    agent, _ = await register_agent(
        store, name="signer", owner="ops", scopes=["a"], max_ttl=600, public_jwk=jwk, now=now
    )
    t = int(now.timestamp())
    base = {"iss": agent.id, "sub": agent.id, "aud": ISSUER, "iat": t, "exp": t + 60, "jti": "j"}
    form_extra: dict[str, str] = {}
    match case:
        case "alg-none":
            token = _unsigned(base, "none")
        case "hs256-with-public-key":
            token = _hs256(base, json.dumps(jwk).encode())
        case "es256-for-an-ed25519-key":
            token = jwt.encode(base, generate_private_key(SECP256R1()), algorithm="ES256")
        case "wrong-audience":
            token = assertion(key, agent.id, now, aud="http://elsewhere")
        case "expired":
            token = assertion(key, agent.id, now - timedelta(minutes=10))
        case "lives-too-long":
            token = assertion(key, agent.id, now, lifetime=3600)
        case "issued-in-future":
            token = assertion(key, agent.id, now, iat=t + 3000, lifetime=60)
        case "iss-is-not-the-client":
            token = jwt.encode({**base, "iss": "someone"}, key, algorithm="EdDSA")
        case "no-jti":
            token = jwt.encode({k: v for k, v in base.items() if k != "jti"}, key, "EdDSA")
        case "signed-by-another-key":
            token = assertion(Ed25519PrivateKey.generate(), agent.id, now)
        case "embedded-jwk":
            token = jwt.encode(base, key, algorithm="EdDSA", headers={"jwk": jwk})
        case "wrong-assertion-type":
            token = assertion(key, agent.id, now)
            form_extra["client_assertion_type"] = "urn:example:other"
        case _:
            token = assertion(key, agent.id, now)
            form_extra["client_id"] = "agt_other"
    with pytest.raises(ClientAuthFailed):
        await auth(store, {**jwt_form(token), **form_extra}, {}, now)


async def test_methods_are_bound_to_the_registration(store: SqlStore, now: datetime) -> None:
    key = Ed25519PrivateKey.generate()
    signer, _ = await register_agent(
        store, name="signer", owner="ops", scopes=["a"], max_ttl=600,
        public_jwk=ed25519_jwk(key), now=now,
    )  # fmt: skip
    secret_agent, secret = await register_agent(
        store, name="plain", owner="ops", scopes=["a"], max_ttl=600, now=now
    )
    assert secret is not None
    with pytest.raises(ClientAuthFailed):
        await auth(store, {}, basic(signer.id, "anything"), now)
    with pytest.raises(ClientAuthFailed):
        await auth(store, jwt_form(assertion(key, secret_agent.id, now)), {}, now)


@pytest.mark.postgres
async def test_an_assertion_replayed_to_another_replica_is_refused_on_postgres(
    now: datetime,
) -> None:
    # Two stores on one PostgreSQL database stand for two broker replicas.
    async with (
        temporary_postgres_url() as url,
        migrated_store(url) as first,
        migrated_store(url) as second,
    ):
        key = Ed25519PrivateKey.generate()
        agent, _ = await register_agent(
            first, name="signer", owner="ops", scopes=["a"], max_ttl=600,
            public_jwk=ed25519_jwk(key), now=now,
        )  # fmt: skip
        token = assertion(key, agent.id, now)
        assert (await auth(first, jwt_form(token), {}, now)).id == agent.id
        with pytest.raises(ClientAuthFailed):
            await auth(second, jwt_form(token), {}, now)
