"""What the review page shows of recorded data: escaped, clipped, linked only when http(s). Pure.

Every recorded string is untrusted. It reaches a template either as a plain string (Jinja2's
autoescape escapes it) or as `Markup` built here, where each piece of recorded text passes
through `markupsafe.escape` first. Control and bidirectional-override characters are shown as
``\\uXXXX`` so a result cannot reorder or hide what the reviewer reads. Only an absolute
``http``/``https`` URL becomes a link; any other scheme stays text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from markupsafe import Markup, escape

from broker.core.recording import EventKind, RecordedEvent, format_timestamp

__all__ = [
    "MAX_TEXT",
    "EventView",
    "clip",
    "diff_lines",
    "event_view",
    "is_http_url",
    "linkify",
    "pretty",
    "visible",
]

MAX_TEXT = 2000
"""Characters of one recorded value shown on a page; the rest is cut with a marker."""
MAX_URL = 2048
_URL_RE = re.compile(r"https?://[^\s<>\"'`\\{}|^\[\]]+", re.IGNORECASE)
_INVISIBLE_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]"
)
_TRAILING = ".,;:!?)]}'\""
_KIND_RE = re.compile(r"[^a-z0-9-]")


def visible(text: str) -> str:
    """``text`` with control, zero-width and bidi-override characters written as ``\\uXXXX``."""
    return _INVISIBLE_RE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def clip(text: str, limit: int = MAX_TEXT) -> tuple[str, bool]:
    """At most ``limit`` characters of ``text``, and whether anything was cut."""
    if len(text) <= limit:
        return text, False
    return text[:limit], True


def is_http_url(text: str) -> bool:
    """Whether ``text`` is an absolute http(s) URL with a host and nothing odd in it."""
    if len(text) > MAX_URL or _INVISIBLE_RE.search(text) or any(c.isspace() for c in text):
        return False
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _link(url: str) -> Markup:
    return Markup(
        '<a href="{0}" rel="noopener noreferrer nofollow" target="_blank">{0}</a>'
    ).format(url)


def linkify(text: str, limit: int = MAX_TEXT) -> Markup:
    """Escaped ``text`` (clipped to ``limit``) in which http(s) URLs are links."""
    shown, cut = clip(visible(text), limit)
    parts: list[Markup] = []
    pos = 0
    for match in _URL_RE.finditer(shown):
        url = match.group(0).rstrip(_TRAILING)
        end = match.start() + len(url)
        parts.append(escape(shown[pos : match.start()]))
        parts.append(_link(url) if is_http_url(url) else escape(url))
        pos = end
    parts.append(escape(shown[pos:]))
    if cut:
        parts.append(Markup('<span class="cut">… cut at {} characters</span>').format(limit))
    return Markup("").join(parts)


def pretty(value: Any, limit: int = MAX_TEXT) -> Markup:
    """JSON of ``value``, indented, escaped and linkified, clipped to ``limit``."""
    try:
        text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    except ValueError:
        text = repr(value)
    return linkify(text, limit)


def _value(value: Any) -> Markup:
    if isinstance(value, str):
        return linkify(value)
    if value is None or isinstance(value, bool | int | float):
        return escape(json.dumps(value))
    return pretty(value)


def diff_lines(diff: str, limit: int = 400) -> list[tuple[str, str]]:
    """(css class, line) for a unified diff: ``add``, ``del``, ``hunk`` or ``ctx``."""
    out: list[tuple[str, str]] = []
    for line in diff.splitlines()[:limit]:
        if line.startswith(("+++", "---")):
            cls = "file"
        elif line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            cls = "ctx"
        out.append((cls, visible(line)[:MAX_TEXT]))
    return out


@dataclass(frozen=True, slots=True)
class EventView:
    """One timeline row: header facts plus labelled, already-safe values."""

    seq: int
    at: str
    kind: str
    kind_class: str
    decision_id: str | None
    verdict: str | None
    """``allowed`` / ``denied`` for decision events."""
    reasons: tuple[str, ...] = ()
    fields: Sequence[tuple[str, Markup]] = field(default_factory=list[tuple[str, Markup]])


_SHOWN: Mapping[str, Sequence[tuple[str, str]]] = {
    EventKind.REQUEST: (("method", "Method"), ("tool", "Tool"), ("arguments", "Arguments")),
    EventKind.DECISION: (("tool", "Tool"), ("rule_ids", "Rules")),
    EventKind.FORWARDED: (("connector", "Connector"), ("tool", "Tool"), ("arguments", "Arguments")),
    EventKind.RESULT: (
        ("is_error", "Error"),
        ("latency_ms", "Latency (ms)"),
        ("bytes", "Bytes"),
        ("excerpt", "Result"),
    ),
    EventKind.ERROR: (("error", "Error"), ("detail", "Detail")),
    EventKind.NOTIFICATION: (
        ("direction", "Direction"),
        ("method", "Method"),
        ("params", "Params"),
    ),
    EventKind.APPROVAL: (
        ("approval_id", "Approval"),
        ("state", "State"),
        ("actor", "Actor"),
        ("reason", "Reason"),
    ),
    EventKind.DETECTOR_SIGNAL: (
        ("detector", "Detector"),
        ("score", "Score"),
        ("action", "Action"),
        ("detail", "Detail"),
    ),
}


def _excerpt(value: Any) -> Markup:
    if isinstance(value, Mapping):
        text = value.get("text")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if isinstance(text, str):
            shown = linkify(text)
            chars = value.get("chars")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            if value.get("truncated") and isinstance(chars, int):  # pyright: ignore[reportUnknownMemberType]
                shown += Markup(
                    ' <span class="cut">(recorded excerpt of {} characters)</span>'
                ).format(chars)
            return shown
    return _value(value)


def event_view(event: RecordedEvent) -> EventView:
    """The timeline row of ``event``; nothing in it is trusted markup."""
    payload = dict(event.payload)
    verdict: str | None = None
    reasons: tuple[str, ...] = ()
    if event.kind == EventKind.DECISION:
        verdict = "allowed" if payload.pop("allowed", False) is True else "denied"
        raw = payload.pop("reasons", [])
        if isinstance(raw, list):
            reasons = tuple(visible(str(r))[:200] for r in raw[:50])  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
    fields: list[tuple[str, Markup]] = []
    for key, label in _SHOWN.get(event.kind, ()):
        if key in payload:
            value = payload.pop(key)
            fields.append((label, _excerpt(value) if key == "excerpt" else _value(value)))
    if payload:
        fields.append(("Recorded" if event.kind not in _SHOWN else "More", pretty(payload)))
    return EventView(
        seq=event.seq,
        at=format_timestamp(event.at),
        kind=visible(event.kind)[:64],
        kind_class=_KIND_RE.sub("", event.kind.lower())[:32],
        decision_id=None if event.decision_id is None else visible(event.decision_id)[:128],
        verdict=verdict,
        reasons=reasons,
        fields=fields,
    )
