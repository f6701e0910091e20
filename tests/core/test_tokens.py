"""Capability tokens: minting, and one refusal reason per failed check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from pydantic import ValidationError

from broker.core.tokens import (
    REQUIRED_CLAIMS,
    ActorClaim,
    DelegationClaim,
    TaskClaim,
    TokenClaims,
    TokenRejected,
    mint_token,
    unverified_header,
    verify_token,
)

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
ISS = "http://127.0.0.1:8765"
AUD = "http://127.0.0.1:8765/mcp"
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}
JTI = "j" * 22
PARENT_JTI = "p" * 22


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def claims(**over: Any) -> TokenClaims:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "agent-a",
        "client_id": "agent-a",
        "exp": T + 600,
        "iat": T,
        "nbf": T,
        "jti": JTI,
        "scope": "files:read files:write",
        "task": {"id": "task-1", "purpose": "summarise the logs"},
    }
    base.update(over)
    return TokenClaims.model_validate(base)


def payload(**over: Any) -> dict[str, Any]:
    out = claims().to_payload()
    for k, v in over.items():
        if v is _DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


_DROP = object()


def forge(header: dict[str, Any], body: dict[str, Any], key: Ed25519PrivateKey = KEY) -> str:
    """A token with exactly this header and payload, Ed25519-signed (no claim checks)."""
    signing_input = f"{b64json(header)}.{b64json(body)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


HEADER = {"alg": "EdDSA", "typ": "at+jwt", "kid": "k1"}


def verify(raw: str, *, now: datetime = NOW, **over: Any) -> TokenClaims:
    kw: dict[str, Any] = {
        "keys": KEYS,
        "audience": AUD,
        "issuer": ISS,
        "now": now,
        "leeway": 30,
        "max_lifetime": 3600,
    }
    kw.update(over)
    return verify_token(raw, **kw)


def reason_of(fn: Callable[[], object]) -> str:
    with pytest.raises(TokenRejected) as info:
        fn()
    return info.value.reason


def test_a_minted_token_verifies_to_the_same_claims() -> None:
    c = claims(
        authorization_details=[{"type": "tool_call", "connector": "files", "args": {"x": None}}],
        budget=5,
    )
    raw = mint_token(c, private_key=KEY, kid="k1")
    assert verify(raw) == c
    assert unverified_header(raw) == HEADER


def test_the_minted_header_and_payload_are_exactly_the_agreed_format() -> None:
    c = claims(
        sub="root",
        client_id="child",
        act={"sub": "child"},
        delegation={"parent": PARENT_JTI, "chain": [PARENT_JTI], "depth": 1},
    )
    raw = mint_token(c, private_key=KEY, kid="k1")
    body = json.loads(base64.urlsafe_b64decode(raw.split(".")[1] + "=="))
    assert body == {
        "iss": ISS,
        "aud": AUD,
        "sub": "root",
        "client_id": "child",
        "exp": T + 600,
        "iat": T,
        "nbf": T,
        "jti": JTI,
        "scope": "files:read files:write",
        "task": {"id": "task-1", "purpose": "summarise the logs"},
        "act": {"sub": "child"},
        "delegation": {"parent": PARENT_JTI, "chain": [PARENT_JTI], "depth": 1},
    }


def test_minting_refuses_a_path_like_kid() -> None:
    with pytest.raises(ValueError, match="kid"):
        mint_token(claims(), private_key=KEY, kid="../x")


def test_claim_helpers_name_scopes_agents_and_ancestors() -> None:
    c = claims(
        sub="root",
        client_id="c",
        act={"sub": "c", "act": {"sub": "b"}},
        delegation={"parent": "q" * 22, "chain": [PARENT_JTI, "q" * 22], "depth": 2},
        scope="",
    )
    assert c.scopes == ()
    assert c.agents_in_chain == ("root", "b", "c")
    assert c.ancestor_jtis == (PARENT_JTI, "q" * 22)
    assert c.depth == 2
    assert c.issued_at == NOW
    assert c.expires_at == NOW + timedelta(seconds=600)
    root = claims()
    assert root.scopes == ("files:read", "files:write")
    assert root.agents_in_chain == ("agent-a",)
    assert root.ancestor_jtis == ()
    assert root.depth == 0


def _hs256_with_public_key() -> str:
    pub = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signing_input = (
        f"{b64json({'alg': 'HS256', 'typ': 'at+jwt', 'kid': 'k1'})}.{b64json(payload())}"
    )
    mac = hmac.new(pub, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _rs256() -> str:
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(payload(), rsa, algorithm="RS256", headers={"typ": "at+jwt", "kid": "k1"})


def _alg_none() -> str:
    return f"{b64json({'alg': 'none', 'typ': 'at+jwt', 'kid': 'k1'})}.{b64json(payload())}.AA"


def _tampered() -> str:
    h, _, s = mint_token(claims(), private_key=KEY, kid="k1").split(".")
    return f"{h}.{b64json(payload(scope='files:read files:write admin'))}.{s}"


def _duplicate_key_payload() -> str:
    body = b64(b'{"iss": "x", "iss": "' + ISS.encode() + b'"}')
    signing_input = f"{b64json(HEADER)}.{body}"
    return f"{signing_input}.{b64(KEY.sign(signing_input.encode()))}"


def _noncanonical_signature() -> str:
    raw = mint_token(claims(), private_key=KEY, kid="k1")
    h, p, s = raw.split(".")
    # The last base64url character of a 64-byte value carries 2 unused bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(s[-1])
    return f"{h}.{p}.{s[:-1]}{alphabet[last ^ 1]}"


def _header(**over: Any) -> str:
    h = dict(HEADER)
    for k, v in over.items():
        if v is _DROP:
            h.pop(k)
        else:
            h[k] = v
    return forge(h, payload())


REFUSALS: list[tuple[str, Callable[[], str], str]] = [
    ("empty", lambda: "", "malformed"),
    ("two-segments", lambda: "a.b", "malformed"),
    ("padding", lambda: mint_token(claims(), private_key=KEY, kid="k1") + "=", "malformed"),
    ("too-long", lambda: "a" * 20000 + ".b.c", "malformed"),
    ("header-not-json", lambda: f"{b64(b'{')}.{b64json(payload())}.AA", "malformed"),
    ("header-not-object", lambda: f"{b64json([1])}.{b64json(payload())}.AA", "malformed"),
    ("header-crit", lambda: _header(crit=["exp"]), "malformed"),
    ("header-b64", lambda: _header(b64=False), "malformed"),
    ("payload-not-object", lambda: forge(HEADER, [1]), "malformed"),  # type: ignore[arg-type]
    ("payload-duplicate-key", _duplicate_key_payload, "malformed"),
    ("jku", lambda: _header(jku="https://evil.example/jwks.json"), "embedded-key"),
    ("x5u", lambda: _header(x5u="https://evil.example/cert.pem"), "embedded-key"),
    ("jwk", lambda: _header(jwk={"kty": "OKP", "crv": "Ed25519", "x": "AA"}), "embedded-key"),
    ("x5c", lambda: _header(x5c=["MIIB"]), "embedded-key"),
    ("typ-missing", lambda: _header(typ=_DROP), "bad-type"),
    ("typ-jwt", lambda: _header(typ="JWT"), "bad-type"),
    ("typ-not-string", lambda: _header(typ=1), "bad-type"),
    ("alg-none", _alg_none, "bad-algorithm"),
    ("alg-none-unsigned", lambda: _alg_none()[:-2], "bad-algorithm"),
    ("alg-none-forged", lambda: _header(alg="none"), "bad-algorithm"),
    ("hs256-with-public-key", _hs256_with_public_key, "bad-algorithm"),
    ("rs256", _rs256, "bad-algorithm"),
    ("alg-missing", lambda: _header(alg=_DROP), "bad-algorithm"),
    ("kid-missing", lambda: _header(kid=_DROP), "unknown-key"),
    ("kid-unknown", lambda: _header(kid="k2"), "unknown-key"),
    ("kid-path", lambda: _header(kid="../../keys/x"), "unknown-key"),
    ("kid-url", lambda: _header(kid="https://evil.example/k"), "unknown-key"),
    ("kid-not-string", lambda: _header(kid=["k1"]), "unknown-key"),
    ("kid-too-long", lambda: _header(kid="k" * 65), "unknown-key"),
    ("other-key", lambda: forge(HEADER, payload(), OTHER_KEY), "bad-signature"),
    ("tampered-payload", _tampered, "bad-signature"),
    ("short-signature", lambda: f"{b64json(HEADER)}.{b64json(payload())}.AA", "bad-signature"),
    ("noncanonical-signature", _noncanonical_signature, "bad-signature"),
    ("unknown-claim", lambda: forge(HEADER, payload(admin=True)), "bad-claim:admin"),
    ("exp-string", lambda: forge(HEADER, payload(exp=str(T + 600))), "bad-claim:exp"),
    ("exp-float", lambda: forge(HEADER, payload(exp=T + 600.5)), "bad-claim:exp"),
    ("exp-bool", lambda: forge(HEADER, payload(iat=True)), "bad-claim:iat"),
    ("aud-list", lambda: forge(HEADER, payload(aud=[AUD])), "bad-claim:aud"),
    ("jti-short", lambda: forge(HEADER, payload(jti="abc")), "bad-claim:jti"),
    ("scope-double-space", lambda: forge(HEADER, payload(scope="a  b")), "bad-claim:scope"),
    ("scope-duplicate", lambda: forge(HEADER, payload(scope="a a")), "bad-claim:scope"),
    ("task-no-id", lambda: forge(HEADER, payload(task={"purpose": "x"})), "bad-claim:task"),
    (
        "details-untyped",
        lambda: forge(HEADER, payload(authorization_details=[{"connector": "files"}])),
        "bad-claim:authorization_details",
    ),
    ("budget-zero", lambda: forge(HEADER, payload(budget=0)), "bad-claim:budget"),
    ("exp-before-iat", lambda: forge(HEADER, payload(exp=T - 1)), "bad-claim:exp"),
    ("nbf-after-exp", lambda: forge(HEADER, payload(nbf=T + 601)), "bad-claim:nbf"),
    ("sub-not-client", lambda: forge(HEADER, payload(sub="agent-b")), "bad-claim:sub"),
    (
        "act-without-delegation",
        lambda: forge(HEADER, payload(sub="r", act={"sub": "agent-a"})),
        "bad-claim:act",
    ),
    (
        "delegation-without-act",
        lambda: forge(
            HEADER,
            payload(delegation={"parent": PARENT_JTI, "chain": [PARENT_JTI], "depth": 1}),
        ),
        "bad-claim:act",
    ),
    (
        "act-not-client",
        lambda: forge(
            HEADER,
            payload(
                sub="r",
                act={"sub": "someone-else"},
                delegation={"parent": PARENT_JTI, "chain": [PARENT_JTI], "depth": 1},
            ),
        ),
        "bad-claim:act",
    ),
    (
        "act-depth-mismatch",
        lambda: forge(
            HEADER,
            payload(
                sub="r",
                act={"sub": "agent-a", "act": {"sub": "b"}},
                delegation={"parent": PARENT_JTI, "chain": [PARENT_JTI], "depth": 1},
            ),
        ),
        "bad-claim:act",
    ),
    (
        "chain-depth-mismatch",
        lambda: forge(
            HEADER,
            payload(
                sub="r",
                act={"sub": "agent-a"},
                delegation={"parent": PARENT_JTI, "chain": [PARENT_JTI], "depth": 2},
            ),
        ),
        "bad-claim:delegation",
    ),
    (
        "own-ancestor",
        lambda: forge(
            HEADER,
            payload(
                sub="r",
                act={"sub": "agent-a"},
                delegation={"parent": JTI, "chain": [JTI], "depth": 1},
            ),
        ),
        "bad-claim:jti",
    ),
    ("wrong-issuer", lambda: forge(HEADER, payload(iss="https://evil.example")), "issuer-mismatch"),
    ("issuer-trailing-slash", lambda: forge(HEADER, payload(iss=ISS + "/")), "issuer-mismatch"),
    ("wrong-audience", lambda: forge(HEADER, payload(aud=ISS + "/other")), "audience-mismatch"),
    ("audience-trailing-slash", lambda: forge(HEADER, payload(aud=AUD + "/")), "audience-mismatch"),
    (
        "issued-in-future",
        lambda: forge(HEADER, payload(iat=T + 31, nbf=T + 31, exp=T + 600)),
        "issued-in-future",
    ),
    ("not-yet-valid", lambda: forge(HEADER, payload(nbf=T + 31)), "not-yet-valid"),
    (
        "expired",
        lambda: forge(HEADER, payload(iat=T - 700, nbf=T - 700, exp=T - 30)),
        "expired",
    ),
    ("lifetime-too-long", lambda: forge(HEADER, payload(exp=T + 3601)), "lifetime-too-long"),
]


@pytest.mark.parametrize(
    ("make", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_verification_refuses_with_one_reason(make: Callable[[], str], reason: str) -> None:
    assert reason_of(lambda: verify(make())) == reason


@pytest.mark.parametrize("name", REQUIRED_CLAIMS)
def test_each_required_claim_is_required(name: str) -> None:
    raw = forge(HEADER, payload(**{name: _DROP}))
    with pytest.raises(TokenRejected) as info:
        verify(raw)
    assert info.value.reason == f"missing-claim:{name}"
    assert info.value.jti == (None if name == "jti" else JTI)


def test_a_refusal_after_the_signature_carries_the_jti_and_never_the_token() -> None:
    raw = forge(HEADER, payload(aud="https://elsewhere.example/mcp"))
    with pytest.raises(TokenRejected) as info:
        verify(raw)
    assert info.value.jti == JTI
    assert raw not in str(info.value)


def test_a_refusal_before_the_signature_carries_no_jti() -> None:
    with pytest.raises(TokenRejected) as info:
        verify(forge(HEADER, payload(), OTHER_KEY))
    assert info.value.jti is None


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/At+JWT"])
def test_both_spellings_of_the_type_are_accepted_in_any_case(typ: str) -> None:
    assert verify(forge({**HEADER, "typ": typ}, payload())).jti == JTI


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (NOW - timedelta(seconds=30), None),
        (NOW - timedelta(seconds=31), "issued-in-future"),
        (NOW + timedelta(seconds=629), None),
        (NOW + timedelta(seconds=630), "expired"),
    ],
    ids=["iat-within-leeway", "iat-beyond-leeway", "exp-within-leeway", "exp-beyond-leeway"],
)
def test_time_rules_use_the_injected_now_and_the_fixed_leeway(
    now: datetime, reason: str | None
) -> None:
    raw = mint_token(claims(), private_key=KEY, kid="k1")
    if reason is None:
        assert verify(raw, now=now).jti == JTI
    else:
        assert reason_of(lambda: verify(raw, now=now)) == reason


def test_a_token_far_from_the_wall_clock_verifies_at_its_own_now() -> None:
    then = datetime(2031, 1, 1, tzinfo=UTC)
    t = int(then.timestamp())
    raw = mint_token(claims(iat=t, nbf=t, exp=t + 60), private_key=KEY, kid="k1")
    assert verify(raw, now=then).iat == t


def test_only_ed25519_keys_verify_whatever_the_header_says() -> None:
    rsa_public = generate_private_key(public_exponent=65537, key_size=2048).public_key()
    raw = mint_token(claims(), private_key=KEY, kid="k1")
    assert reason_of(lambda: verify(raw, keys={"k1": rsa_public})) == "unknown-key"


def test_the_model_refuses_inconsistent_claims_on_construction() -> None:
    with pytest.raises(ValidationError):
        claims(exp=T)
    with pytest.raises(ValidationError):
        DelegationClaim(parent=PARENT_JTI, chain=("q" * 22,), depth=1)
    with pytest.raises(ValidationError):
        TaskClaim(id="bad id", purpose="")
    with pytest.raises(ValidationError):
        TaskClaim(id="t", purpose="line\nbreak")
    assert ActorClaim(sub="c", act=ActorClaim(sub="b")).actors == ("c", "b")


def test_jtis_of_the_expected_shape_are_accepted() -> None:
    jti = secrets.token_urlsafe(16)
    assert len(jti) == 22
    assert verify(mint_token(claims(jti=jti), private_key=KEY, kid="k1")).jti == jti
