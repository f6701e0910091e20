"""Output policy: what a tool result may carry back to an agent. Pure; stdlib only.

`shape_result` takes a result in its wire shape (``{"content": [...], "structuredContent": ...,
"isError": ...}``, camelCase, as JSON) and applies, in this order:

1. **Redaction** (when ``redact_secrets``): secret-shaped values in every string of the result are
   replaced in place by ``[redacted:<kind>]`` before the agent sees them. Kinds: PEM private
   keys, AWS access key ids (and ``aws_secret_access_key = ...`` assignments), GitHub and Slack
   tokens, JWTs, ``Bearer``/``Basic`` credentials, and the broker's own connector credentials
   handed in as ``known_secrets``. Generic high-entropy strings are *not* redacted here: hashes,
   ids and digests are what tools legitimately return. Binary payloads (``data``/``blob`` of a
   block that has a ``mimeType``) are left alone. (`broker.core.redaction` serves the record and
   keeps its patterns private, with HMAC fingerprints and an entropy rule; the agent-facing
   patterns live here.)
2. **Size cap**: the UTF-8 size of the result's compact JSON is measured against
   ``max_result_bytes``. Over it, ``refuse`` drops the result (the shell answers
   ``result-too-large``); ``truncate`` keeps text blocks in order up to the cap, drops blocks and
   structured content that do not fit, and appends a text block naming the cap. A truncated result
   whose structured content was dropped is marked ``isError`` so that a client validating
   structured content against the tool's output schema does not reject it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

__all__ = ["OutputPolicy", "ShapedOutput", "redact_text", "result_size", "shape_result"]

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_WORD_CHARS = _ALNUM + "_"
TRUNCATION_MARKER = "[truncated by mcp-authz-broker: the result exceeded the {cap}-byte cap]"
_MIN_KNOWN = 8

# One rule per kind: the literal markers that must occur for it to match (checked with ``in``,
# which is far cheaper than running a regex over text that cannot contain the secret), the
# pattern (starting with its literal, so the regex engine can skip ahead), the characters that
# must not precede a match, and the group holding the secret (the rest of the match is kept).
_Rule = tuple[str, tuple[str, ...], "re.Pattern[str]", str, int]
_RULES: tuple[_Rule, ...] = (
    (
        "private_key",
        ("-----BEGIN",),
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
        ),
        "",
        0,
    ),
    (
        "aws_access_key",
        ("AKIA", "ASIA", "ABIA", "ACCA"),
        re.compile(r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"),
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        0,
    ),
    (
        "aws_secret_key",
        ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "Aws_Secret_Access_Key"),
        re.compile(
            r"(?i:aws_secret_access_key)[\"']?\s*[=:]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
        ),
        "",
        1,
    ),
    (
        "github_token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        re.compile(
            r"(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])"
        ),
        _WORD_CHARS,
        0,
    ),
    (
        "slack_token",
        ("xox", "xapp-"),
        re.compile(r"(?:xox[abposre]|xapp)-[A-Za-z0-9-]{10,250}"),
        _ALNUM,
        0,
    ),
    (
        "jwt",
        ("eyJ",),
        re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
        _WORD_CHARS + "-",
        0,
    ),
    (
        "authorization",
        ("earer", "EARER", "asic", "ASIC"),
        re.compile(
            r"(?:[Bb]earer|BEARER|[Bb]asic|BASIC)[ \t]+"
            r"([A-Za-z0-9._~+/-]{16,}=*)(?![A-Za-z0-9._~+/=-])"
        ),
        _WORD_CHARS,
        1,
    ),
)
_ANY_MARKER = re.compile("|".join(re.escape(m) for rule in _RULES for m in rule[1]))
# The shortest secret shape (a Slack token) has 15 characters; short strings are common (block
# types, ids), and one regex pass over them is cheaper than a scan per marker.
_MIN_SHAPED = 15
_SHORT = 256
_BINARY_KEYS = frozenset({"data", "blob"})


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """The ``[output]`` settings plus the secrets the broker knows (connector credentials)."""

    max_result_bytes: int = 256 * 1024
    oversize: Literal["truncate", "refuse"] = "truncate"
    redact_secrets: bool = True
    known_secrets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_result_bytes < 256:
            raise ValueError("max_result_bytes must leave room for the truncation marker")
        # Longest first, so a secret containing another is replaced whole.
        known = sorted({k for k in self.known_secrets if len(k) >= _MIN_KNOWN}, key=len)
        object.__setattr__(self, "known_secrets", tuple(reversed(known)))


@dataclass(frozen=True, slots=True)
class ShapedOutput:
    """What `shape_result` made of a result.

    ``result`` is None when it was refused; ``changed`` says whether it differs from the input
    (the shell then rebuilds the wire object); ``size`` is the input's size in bytes;
    ``redactions`` the kinds replaced, in order of appearance, one entry per value.
    """

    result: dict[str, Any] | None
    size: int
    changed: bool
    truncated: bool = False
    refused: bool = False
    redactions: tuple[str, ...] = ()


def result_size(result: Mapping[str, Any]) -> int:
    """UTF-8 bytes of the compact JSON of ``result``."""
    return len(_dumps(result).encode("utf-8"))


def redact_text(text: str, known_secrets: Sequence[str] = ()) -> tuple[str, list[str]]:
    """``text`` with every secret-shaped value replaced, and the kinds replaced."""
    kinds: list[str] = []
    if len(text) < _MIN_KNOWN:
        return text, kinds
    for known in known_secrets:
        if known in text:
            kinds.extend(["connector_credential"] * text.count(known))
            text = text.replace(known, "[redacted:connector_credential]")
    if len(text) < _MIN_SHAPED:
        return text, kinds
    if len(text) <= _SHORT and _ANY_MARKER.search(text) is None:
        return text, kinds
    for kind, markers, pattern, not_after, group in _RULES:
        if any(m in text for m in markers):
            text = _apply(text, kind, pattern, not_after, group, kinds)
    return text, kinds


def _apply(
    text: str, kind: str, pattern: re.Pattern[str], not_after: str, group: int, kinds: list[str]
) -> str:
    def replace(m: re.Match[str]) -> str:
        start = m.start()
        if not_after and start > 0 and text[start - 1] in not_after:
            return m.group(0)
        kinds.append(kind)
        if group == 0:
            return f"[redacted:{kind}]"
        whole, secret = m.group(0), m.group(group)
        cut = m.start(group) - start
        return whole[:cut] + f"[redacted:{kind}]" + whole[cut + len(secret) :]

    return pattern.sub(replace, text)


def shape_result(result: Mapping[str, Any], policy: OutputPolicy) -> ShapedOutput:
    """Redact, then cap the size of, a wire-shaped tool result (see the module docstring)."""
    kinds: list[str] = []
    shaped: dict[str, Any] = dict(result)
    if policy.redact_secrets:
        shaped = cast(dict[str, Any], _redact(shaped, policy.known_secrets, kinds, binary=False))
    size = result_size(result) if not kinds else result_size(shaped)
    if size <= policy.max_result_bytes:
        return ShapedOutput(shaped, size, bool(kinds), redactions=tuple(kinds))
    if policy.oversize == "refuse":
        return ShapedOutput(None, size, True, refused=True, redactions=tuple(kinds))
    return ShapedOutput(
        _truncate(shaped, policy.max_result_bytes),
        size,
        True,
        truncated=True,
        redactions=tuple(kinds),
    )


def _redact(value: object, known: Sequence[str], kinds: list[str], *, binary: bool) -> object:
    if isinstance(value, str):
        if binary:
            return value
        text, found = redact_text(value, known)
        kinds.extend(found)
        return text
    if isinstance(value, Mapping):
        mapping = cast(Mapping[str, object], value)
        has_mime = "mimeType" in mapping
        return {
            k: _redact(v, known, kinds, binary=has_mime and k in _BINARY_KEYS)
            for k, v in mapping.items()
        }
    if isinstance(value, list):
        return [_redact(v, known, kinds, binary=False) for v in cast(list[object], value)]
    return value


def _truncate(result: Mapping[str, Any], cap: int) -> dict[str, Any]:
    marker = {"type": "text", "text": TRUNCATION_MARKER.format(cap=cap)}
    dropped_structure = result.get("structuredContent") is not None
    skeleton: dict[str, Any] = {
        "content": [marker],
        "isError": bool(result.get("isError")) or dropped_structure,
    }
    remaining = cap - result_size(skeleton)
    kept: list[Any] = []
    raw_content = result.get("content")
    blocks = cast(list[object], raw_content) if isinstance(raw_content, list) else []
    for block in blocks:
        cost = result_size(cast(Mapping[str, Any], block)) + 1 if isinstance(block, Mapping) else 0
        if cost and cost <= remaining:
            kept.append(block)
            remaining -= cost
            continue
        if isinstance(block, Mapping) and cast(Mapping[str, Any], block).get("type") == "text":
            text = cast(Mapping[str, Any], block).get("text")
            if isinstance(text, str):
                cut = _cut_text(dict(cast(Mapping[str, Any], block)), text, remaining - 1)
                if cut is not None:
                    kept.append(cut)
        # Nothing after a block that did not fit: the agent reads a prefix, never a collage.
        break
    skeleton["content"] = [*kept, marker]
    return skeleton


def _cut_text(block: dict[str, Any], text: str, budget: int) -> dict[str, Any] | None:
    """``block`` with its text cut so that the block's JSON fits ``budget`` bytes."""
    overhead = result_size({**block, "text": ""})
    room = budget - overhead
    if room <= 0:
        return None
    encoded = text.encode("utf-8")[:room]
    candidate = encoded.decode("utf-8", "ignore")
    # JSON escaping can make the text longer than its UTF-8 bytes: shrink until it fits.
    while candidate and len(_dumps(candidate).encode("utf-8")) - 2 > room:
        candidate = candidate[: max(0, len(candidate) - max(1, len(candidate) // 10))]
    return {**block, "text": candidate} if candidate else None


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
