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

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.ports import Store

__all__ = ["KeyRing", "ensure_signing_key", "rotate"]


async def ensure_signing_key(store: Store, keys_dir: Path, now: datetime) -> str:
    """The active signing key's kid, creating the first key when there is none (`broker init`).

    Raises:
        ConfigError: ``keys_dir`` or a key file is unsafe (readable by others) or unreadable.
    """
    raise NotImplementedError


async def rotate(store: Store, keys_dir: Path, now: datetime) -> str:
    """Create a new active signing key, retire every other one at ``now``; return the new kid."""
    raise NotImplementedError


class KeyRing:
    """The keys this process signs and verifies with, refreshed from the store."""

    def __init__(self, keys_dir: Path, *, max_ttl: int, leeway: int) -> None:
        self.keys_dir = keys_dir
        self.max_ttl = max_ttl
        self.leeway = leeway

    @classmethod
    async def load(cls, store: Store, keys_dir: Path, *, max_ttl: int, leeway: int) -> KeyRing:
        """A key ring filled from the store (no private key is read until `signing_key`)."""
        raise NotImplementedError

    async def refresh(self, store: Store) -> None:
        """Reload the public keys (and which one is active) from the store."""
        raise NotImplementedError

    async def rotate(self, store: Store, now: datetime) -> str:
        """`rotate` then `refresh`; returns the new kid."""
        raise NotImplementedError

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active key's kid and private key.

        Raises:
            ConfigError: there is no active key, or its file is missing or unsafe.
        """
        raise NotImplementedError

    def verification_keys(self, now: datetime) -> Mapping[str, Ed25519PublicKey]:
        """Every key a token valid at ``now`` may be signed with."""
        raise NotImplementedError

    def jwks(self) -> dict[str, Any]:
        """``{"keys": [...]}``: public JWKs (OKP, Ed25519) of the keys still verifying."""
        raise NotImplementedError
