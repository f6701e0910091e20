"""The output policy as values: redaction of secret shapes, the size cap, truncation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.core.output import OutputPolicy, redact_text, result_size, shape_result

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudC0xIn0.c2lnbmF0dXJlLWJ5dGVz"
PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAA\n"
    "-----END OPENSSH PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (f"key:\n{PEM}\nend", "private_key"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQ (cut short)", "private_key"),
        ("id=AKIAIOSFODNN7EXAMPLE;", "aws_access_key"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_key"),
        ("token ghp_" + "A1b2" * 9, "github_token"),
        ("github_pat_" + "a" * 30, "github_token"),
        ("slack xoxb-123456789012-abcdefghij", "slack_token"),
        (f"jwt {JWT} here", "jwt"),
        ("Authorization: Bearer abcDEF123456ghiJKL789", "authorization"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZDEyMw==", "authorization"),
    ],
    ids=[
        "pem",
        "pem-unterminated",
        "aws-key-id",
        "aws-secret",
        "github",
        "github-pat",
        "slack",
        "jwt",
        "bearer",
        "basic",
    ],
)
def test_secret_shapes_are_replaced_by_a_marker_naming_their_kind(text: str, kind: str) -> None:
    redacted, kinds = redact_text(text)
    assert kinds == [kind]
    assert f"[redacted:{kind}]" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "commit 3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "random-looking id Zq8Xv2Lm9Pw4Rt7Yk3Nb6Hc1Jd5Fg0Sa",
        "a basic example of bearer tokens in prose",
        "XAKIAIOSFODNN7EXAMPLE is part of a longer word",
        "short",
    ],
    ids=["sha256", "git-sha", "uuid", "high-entropy-id", "prose", "embedded", "short"],
)
def test_hashes_ids_and_prose_are_left_alone(text: str) -> None:
    assert redact_text(text) == (text, [])


def test_known_connector_credentials_are_redacted_wherever_they_appear() -> None:
    redacted, kinds = redact_text(
        "pw=hunter2-hunter2 and again hunter2-hunter2", ["hunter2-hunter2"]
    )
    assert (
        redacted == "pw=[redacted:connector_credential] and again [redacted:connector_credential]"
    )
    assert kinds == ["connector_credential", "connector_credential"]


def test_every_string_of_a_result_is_redacted_but_binary_data_is_not() -> None:
    result: dict[str, Any] = {
        "content": [
            {"type": "text", "text": "key AKIAIOSFODNN7EXAMPLE"},
            {"type": "image", "mimeType": "image/png", "data": "AKIAIOSFODNN7EXAMPLEAAAA"},
        ],
        "structuredContent": {"nested": [{"auth": "Bearer abcDEF123456ghiJKL789"}]},
        "isError": False,
    }
    shaped = shape_result(result, OutputPolicy())
    assert shaped.changed
    assert shaped.result is not None
    assert shaped.result["content"][0]["text"] == "key [redacted:aws_access_key]"
    assert shaped.result["content"][1]["data"] == "AKIAIOSFODNN7EXAMPLEAAAA"
    assert shaped.result["structuredContent"]["nested"][0]["auth"] == (
        "Bearer [redacted:authorization]"
    )
    assert shaped.redactions == ("aws_access_key", "authorization")


def test_redaction_can_be_switched_off() -> None:
    result = {"content": [{"type": "text", "text": "AKIAIOSFODNN7EXAMPLE"}], "isError": False}
    shaped = shape_result(result, OutputPolicy(redact_secrets=False))
    assert not shaped.changed
    assert shaped.result == result


def test_a_result_under_the_cap_is_unchanged() -> None:
    result = {"content": [{"type": "text", "text": "hello"}], "isError": False}
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024))
    assert not shaped.changed
    assert shaped.result == result
    assert shaped.size == result_size(result)


def test_an_oversized_result_is_refused_when_the_policy_says_refuse() -> None:
    result = {"content": [{"type": "text", "text": "x" * 5000}], "isError": False}
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024, oversize="refuse"))
    assert shaped.refused
    assert shaped.result is None
    assert shaped.size > 5000


@pytest.mark.parametrize("text", ["x" * 5000, "é" * 3000, '"\\' * 2000, "a\n" * 2500])
def test_truncation_keeps_a_prefix_within_the_cap_and_names_the_cap(text: str) -> None:
    result = {"content": [{"type": "text", "text": text}], "isError": False}
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024))
    assert shaped.truncated
    assert shaped.result is not None
    assert result_size(shaped.result) <= 1024
    kept, marker = shaped.result["content"]
    assert text.startswith(kept["text"])
    assert len(kept["text"]) > 100
    assert marker["text"].endswith("the result exceeded the 1024-byte cap]")
    assert shaped.result["isError"] is False


def test_truncation_drops_what_does_not_fit_and_marks_dropped_structure_as_an_error() -> None:
    result = {
        "content": [
            {"type": "text", "text": "first"},
            {"type": "image", "mimeType": "image/png", "data": "A" * 4000},
            {"type": "text", "text": "after the image"},
        ],
        "structuredContent": {"big": "y" * 4000},
        "isError": False,
    }
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024))
    assert shaped.result is not None
    texts = [b.get("text") for b in shaped.result["content"]]
    assert texts[0] == "first"
    assert len(texts) == 2
    assert "structuredContent" not in shaped.result
    assert shaped.result["isError"] is True
    assert result_size(shaped.result) <= 1024


def test_sizes_are_utf8_bytes_of_the_compact_json() -> None:
    value = {"a": "é"}
    assert result_size(value) == len(
        json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    )


def test_a_cap_too_small_for_the_marker_is_refused() -> None:
    with pytest.raises(ValueError, match="max_result_bytes"):
        OutputPolicy(max_result_bytes=10)


def test_a_text_block_that_cannot_fit_at_all_leaves_only_the_marker() -> None:
    result = {
        "content": [{"type": "text", "text": "x" * 5000, "annotations": {"note": "n" * 2000}}],
        "isError": False,
    }
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024))
    assert shaped.result is not None
    assert [b["text"][:12] for b in shaped.result["content"]] == ["[truncated b"]


@pytest.mark.parametrize(
    "block",
    ["n" * 2000, {"type": "text", "text": 5, "pad": "p" * 2000}],
    ids=["not-an-object", "text-not-a-string"],
)
def test_malformed_blocks_are_dropped_by_truncation(block: object) -> None:
    result: dict[str, Any] = {"content": [block], "isError": False}
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024, redact_secrets=False))
    assert shaped.result is not None
    assert len(shaped.result["content"]) == 1
    assert shaped.truncated


def test_a_known_secret_absent_from_the_text_changes_nothing() -> None:
    assert redact_text("nothing to see here at all", ["other-secret-value"]) == (
        "nothing to see here at all",
        [],
    )


def test_content_that_fits_is_kept_whole_when_only_structured_content_is_too_large() -> None:
    result = {
        "content": [{"type": "text", "text": "summary"}],
        "structuredContent": {"rows": ["r" * 100] * 50},
        "isError": False,
    }
    shaped = shape_result(result, OutputPolicy(max_result_bytes=1024))
    assert shaped.result is not None
    assert shaped.result["content"][0] == {"type": "text", "text": "summary"}
    assert shaped.result["isError"] is True
