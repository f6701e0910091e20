"""Signing keys: files 0600 under keys_dir, public JWKs in a real store, rotation."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from broker.core.tokens import TokenClaims, TokenRejected, mint_token, verify_token
from broker.errors import ConfigError
from broker.keys import (
    KeyRing,
    ensure_signing_key,
    key_path,
    load_private_key,
    public_jwk,
    public_key_from_jwk,
    rotate,
)
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url, temporary_postgres_url

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
ISS = "http://127.0.0.1:8765"
AUD = f"{ISS}/mcp"
MAX_TTL, LEEWAY = 3600, 30


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    if request.param == "sqlite":
        async with migrated_store(sqlite_url(tmp_path)) as s:
            yield s
    else:
        async with temporary_postgres_url() as url, migrated_store(url) as s:
            yield s


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def claims(now: datetime = NOW, ttl: int = 600, **over: Any) -> TokenClaims:
    t = int(now.timestamp())
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "agent-a",
        "client_id": "agent-a",
        "exp": t + ttl,
        "iat": t,
        "nbf": t,
        "jti": "j" * 22,
        "scope": "files:read",
        "task": {"id": "task-1"},
    }
    base.update(over)
    return TokenClaims.model_validate(base)


def verify(raw: str, ring: KeyRing, now: datetime) -> TokenClaims:
    return verify_token(
        raw,
        keys=ring.verification_keys(now),
        audience=AUD,
        issuer=ISS,
        now=now,
        leeway=LEEWAY,
        max_lifetime=MAX_TTL,
    )


async def ring_of(store: SqlStore, keys_dir: Path) -> KeyRing:
    return await KeyRing.load(store, keys_dir, max_ttl=MAX_TTL, leeway=LEEWAY)


async def test_init_creates_one_key_file_0600_in_a_0700_folder_and_its_jwk_in_the_store(
    store: SqlStore, keys_dir: Path
) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    path = keys_dir / f"{kid}.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys_dir).st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert await ensure_signing_key(store, keys_dir, NOW + timedelta(hours=1)) == kid
    [record] = await store.list_signing_keys()
    assert record.kid == kid
    assert record.retired_at is None
    private = load_private_key(keys_dir, kid)
    assert record.public_jwk == public_jwk(private.public_key(), kid)


async def test_the_jwks_publishes_public_okp_keys_only(store: SqlStore, keys_dir: Path) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    ring = await ring_of(store, keys_dir)
    [jwk] = ring.jwks()["keys"]
    assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["crv"], jwk["kid"], jwk["use"], jwk["alg"]) == (
        "OKP",
        "Ed25519",
        kid,
        "sig",
        "EdDSA",
    )
    assert ring.signing_key()[0] == kid
    assert (
        public_key_from_jwk(jwk).public_bytes_raw()
        == ring.signing_key()[1].public_key().public_bytes_raw()
    )


async def test_a_key_file_readable_by_others_is_refused_with_the_fix(
    store: SqlStore, keys_dir: Path
) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    path = keys_dir / f"{kid}.pem"
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=r"readable by group or others \(mode 0640\).*chmod 600"):
        await ensure_signing_key(store, keys_dir, NOW)
    ring = await ring_of(store, keys_dir)
    with pytest.raises(ConfigError, match="readable by group or others"):
        ring.signing_key()


async def test_a_symlinked_key_file_is_refused(store: SqlStore, keys_dir: Path) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    path = keys_dir / f"{kid}.pem"
    real = keys_dir / "elsewhere.pem"
    path.rename(real)
    os.symlink(real, path)
    with pytest.raises(ConfigError, match="cannot be opened"):
        load_private_key(keys_dir, kid)


async def test_a_missing_or_foreign_key_file_is_refused(store: SqlStore, keys_dir: Path) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    path = keys_dir / f"{kid}.pem"
    path.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        (await ring_of(store, keys_dir)).signing_key()
    other = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, other.private_bytes_raw())
    os.close(fd)
    with pytest.raises(ConfigError, match="not an unencrypted PKCS8 PEM"):
        load_private_key(keys_dir, kid)


async def test_a_key_file_that_does_not_match_the_stored_public_key_is_refused(
    store: SqlStore, keys_dir: Path
) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    path = keys_dir / f"{kid}.pem"
    path.unlink()
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(ConfigError, match="does not match"):
        (await ring_of(store, keys_dir)).signing_key()


def test_no_path_is_ever_built_from_a_path_like_kid(keys_dir: Path) -> None:
    for kid in ["../../etc/passwd", "a/b", "", "x" * 65, "k.pem"]:
        with pytest.raises(ValueError, match="kid"):
            key_path(keys_dir, kid)


async def test_a_malformed_key_record_in_the_store_is_skipped(
    store: SqlStore, keys_dir: Path
) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    await store.add_signing_key("../../keys/x", {"kty": "OKP", "crv": "Ed25519", "x": "AA"}, NOW)
    await store.add_signing_key("rsa-key", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}, NOW)
    await store.add_signing_key("bad-x", {"kty": "OKP", "crv": "Ed25519", "x": "!!"}, NOW)
    ring = await ring_of(store, keys_dir)
    assert set(ring.verification_keys(NOW)) == {kid}


async def test_no_key_at_all_cannot_sign(store: SqlStore, keys_dir: Path) -> None:
    ring = await ring_of(store, keys_dir)
    with pytest.raises(ConfigError, match="broker init"):
        ring.signing_key()
    assert ring.jwks() == {"keys": []}


async def test_after_rotation_old_tokens_verify_until_expiry_and_new_ones_use_the_new_kid(
    store: SqlStore, keys_dir: Path
) -> None:
    old_kid = await ensure_signing_key(store, keys_dir, NOW)
    ring = await ring_of(store, keys_dir)
    kid, key = ring.signing_key()
    old_token = mint_token(claims(ttl=MAX_TTL), private_key=key, kid=kid)

    rotated_at = NOW + timedelta(seconds=60)
    new_kid = await ring.rotate(store, rotated_at)
    assert new_kid != old_kid
    kid, key = ring.signing_key()
    assert kid == new_kid
    new_token = mint_token(claims(rotated_at), private_key=key, kid=kid)
    assert verify(new_token, ring, rotated_at).jti == "j" * 22

    last_moment = NOW + timedelta(seconds=MAX_TTL + LEEWAY - 1)
    assert verify(old_token, ring, last_moment).iat == T
    assert {j["kid"] for j in ring.jwks(last_moment)["keys"]} == {old_kid, new_kid}

    gone = rotated_at + timedelta(seconds=MAX_TTL + LEEWAY)
    assert set(ring.verification_keys(gone)) == {new_kid}
    assert {j["kid"] for j in ring.jwks(gone)["keys"]} == {new_kid}
    with pytest.raises(TokenRejected) as info:
        verify(old_token, ring, gone)
    assert info.value.reason == "unknown-key"


async def test_a_replica_verifies_with_a_key_another_replica_rotated_in(
    store: SqlStore, keys_dir: Path
) -> None:
    await ensure_signing_key(store, keys_dir, NOW)
    here = await ring_of(store, keys_dir)
    there = await ring_of(store, keys_dir)
    await rotate(store, keys_dir, NOW)
    assert len(await store.list_signing_keys()) == 2
    await there.refresh(store)
    kid, key = there.signing_key()
    token = mint_token(claims(), private_key=key, kid=kid)
    with pytest.raises(TokenRejected):
        verify(token, here, NOW)
    await here.refresh(store)
    assert verify(token, here, NOW).jti == "j" * 22


async def test_a_key_path_that_is_a_folder_or_an_rsa_key_is_refused(
    store: SqlStore, keys_dir: Path
) -> None:
    kid = await ensure_signing_key(store, keys_dir, NOW)
    path = keys_dir / f"{kid}.pem"
    path.unlink()
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_private_key(keys_dir, kid)
    path.rmdir()
    pem = generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(ConfigError, match="not Ed25519"):
        load_private_key(keys_dir, kid)


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "OKP", "crv": "Ed25519", "x": "A"},
        {"kty": "OKP", "crv": "Ed448", "x": "AA"},
        {"kty": "OKP", "crv": "Ed25519"},
    ],
    ids=["bad-base64", "other-curve", "no-x"],
)
def test_only_ed25519_jwks_become_keys(jwk: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="JWK"):
        public_key_from_jwk(jwk)
