"""The SDK token verifier and the revocation cache, over a real store and real keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from broker.config import BrokerConfig
from broker.core.decision import Reason
from broker.core.delegation import derive_child_claims
from broker.core.identity import Agent, AgentStatus
from broker.core.revocation import RevocationKind
from broker.core.tokens import TokenClaims, TokenRejected, mint_token
from broker.keys import KeyRing, ensure_signing_key
from broker.revocations import RevocationCache
from broker.store import SqlStore
from broker.store.sql import open_store
from broker.store.testing import make_agent, migrated_store, sqlite_url, temporary_postgres_url
from broker.verifier import BrokerTokenVerifier

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
CONFIG = BrokerConfig()
ISS = CONFIG.server.base_url
AUD = CONFIG.server.resource_url


@dataclass
class Clock:
    at: datetime = NOW

    def now(self) -> datetime:
        return self.at


@dataclass
class Broker:
    store: SqlStore
    clock: Clock
    ring: KeyRing
    cache: RevocationCache
    verifier: BrokerTokenVerifier
    agents: dict[str, Agent]

    def mint(self, agent: str = "a", **over: Any) -> tuple[str, TokenClaims]:
        t = int(self.clock.now().timestamp())
        agent_id = self.agents[agent].id
        base: dict[str, Any] = {
            "iss": ISS,
            "aud": AUD,
            "sub": agent_id,
            "client_id": agent_id,
            "exp": t + 600,
            "iat": t,
            "nbf": t,
            "jti": secrets.token_urlsafe(16),
            "scope": "files:read",
            "task": {"id": f"task-{secrets.token_hex(4)}", "purpose": "test"},
        }
        base.update(over)
        claims = TokenClaims.model_validate(base)
        kid, key = self.ring.signing_key()
        return mint_token(claims, private_key=key, kid=kid), claims

    def delegate(
        self, parent: TokenClaims, parent_agent: str, child: str
    ) -> tuple[str, TokenClaims]:
        claims = derive_child_claims(
            parent,
            child_agent=self.agents[child],
            parent_agent=self.agents[parent_agent],
            requested_scopes=None,
            extra_details=None,
            requested_ttl=None,
            budget=None,
            now=self.clock.now(),
            jti=secrets.token_urlsafe(16),
            max_depth=3,
            purpose=None,
        )
        kid, key = self.ring.signing_key()
        return mint_token(claims, private_key=key, kid=kid), claims


async def _broker(store: SqlStore, keys_dir: Path) -> Broker:
    clock = Clock()
    agents: dict[str, Agent] = {}
    for name in ("a", "b", "c", "d"):
        agent = make_agent(f"agent-{name}", created_at=NOW - timedelta(days=1))
        await store.create_agent(agent, secret_hash=None)
        agents[name] = agent
    await ensure_signing_key(store, keys_dir, NOW)
    ring = await KeyRing.load(
        store, keys_dir, max_ttl=CONFIG.tokens.max_ttl, leeway=CONFIG.tokens.leeway
    )
    cache = RevocationCache(store, clock, staleness=CONFIG.store.revocation_staleness)
    await cache.refresh()
    verifier = BrokerTokenVerifier.from_config(CONFIG, ring, cache, clock, store)
    return Broker(store, clock, ring, cache, verifier, agents)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    async with migrated_store(sqlite_url(tmp_path)) as store:
        yield await _broker(store, tmp_path / "keys")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broker]:
    if request.param == "sqlite":
        async with migrated_store(sqlite_url(tmp_path)) as store:
            yield await _broker(store, tmp_path / "keys")
    else:
        async with temporary_postgres_url() as url, migrated_store(url) as store:
            yield await _broker(store, tmp_path / "keys")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


async def test_a_good_token_becomes_the_sdk_access_token(broker: Broker) -> None:
    raw, claims = broker.mint(scope="files:read files:write", budget=3)
    token = await broker.verifier.verify_token(raw)
    assert token is not None
    assert token.token == raw
    assert token.client_id == claims.client_id == broker.agents["a"].id
    assert token.subject == claims.sub
    assert token.scopes == ["files:read", "files:write"]
    assert token.expires_at == claims.exp
    assert token.resource == AUD
    assert token.claims is not None
    assert token.claims == claims.to_payload()
    assert token.claims["budget"] == 3


def _forged(broker: Broker, header: dict[str, Any], **claims_over: Any) -> str:
    _, claims = broker.mint()
    body = {**claims.to_payload(), **claims_over}
    kid, key = broker.ring.signing_key()
    signing_input = (
        f"{b64json({'alg': 'EdDSA', 'typ': 'at+jwt', 'kid': kid, **header})}.{b64json(body)}"
    )
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def _hs256_public(broker: Broker) -> str:
    _, claims = broker.mint()
    kid, key = broker.ring.signing_key()
    secret = key.public_key().public_bytes_raw()
    signing_input = (
        f"{b64json({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{b64json(claims.to_payload())}"
    )
    return (
        f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"
    )


def _rs256(broker: Broker) -> str:
    _, claims = broker.mint()
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    kid, _ = broker.ring.signing_key()
    return jwt.encode(
        claims.to_payload(), rsa, algorithm="RS256", headers={"typ": "at+jwt", "kid": kid}
    )


def _alg_none(broker: Broker) -> str:
    _, claims = broker.mint()
    kid, _ = broker.ring.signing_key()
    return (
        f"{b64json({'alg': 'none', 'typ': 'at+jwt', 'kid': kid})}.{b64json(claims.to_payload())}."
    )


def _tampered(broker: Broker) -> str:
    raw, claims = broker.mint()
    h, _, s = raw.split(".")
    return f"{h}.{b64json({**claims.to_payload(), 'scope': 'files:read admin'})}.{s}"


def _other_key(broker: Broker) -> str:
    _, claims = broker.mint()
    kid, _ = broker.ring.signing_key()
    return mint_token(claims, private_key=Ed25519PrivateKey.generate(), kid=kid)


def _missing(name: str) -> Callable[[Broker], str]:
    def make(broker: Broker) -> str:
        _, claims = broker.mint()
        body = claims.to_payload()
        del body[name]
        kid, key = broker.ring.signing_key()
        signing_input = f"{b64json({'alg': 'EdDSA', 'typ': 'at+jwt', 'kid': kid})}.{b64json(body)}"
        return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"

    return make


T = int(NOW.timestamp())
REFUSED: list[tuple[str, Callable[[Broker], str], str]] = [
    ("alg-none", _alg_none, "bad-algorithm"),
    ("hs256-with-public-key", _hs256_public, "bad-algorithm"),
    ("rs256", _rs256, "bad-algorithm"),
    ("unknown-kid", lambda b: _forged(b, {"kid": "not-a-key"}), "unknown-key"),
    ("path-like-kid", lambda b: _forged(b, {"kid": "../../keys/x"}), "unknown-key"),
    ("jku", lambda b: _forged(b, {"jku": "http://127.0.0.1:9/jwks.json"}), "embedded-key"),
    ("x5u", lambda b: _forged(b, {"x5u": "http://127.0.0.1:9/cert.pem"}), "embedded-key"),
    (
        "jwk",
        lambda b: _forged(b, {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AA"}}),
        "embedded-key",
    ),
    ("x5c", lambda b: _forged(b, {"x5c": ["MIIB"]}), "embedded-key"),
    ("typ-jwt", lambda b: _forged(b, {"typ": "JWT"}), "bad-type"),
    ("typ-missing", lambda b: _forged(b, {"typ": None}), "bad-type"),
    ("tampered-payload", _tampered, "bad-signature"),
    ("other-key", _other_key, "bad-signature"),
    ("expired", lambda b: _forged(b, {}, iat=T - 700, nbf=T - 700, exp=T - 31), "expired"),
    ("not-yet-valid", lambda b: _forged(b, {}, nbf=T + 31), "not-yet-valid"),
    ("too-long", lambda b: _forged(b, {}, exp=T + 3601), "lifetime-too-long"),
    ("wrong-aud", lambda b: _forged(b, {}, aud="http://127.0.0.1:9999/mcp"), "audience-mismatch"),
    ("wrong-iss", lambda b: _forged(b, {}, iss="http://evil.example"), "issuer-mismatch"),
    ("iss-trailing-slash", lambda b: _forged(b, {}, iss=ISS + "/"), "issuer-mismatch"),
    *[
        (f"missing-{n}", _missing(n), f"missing-claim:{n}")
        for n in ("exp", "aud", "sub", "jti", "task")
    ],
]


@pytest.mark.parametrize(("make", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_the_verifier_refuses_and_logs_only_the_reason_and_jti(
    broker: Broker, make: Callable[[Broker], str], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw = make(broker)
    caplog.set_level(logging.INFO, logger="broker.verifier")
    assert await broker.verifier.verify_token(raw) is None
    [record] = [r for r in caplog.records if r.name == "broker.verifier"]
    assert record.getMessage() == "token refused"
    assert record.__dict__["reason"] == reason
    assert all(raw not in str(v) for v in record.__dict__.values())
    with pytest.raises(TokenRejected) as info:
        await broker.verifier.authenticate(raw)
    assert info.value.reason == reason


async def test_verify_claims_refuses_with_the_reason_for_inspection(broker: Broker) -> None:
    raw, claims = broker.mint()
    assert broker.verifier.verify_claims(raw) == claims
    with pytest.raises(TokenRejected, match="bad-signature"):
        broker.verifier.verify_claims(_tampered(broker))


@pytest.mark.parametrize(
    ("status", "reason"),
    [(AgentStatus.DISABLED, "agent-disabled"), (AgentStatus.QUARANTINED, "agent-quarantined")],
    ids=["disabled", "quarantined"],
)
async def test_a_token_of_an_inactive_agent_is_refused(
    any_broker: Broker, status: AgentStatus, reason: str
) -> None:
    b = any_broker
    raw, _ = b.mint()
    assert await b.verifier.verify_token(raw) is not None
    await b.store.set_agent_status(b.agents["a"].id, status, reason="test", actor="admin", at=NOW)
    await b.cache.refresh()
    assert await b.verifier.verify_token(raw) is None
    with pytest.raises(TokenRejected) as info:
        await b.verifier.authenticate(raw)
    assert info.value.reason == reason


async def test_a_released_agent_gets_new_tokens_through_but_not_old_ones(broker: Broker) -> None:
    b = broker
    old, _ = b.mint()
    agent_id = b.agents["a"].id
    await b.store.set_agent_status(
        agent_id, AgentStatus.QUARANTINED, reason="odd", actor="detector:x", at=NOW
    )
    b.clock.at = NOW + timedelta(seconds=2)
    await b.store.set_agent_status(
        agent_id, AgentStatus.ACTIVE, reason="checked", actor="admin", at=b.clock.at
    )
    await b.cache.refresh()
    new, _ = b.mint()
    assert await b.verifier.verify_token(new) is not None
    with pytest.raises(TokenRejected, match="token-revoked"):
        await b.verifier.authenticate(old)


async def test_revocations_by_jti_parent_task_and_agent_cascade(any_broker: Broker) -> None:
    b = any_broker
    root, root_claims = b.mint()
    child, child_claims = b.delegate(root_claims, "a", "b")
    grandchild, _ = b.delegate(child_claims, "b", "c")
    other, other_claims = b.mint("d")
    for raw in (root, child, grandchild, other):
        assert await b.verifier.verify_token(raw) is not None

    async def refused(raw: str) -> str:
        with pytest.raises(TokenRejected) as info:
            await b.verifier.authenticate(raw)
        return info.value.reason

    # An agent revocation of the middle agent reaches the grandchild (issued to another agent).
    await b.store.revoke(RevocationKind.AGENT, b.agents["b"].id, reason="t", actor="admin", at=NOW)
    await b.cache.refresh()
    assert await refused(child) == "token-revoked"
    assert await refused(grandchild) == "token-revoked"
    assert await b.verifier.verify_token(root) is not None

    await b.store.revoke(RevocationKind.TOKEN, root_claims.jti, reason="t", actor="admin", at=NOW)
    await b.store.revoke(
        RevocationKind.TASK, other_claims.task.id, reason="t", actor="admin", at=NOW
    )
    await b.cache.refresh()
    assert await refused(root) == "token-revoked"
    assert await refused(other) == "token-revoked"


async def test_revoking_a_parent_refuses_its_child(broker: Broker) -> None:
    b = broker
    _, parent = b.mint()
    child, _ = b.delegate(parent, "a", "b")
    rev = await b.store.revoke(RevocationKind.TOKEN, parent.jti, reason="t", actor="a", at=NOW)
    b.cache.apply_local(rev)
    assert await b.verifier.verify_token(child) is None


async def test_a_local_revocation_takes_effect_before_any_refresh(broker: Broker) -> None:
    b = broker
    raw, claims = broker.mint()
    rev = await b.store.revoke(RevocationKind.TOKEN, claims.jti, reason="t", actor="a", at=NOW)
    b.cache.apply_local(rev)
    assert await b.verifier.verify_token(raw) is None
    b.cache.apply_status(b.agents["d"].id, AgentStatus.DISABLED, NOW)
    assert await b.verifier.verify_token(b.mint("d")[0]) is None


async def test_a_stale_revocation_view_refuses_every_token(broker: Broker) -> None:
    raw, _ = broker.mint()
    broker.clock.at = NOW + timedelta(seconds=CONFIG.store.revocation_staleness + 1)
    with pytest.raises(TokenRejected, match="store-unavailable"):
        await broker.verifier.authenticate(raw)
    await broker.cache.refresh()
    assert await broker.verifier.verify_token(raw) is not None


async def test_an_unreadable_store_leaves_the_view_to_go_stale(tmp_path: Path) -> None:
    store = open_store(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/broker.db")
    clock = Clock()
    cache = RevocationCache(store, clock, poll_interval=0.01)
    try:
        async with cache:
            assert cache.view.as_of is None
    finally:
        await store.aclose()


async def test_a_key_rotated_in_by_another_replica_is_picked_up_on_first_sight(
    broker: Broker,
) -> None:
    b = broker
    there = await KeyRing.load(b.store, b.ring.keys_dir, max_ttl=3600, leeway=30)
    await there.rotate(b.store, NOW)
    kid, key = there.signing_key()
    _, claims = b.mint()
    raw = mint_token(claims, private_key=key, kid=kid)
    assert await b.verifier.verify_token(raw) is not None
    # Unknown kids do not become a store query each: at most one reload per interval.
    assert await b.verifier.verify_token(_forged(b, {"kid": "unknown1"})) is None
    await b.store.aclose()
    assert await b.verifier.verify_token(_forged(b, {"kid": "unknown2"})) is None


async def test_the_poll_and_notify_bring_other_replicas_revocations(any_broker: Broker) -> None:
    b = any_broker
    raw, claims = b.mint()
    replica = RevocationCache(b.store, b.clock, poll_interval=60)
    async with replica:
        assert replica.check(claims, NOW) is None
        await b.store.revoke(RevocationKind.TOKEN, claims.jti, reason="t", actor="a", at=NOW)
        # A refresh already under way when the revocation committed may not see it; each
        # notify asks for one more, and the bound is what the design promises.
        with anyio.fail_after(5):
            while replica.check(claims, NOW) is not Reason.TOKEN_REVOKED:
                replica.notify()
                await replica.wait_refreshed()
    assert raw


async def test_an_unknown_kid_with_no_store_to_ask_is_refused(broker: Broker) -> None:
    verifier = BrokerTokenVerifier.from_config(CONFIG, broker.ring, broker.cache, broker.clock)
    with pytest.raises(TokenRejected, match="unknown-key"):
        await verifier.authenticate(_forged(broker, {"kid": "unknown1"}))


async def test_a_store_failure_while_reloading_keys_refuses_the_token(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = open_store(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/broker.db")
    try:
        verifier = BrokerTokenVerifier.from_config(
            CONFIG, broker.ring, broker.cache, broker.clock, dead
        )
        caplog.set_level(logging.INFO, logger="broker.verifier")
        assert await verifier.verify_token(_forged(broker, {"kid": "unknown1"})) is None
        [record] = [r for r in caplog.records if r.name == "broker.verifier"]
        assert record.__dict__["reason"] == "store-unavailable"
    finally:
        await dead.aclose()


# -- remembered tokens: what may change after the first verification is checked on every use ----


async def test_a_remembered_token_is_refused_once_revoked(broker: Broker) -> None:
    b = broker
    raw, claims = b.mint()
    assert await b.verifier.verify_token(raw) is not None
    assert b.verifier.verified.get(raw) is not None
    rev = await b.store.revoke(RevocationKind.TOKEN, claims.jti, reason="t", actor="a", at=NOW)
    b.cache.apply_local(rev)
    assert await b.verifier.verify_token(raw) is None


async def test_a_remembered_token_is_refused_once_expired_and_forgotten(broker: Broker) -> None:
    b = broker
    raw, claims = b.mint(exp=int(NOW.timestamp()) + 60)
    assert await b.verifier.verify_token(raw) is not None
    b.clock.at = NOW + timedelta(seconds=60 + CONFIG.tokens.leeway + 1)
    with pytest.raises(TokenRejected) as refused:
        b.verifier.verify_claims(raw)
    assert refused.value.reason == "expired"
    assert refused.value.jti == claims.jti
    assert b.verifier.verified.get(raw) is None


async def test_a_remembered_token_stops_when_its_key_stops_verifying(
    broker: Broker, tmp_path: Path
) -> None:
    b = broker
    raw, _ = b.mint()
    assert await b.verifier.verify_token(raw) is not None
    await b.ring.rotate(b.store, NOW)
    # Past the retired key's verification window (its tokens cannot outlive max_ttl + leeway),
    # the remembered token is refused like a fresh one would be, and forgotten.
    b.clock.at = NOW + timedelta(seconds=CONFIG.tokens.max_ttl + CONFIG.tokens.leeway + 1)
    with pytest.raises(TokenRejected) as refused:
        b.verifier.verify_claims(raw)
    assert refused.value.reason in {"unknown-key", "expired"}
    assert b.verifier.verified.get(raw) is None


async def test_a_refused_token_is_never_remembered(broker: Broker) -> None:
    b = broker
    tampered = _tampered(b)
    assert await b.verifier.verify_token(tampered) is None
    assert b.verifier.verified.get(tampered) is None
    assert len(b.verifier.verified) == 0


async def test_the_memory_of_verified_tokens_is_bounded(broker: Broker) -> None:
    b = broker
    b.verifier.verified = type(b.verifier.verified)(limit=3)
    tokens = [b.mint()[0] for _ in range(5)]
    for raw in tokens:
        assert await b.verifier.verify_token(raw) is not None
        assert len(b.verifier.verified) <= 3
    # A forgotten token still verifies: memory is an optimisation, never the authority.
    assert await b.verifier.verify_token(tokens[0]) is not None
