"""Signing keys: private keys in files under ``tokens.keys_dir``, public keys in the store.

Shell adapter. A private key lives in ``<keys_dir>/<kid>.pem`` (PKCS8 PEM, mode 0600, folder
0700); a key file that group or others can read is refused. The public half of every key is a JWK
in the store's ``signing_keys`` table, so every replica verifies tokens signed by a key another
replica rotated in. The kid is a random short url-safe id; a path is built from a kid only after
it matches `broker.core.tokens.KID_RE`.

Rotation: `rotate` writes a new key and retires the others. A retired key stops signing at
once and keeps verifying until ``retired_at + max_ttl + leeway``, after which no token it signed
can still be valid.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.core.tokens import KID_RE
from broker.errors import ConfigError
from broker.ports import SigningKeyRecord, Store

logger = logging.getLogger(__name__)

__all__ = [
    "KeyRing",
    "ensure_signing_key",
    "key_path",
    "load_private_key",
    "new_kid",
    "public_jwk",
    "public_key_from_jwk",
    "rotate",
]


def new_kid() -> str:
    """A random short url-safe key id (96 bits)."""
    return secrets.token_urlsafe(12)


def public_jwk(key: Ed25519PublicKey, kid: str) -> dict[str, Any]:
    """The RFC 8037 JWK of an Ed25519 public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}


def public_key_from_jwk(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    """The Ed25519 key of a JWK this broker wrote.

    Raises:
        ValueError: the JWK is not an Ed25519 ``OKP`` key.
    """
    x = jwk.get("x")
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or not isinstance(x, str):
        raise ValueError("expected an OKP Ed25519 JWK")
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except binascii.Error:
        raise ValueError("the JWK's x is not base64url") from None
    return Ed25519PublicKey.from_public_bytes(raw)


def key_path(keys_dir: Path, kid: str) -> Path:
    """``<keys_dir>/<kid>.pem``; only for a kid of the expected shape.

    Raises:
        ValueError: ``kid`` is not a short url-safe id (it would not be a plain file name).
    """
    if not KID_RE.fullmatch(kid):
        raise ValueError("a kid is 1-64 url-safe characters")
    return keys_dir / f"{kid}.pem"


def _write_private_key(keys_dir: Path, kid: str, key: Ed25519PrivateKey) -> None:
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = key_path(keys_dir, kid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(keys_dir: Path, kid: str) -> Ed25519PrivateKey:
    """The private key in ``<keys_dir>/<kid>.pem``.

    Raises:
        ConfigError: the file is missing, a symlink, readable by group or others, or not an
            Ed25519 PKCS8 PEM key.
    """
    path = key_path(keys_dir, kid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigError(
            f"signing key file {path} does not exist; tokens.keys_dir must hold the private "
            "key of the active signing key (share it between replicas, or run `broker keys rotate`)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"signing key file {path} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"signing key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"signing key file {path} is readable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); expected 0600: run `chmod 600 {path}`"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"signing key file {path} is not an unencrypted PKCS8 PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key file {path} holds a key that is not Ed25519")
    return key


def _active(records: Sequence[SigningKeyRecord]) -> SigningKeyRecord | None:
    live = [r for r in records if r.retired_at is None]
    return max(live, key=lambda r: (r.created_at, r.kid)) if live else None


async def _create_key(store: Store, keys_dir: Path, now: datetime) -> str:
    kid = new_kid()
    key = Ed25519PrivateKey.generate()
    _write_private_key(keys_dir, kid, key)
    await store.add_signing_key(kid, public_jwk(key.public_key(), kid), now)
    logger.info("signing key created", extra={"kid": kid})
    return kid


async def ensure_signing_key(store: Store, keys_dir: Path, now: datetime) -> str:
    """The active signing key's kid, creating the first key when there is none (`broker init`).

    Raises:
        ConfigError: the active key's file is missing or unsafe.
    """
    active = _active(await store.list_signing_keys())
    if active is None:
        return await _create_key(store, keys_dir, now)
    load_private_key(keys_dir, active.kid)
    return active.kid


async def rotate(store: Store, keys_dir: Path, now: datetime) -> str:
    """Create a new active signing key, retire every other one at ``now``; return the new kid.

    The new key is stored before the old ones are retired, so there is always a key to sign with.
    """
    kid = await _create_key(store, keys_dir, now)
    for record in await store.list_signing_keys():
        if record.kid != kid and record.retired_at is None:
            await store.retire_signing_key(record.kid, now)
            logger.info("signing key retired", extra={"kid": record.kid})
    return kid


class KeyRing:
    """The keys this process signs and verifies with, refreshed from the store.

    Verification uses only the public JWKs from the store; the private key is read from
    ``keys_dir`` when this process first signs with a key, and kept in memory.
    """

    def __init__(self, keys_dir: Path, *, max_ttl: int, leeway: int) -> None:
        self.keys_dir = keys_dir
        self.max_ttl = max_ttl
        self.leeway = leeway
        self._records: tuple[SigningKeyRecord, ...] = ()
        self._public: dict[str, Ed25519PublicKey] = {}
        self._private: dict[str, Ed25519PrivateKey] = {}

    @classmethod
    async def load(cls, store: Store, keys_dir: Path, *, max_ttl: int, leeway: int) -> KeyRing:
        """A key ring filled from the store (no private key is read until `signing_key`)."""
        ring = cls(keys_dir, max_ttl=max_ttl, leeway=leeway)
        await ring.refresh(store)
        return ring

    async def refresh(self, store: Store) -> None:
        """Reload the public keys (and which one is active) from the store.

        A record whose kid or JWK is malformed is skipped and logged, never trusted.
        """
        records: list[SigningKeyRecord] = []
        public: dict[str, Ed25519PublicKey] = {}
        for record in await store.list_signing_keys():
            try:
                if not KID_RE.fullmatch(record.kid):
                    raise ValueError("bad kid")
                public[record.kid] = public_key_from_jwk(record.public_jwk)
            except ValueError:
                logger.warning("signing key record skipped", extra={"kid": record.kid[:64]})
                continue
            records.append(record)
        self._records = tuple(records)
        self._public = public

    async def rotate(self, store: Store, now: datetime) -> str:
        """`rotate` then `refresh`; returns the new kid."""
        kid = await rotate(store, self.keys_dir, now)
        await self.refresh(store)
        return kid

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active key's kid and private key.

        Raises:
            ConfigError: there is no active key, or its file is missing or unsafe.
        """
        active = _active(self._records)
        if active is None:
            raise ConfigError("no active signing key in the store: run `broker init`")
        key = self._private.get(active.kid)
        if key is None:
            key = load_private_key(self.keys_dir, active.kid)
            if key.public_key().public_bytes_raw() != self._public[active.kid].public_bytes_raw():
                raise ConfigError(
                    f"signing key file {key_path(self.keys_dir, active.kid)} does not match "
                    "the public key the store holds for it"
                )
            self._private[active.kid] = key
        return active.kid, key

    def _verifying(self, record: SigningKeyRecord, now: datetime) -> bool:
        if record.retired_at is None:
            return True
        return now < record.retired_at + timedelta(seconds=self.max_ttl + self.leeway)

    def verification_keys(self, now: datetime) -> Mapping[str, Ed25519PublicKey]:
        """Every key a token valid at ``now`` may be signed with.

        A retired key verifies until ``retired_at + max_ttl + leeway``: no token it signed can
        outlive that.
        """
        return {r.kid: self._public[r.kid] for r in self._records if self._verifying(r, now)}

    def jwks(self, now: datetime | None = None) -> dict[str, Any]:
        """``{"keys": [...]}``: public JWKs (OKP, Ed25519) of the keys still verifying at ``now``
        (every known key when ``now`` is None)."""
        return {
            "keys": [
                public_jwk(self._public[r.kid], r.kid)
                for r in self._records
                if now is None or self._verifying(r, now)
            ]
        }


def ensure_recording_key(ref: str, base_dir: Path) -> None:
    """Create the recording HMAC key file ``ref`` names (``file:PATH``) unless it exists.

    The key is 32 random bytes written as hex, mode 0600 in a 0700 folder. An ``env:`` reference
    is the operator's to provide and is left alone.
    """
    if not ref.startswith("file:"):
        return
    path = Path(ref[5:])
    path = path if path.is_absolute() else base_dir / path
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another worker starting at the same moment wrote it first
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32) + "\n")
