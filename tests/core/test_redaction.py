"""Redaction: secrets become keyed HMACs before anything is recorded; text stays data."""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.redaction import Redactor, is_redaction

KEY = b"k" * 32
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudC0xIn0.c2lnbmF0dXJlX2J5dGVz"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SLACK = "xoxb-123456789012-abcdefghijklmnop"
PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+abc\n-----END PRIVATE KEY-----"
RANDOM = "Zq8xV2mN4bK7pL0sT3wY6eR9uI1oA5dF"
MARK = re.compile(r"hmac-sha256:[0-9a-f]{16}")


@pytest.fixture
def redactor() -> Redactor:
    return Redactor(KEY, known=["canary-value-123", "short"])


@pytest.mark.parametrize(
    "secret",
    [
        GITHUB,
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
        JWT,
        AWS_ID,
        AWS_SECRET,
        SLACK,
        "xapp-1-A0123456789-abcdef",
        "https://hooks.slack.com/services/T000/B000/XXXX",
        PEM,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
        "sk-proj-abcdefghijklmnopqrstuvwxyz0123",
        "AIzaSyA-1234567890abcdefghijklmnopqrstu",
        "Bearer abc.def-123456",
        "Basic dXNlcjpwYXNz",
        RANDOM,
        "canary-value-123",
    ],
    ids=[
        "github",
        "github-pat",
        "jwt",
        "aws-key-id",
        "aws-secret",
        "slack",
        "slack-app",
        "slack-webhook",
        "pem",
        "pem-cut-off",
        "openai-style",
        "google-api-key",
        "bearer",
        "basic",
        "high-entropy",
        "known-canary",
    ],
)
def test_a_secret_shaped_value_becomes_a_keyed_hmac(redactor: Redactor, secret: str) -> None:
    out = redactor.redact(secret)
    assert is_redaction(out)
    assert out == {"redacted": redactor.fingerprint(secret)}
    assert MARK.fullmatch(out["redacted"])


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "/srv/workspace/src/components/UserProfile2Card/index.tsx",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "550e8400-e29b-41d4-a716-446655440000",
        "01J9ZQ3V5X6Y7K8M9N0P1Q2R3S",
        "the token validation failed",
        "getUserProfileByEmailAddressAndTenantId2",
        "https://example.com/Some/Path/With2Upper/and-more-stuff",
        "<script>alert(1)</script>",
        "max_tokens=1000",
        "short",
    ],
    ids=[
        "words",
        "path",
        "sha256",
        "uuid",
        "ulid",
        "sentence-with-token",
        "identifier",
        "url",
        "markup",
        "numeric-setting",
        "short-known-value-ignored",
    ],
)
def test_ordinary_text_is_kept_verbatim(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == text


def test_secrets_inside_text_are_replaced_in_place(redactor: Redactor) -> None:
    text = (
        f"curl -H 'Authorization: Bearer {RANDOM}' -d token={GITHUB} "
        f"password=hunter22 aws={AWS_ID} max_tokens=1000 canary-value-123!"
    )
    out = redactor.scrub_text(text)
    for secret in (RANDOM, GITHUB, "hunter22", AWS_ID, "canary-value-123"):
        assert secret not in out
    assert out.startswith("curl -H 'Authorization: Bearer [redacted hmac-sha256:")
    assert "max_tokens=1000" in out
    assert f"[redacted {redactor.fingerprint(GITHUB)}]" in out
    assert out.endswith("]!")


def test_values_under_secret_named_keys_are_redacted_whatever_they_look_like(
    redactor: Redactor,
) -> None:
    args: dict[str, Any] = {
        "password": "x",
        "apiKey": "abc",
        "API-KEY": 12345,
        "Authorization": "Bearer x",
        "client_secret": {"nested": ["a", 1]},
        "set_cookie": ["a=b"],
        "private_key": "k",
        "db": {"Password": "p"},
        "session_token": "t",
        "password_set": True,
        "password_hint": "pet",
        "max_tokens": 10,
        "input_tokens": 5,
        "token_type": "Bearer",
        "secret_name": "db",
        "token_url": "https://auth.example.com/token",
        "key": "README.md",
        "monkey": "banana",
        "": "empty key",
        "already": {"redacted": "hmac-sha256:0123456789abcdef"},
    }
    out = redactor.redact(args)
    redacted = {k for k, v in out.items() if is_redaction(v) and k not in {"already"}}
    assert redacted == {
        "password",
        "apiKey",
        "API-KEY",
        "Authorization",
        "client_secret",
        "set_cookie",
        "private_key",
        "session_token",
    }
    assert is_redaction(out["db"]["Password"])
    for kept in (
        "password_set",
        "password_hint",
        "max_tokens",
        "input_tokens",
        "token_type",
        "secret_name",
        "token_url",
        "key",
        "monkey",
        "",
        "already",
    ):
        assert out[kept] == args[kept]


def test_a_redaction_marker_under_a_secret_key_is_kept_not_re_hashed(redactor: Redactor) -> None:
    marker = {"redacted": "hmac-sha256:0123456789abcdef"}
    assert redactor.redact({"token": marker}) == {"token": marker}


def test_equal_secrets_correlate_and_different_keys_do_not(redactor: Redactor) -> None:
    a = redactor.redact({"token": GITHUB, "args": [GITHUB]})
    assert a["token"] == a["args"][0]
    assert redactor.redact(RANDOM) != redactor.redact(RANDOM[::-1])
    other = Redactor(b"o" * 32)
    assert other.redact(GITHUB) != redactor.redact(GITHUB)


def test_structured_secrets_hash_the_same_whatever_their_key_order(redactor: Redactor) -> None:
    one = redactor.redact({"credentials": {"user": "u", "pass": "p"}})
    two = redactor.redact({"credentials": {"pass": "p", "user": "u"}})
    assert one == two


def test_lists_tuples_scalars_and_secret_keys_in_keys_are_handled(redactor: Redactor) -> None:
    out = redactor.redact({GITHUB: [1, 2.5, None, False, (JWT,)], 7: "x"})
    assert out == {
        f"[redacted {redactor.fingerprint(GITHUB)}]": [
            1,
            2.5,
            None,
            False,
            [{"redacted": redactor.fingerprint(JWT)}],
        ],
        "7": "x",
    }


def test_markup_is_recorded_as_data_not_escaped(redactor: Redactor) -> None:
    payload = {"name": "<img src=x onerror=alert(1)>", "q": "a & b \"c\" 'd'"}
    assert redactor.redact(payload) == payload


def test_excerpt_is_bounded_redacted_and_records_the_full_size(redactor: Redactor) -> None:
    text = "é" * 10 + f" {GITHUB} " + "x" * 5000
    ex = redactor.excerpt(text, limit=100)
    assert len(ex["text"]) == 100
    assert GITHUB not in ex["text"]
    assert ex["chars"] == len(text)
    assert ex["bytes"] == len(text.encode())
    assert ex["truncated"] is True


def test_a_short_result_is_kept_whole(redactor: Redactor) -> None:
    assert Redactor(KEY, excerpt_chars=50).excerpt("done") == {
        "text": "done",
        "chars": 4,
        "bytes": 4,
        "truncated": False,
    }


def test_a_secret_straddling_the_excerpt_cut_is_never_partly_shown(redactor: Redactor) -> None:
    text = "a" * 95 + " " + PEM + " tail"
    ex = redactor.excerpt(text, limit=120)
    assert "MC4CAQAw" not in ex["text"]
    assert "BEGIN PRIVATE" not in ex["text"]


def test_a_huge_result_is_marked_truncated_even_if_the_window_shrinks(redactor: Redactor) -> None:
    text = (GITHUB + " ") * 400
    ex = redactor.excerpt(text, limit=10)
    assert ex["truncated"] is True
    assert ex["chars"] == len(text)


def test_a_weak_key_or_negative_excerpt_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Redactor(b"short")
    with pytest.raises(ValueError, match="must not be negative"):
        Redactor(KEY, excerpt_chars=-1)


@pytest.mark.parametrize(
    "value",
    [
        {"redacted": "x"},
        {"redacted": "hmac-sha256:ab", "more": 1},
        "hmac-sha256:ab",
        {"redacted": 1},
    ],
    ids=["no-prefix", "extra-key", "string", "not-a-string"],
)
def test_only_exact_markers_count_as_redactions(value: object) -> None:
    assert not is_redaction(value)


_alphabet = string.ascii_letters + string.digits


@given(
    st.text(alphabet=_alphabet, min_size=36, max_size=36).filter(
        lambda s: any(c.isdigit() for c in s)
    ),
    st.text(max_size=40),
)
def test_a_github_token_never_survives_in_any_surrounding_text(body: str, around: str) -> None:
    token = "ghp_" + body
    r = Redactor(KEY)
    out = r.redact({"args": [f"{around} {token} {around}"], "token": token})
    assert token not in repr(out)
    assert out["token"] == {"redacted": r.fingerprint(token)}


def test_keys_are_judged_the_same_every_time_however_many_are_seen() -> None:
    redactor = Redactor(KEY)
    names = [f"field{n}" for n in range(5000)] + ["password", "x" * 100 + "_token", "api_key"]
    value = {name: "value-1234567890" for name in names}
    first = redactor.redact(value)
    again = redactor.redact(value)
    assert first == again == Redactor(KEY).redact(value)
    assert first["field7"] == "value-1234567890"
    for secret in ("password", "x" * 100 + "_token", "api_key"):
        assert is_redaction(first[secret])


def test_values_are_judged_the_same_every_time_however_many_are_seen() -> None:
    """Clean short values are remembered (bounded); a secret is never remembered or let through."""
    redactor = Redactor(KEY, known=["known-secret-value"])
    secrets = ["AKIAIOSFODNN7EXAMPLE", "known-secret-value", "Bearer abcDEF123456789xyz"]
    values = [f"plain value {n}" for n in range(5000)] + secrets
    first = [redactor.redact(v) for v in values]
    again = [redactor.redact(v) for v in values]
    assert first == again == [Redactor(KEY, known=["known-secret-value"]).redact(v) for v in values]
    assert first[7] == "plain value 7"
    for secret in secrets:
        assert secret not in repr(again)
