"""The shape of recorded sessions and events and their hash chain. Pure; stdlib only.

Each event carries ``hash = SHA-256(prev_hash || canonical event)``, where the first event's
``prev_hash`` is the session's genesis value and the canonical event is the JSON of
(session_id, seq, at, kind, decision_id, payload) with sorted keys. A closed session is sealed
with its head hash.

Precisely (version ``mcp-authz-broker/v1``):

- ``genesis_hash(session_id) = hex(SHA-256(b"mcp-authz-broker/v1\\x00" || utf8(session_id)))``.
- ``canonical_event_bytes`` is UTF-8 JSON of the object with keys ``at, decision_id, kind,
  payload, seq, session_id``: sorted keys at every level, no whitespace, no ``NaN`` or
  ``Infinity``, non-ASCII kept as UTF-8, ``at`` as RFC 3339 UTC with microseconds
  (``2026-11-23T12:00:00.000000Z``).
  The payload is first normalised to plain JSON (`normalize_json`) so a value reads back from
  SQLite or PostgreSQL hashing to the same bytes: integral floats become ints, tuples lists,
  datetimes RFC 3339 strings, unencodable lone surrogates U+FFFD.
- ``chain_hash(prev, canonical) = hex(SHA-256(bytes.fromhex(prev) || canonical))``; hashes are
  64 lower-case hex digits, so the 32-byte prefix is unambiguous.

Every session's chain starts with a ``session-opened`` event (seq 1) whose payload repeats the
session's identity (agent, token, task, start), so editing the session row is detected too; a
closed session ends with ``session-closed`` (payload ``{"event_count": seq}``) and the session
row's ``head_hash`` equals that event's hash (the seal).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, cast

__all__ = [
    "CHAIN_VERSION",
    "ChainProblem",
    "ChainReport",
    "EventKind",
    "RecordedEvent",
    "SessionRecord",
    "canonical_event_bytes",
    "chain_hash",
    "format_timestamp",
    "genesis_hash",
    "normalize_json",
    "seal_event",
    "session_identity",
    "verify_chain",
]

CHAIN_VERSION = "mcp-authz-broker/v1"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    agent_id: str
    token_jti: str
    task_id: str
    started_at: datetime
    protocol_version: str = ""
    transport: str = ""
    client_info: Mapping[str, Any] = field(default_factory=dict[str, Any])
    ended_at: datetime | None = None
    head_hash: str | None = None
    """Set when the session is sealed."""
    event_count: int = 0
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    session_id: str
    seq: int
    """1-based, gapless within a session."""
    at: datetime
    kind: str
    payload: Mapping[str, Any]
    prev_hash: str
    hash: str
    decision_id: str | None = None
    payload_json: str | None = field(default=None, compare=False, repr=False)
    """The payload as canonical JSON text (what the hash covers), when `seal_event` made it:
    a store may write it as the payload column's text instead of serialising the payload again
    (it reads back as the same value). Not part of the event's identity."""


class EventKind(StrEnum):
    """What an event records. The payload shapes are documented per member."""

    SESSION_OPENED = "session-opened"
    """Always seq 1: ``session_identity(record)`` (agent, token, task, start, client, transport)."""
    REQUEST = "request"
    """An agent message: ``{"method", "tool"?, "arguments"? (redacted), "request_id"?}``."""
    DECISION = "decision"
    """``{"allowed", "reasons": [...], "rule_ids": [...], "tool"?}``; ``decision_id`` set."""
    FORWARDED = "forwarded"
    """What was sent downstream: ``{"connector", "tool", "arguments" (canonical, redacted)}``."""
    RESULT = "result"
    """``{"is_error", "excerpt": {text, chars, truncated}, "bytes", "latency_ms"}``."""
    ERROR = "error"
    """A failure on the call path: ``{"error": kebab-case code, "detail"?}``."""
    NOTIFICATION = "notification"
    """A notification either way: ``{"direction": "in"|"out", "method", "params"? (redacted)}``."""
    APPROVAL = "approval"
    """A human approval step: ``{"approval_id", "state", "actor"?, "reason"?}``."""
    EGRESS = "egress"
    """A connector's network attempt through the egress proxy: ``{"connector", "allowed",
    "kind", "host", "port", "address", "reason"?, "method"?}``."""
    DETECTOR_SIGNAL = "detector-signal"
    """An anomaly detector fired: ``{"detector", "score", "action", "detail"?}``."""
    SESSION_CLOSED = "session-closed"
    """Always last: ``{"event_count": seq, "reason"?}``; its hash is the session's seal."""


class ChainProblem(StrEnum):
    """Why a chain failed to verify."""

    HASH_MISMATCH = "hash-mismatch"
    """An event's content does not hash to its stored hash (edited)."""
    GAP = "gap"
    """A sequence number is missing (deleted)."""
    REORDERED = "reordered"
    """Events are out of order (moved, swapped or duplicated)."""
    TRUNCATED = "truncated"
    """The session says it has more events, or a later head, than are present."""
    PREV_MISMATCH = "prev-mismatch"
    """An event does not link to its predecessor's hash."""
    SEAL_MISMATCH = "seal-mismatch"
    """The session row disagrees with its chain: opening identity, seal or closing count."""


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of verifying one session's chain."""

    session_id: str
    ok: bool
    checked: int
    """Events that verified before the first problem (all of them when ``ok``)."""
    head_hash: str
    """The hash of the last event that verified (the genesis when none did)."""
    first_bad_seq: int | None = None
    problem: ChainProblem | None = None
    detail: str = ""


def format_timestamp(at: datetime) -> str:
    """RFC 3339 UTC with microseconds. A naive datetime is read as UTC (SQLite drops offsets)."""
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clean_str(s: str) -> str:
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")
    return s


def normalize_json(value: object) -> Any:
    """Plain JSON that survives a store round trip unchanged.

    Raises:
        ValueError: a float is NaN or infinite, a mapping key is not a string, or a value is
            not JSON-shaped.
    """
    kind = type(value)
    # The exact types redaction and JSON parsing give come first: on every recorded event, an
    # ABC check (``Mapping``) would cost more than the rest of the work.
    if kind is str:
        return _clean_str(cast(str, value))
    if kind is dict:
        return _normalize_mapping(cast("Mapping[object, object]", value))
    if kind is list:
        return [normalize_json(v) for v in cast("list[object]", value)]
    if value is None or kind is bool or kind is int:
        return value
    if kind is float or isinstance(value, float):
        number = cast(float, value)
        if not math.isfinite(number):
            raise ValueError("recorded numbers must be finite")
        return int(number) if number.is_integer() else number
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return _normalize_mapping(cast("Mapping[object, object]", value))
    if isinstance(value, list | tuple):
        return [normalize_json(v) for v in cast("Sequence[object]", value)]
    raise ValueError(f"cannot record a value of type {type(value).__name__}")


def _normalize_mapping(value: Mapping[object, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValueError(f"recorded mapping keys must be strings, found {type(k).__name__}")
        out[_clean_str(k)] = normalize_json(v)
    return out


def genesis_hash(session_id: str) -> str:
    """The ``prev_hash`` of a session's first event."""
    return hashlib.sha256(f"{CHAIN_VERSION}\x00{session_id}".encode()).hexdigest()


def canonical_event_bytes(
    session_id: str,
    seq: int,
    at: datetime,
    kind: str,
    payload: Mapping[str, Any],
    decision_id: str | None,
) -> bytes:
    """The bytes an event's hash covers (see the module docstring).

    Raises:
        ValueError: the payload is not JSON-shaped (see `normalize_json`).
    """
    return _canonical_bytes(session_id, seq, at, kind, normalize_json(payload), decision_id)


_canonical_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
"""Canonical JSON text of a normalised value (one encoder, built once: `json.dumps` with these
options would build a new one per call)."""


def _canonical_bytes(
    session_id: str,
    seq: int,
    at: datetime,
    kind: str,
    clean: Any,
    decision_id: str | None,
) -> bytes:
    """`canonical_event_bytes` of a payload `normalize_json` already returned."""
    return _canonical_text(session_id, seq, at, kind, _canonical_json(clean), decision_id).encode()


def _canonical_text(
    session_id: str, seq: int, at: datetime, kind: str, payload_json: str, decision_id: str | None
) -> str:
    """The canonical event as text, around a payload already in canonical JSON.

    Exactly what the canonical encoder makes of the whole event object, built by hand: the keys
    are written in sorted order (``at`` < ``decision_id`` < ``kind`` < ``payload`` < ``seq`` <
    ``session_id``), so the payload's text is made once and serves the store as well.
    """
    return (
        f'{{"at":"{format_timestamp(at)}","decision_id":{_canonical_json(decision_id)},'
        f'"kind":{_canonical_json(str(kind))},"payload":{payload_json},"seq":{int(seq)},'
        f'"session_id":{_canonical_json(session_id)}}}'
    )


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    """``hex(SHA-256(bytes.fromhex(prev_hash) || canonical))``.

    Raises:
        ValueError: ``prev_hash`` is not hex.
    """
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical).hexdigest()


def seal_event(
    session_id: str,
    seq: int,
    at: datetime,
    kind: str,
    payload: Mapping[str, Any],
    decision_id: str | None,
    prev_hash: str,
    *,
    normalized: bool = False,
) -> RecordedEvent:
    """The event at ``seq`` following ``prev_hash``, with its payload normalised and its hash.

    ``normalized=True`` says ``payload`` is already what `normalize_json` returns (the recorder
    normalises once, when the event is handed in); it is then used as it is.

    Raises:
        ValueError: ``at`` is naive, ``seq`` < 1, or the payload is not JSON-shaped.
    """
    if at.tzinfo is None:
        raise ValueError("event time must be timezone-aware")
    if seq < 1:
        raise ValueError(f"seq starts at 1, got {seq}")
    clean: dict[str, Any] = dict(payload) if normalized else normalize_json(payload)
    payload_json = _canonical_json(clean)
    canonical = _canonical_text(session_id, seq, at, kind, payload_json, decision_id).encode()
    return RecordedEvent(
        session_id=session_id,
        seq=seq,
        at=at.astimezone(UTC),
        kind=str(kind),
        payload=clean,
        prev_hash=prev_hash,
        hash=chain_hash(prev_hash, canonical),
        decision_id=decision_id,
        payload_json=payload_json,
    )


def session_identity(session: SessionRecord) -> dict[str, Any]:
    """The ``session-opened`` payload: the session row's fields the chain vouches for."""
    return {
        "agent_id": session.agent_id,
        "token_jti": session.token_jti,
        "task_id": session.task_id,
        "started_at": format_timestamp(session.started_at),
        "protocol_version": session.protocol_version,
        "transport": session.transport,
        "client_info": normalize_json(session.client_info),
    }


def _recomputed(event: RecordedEvent) -> str | None:
    try:
        canonical = canonical_event_bytes(
            event.session_id, event.seq, event.at, event.kind, event.payload, event.decision_id
        )
        return chain_hash(event.prev_hash, canonical)
    except ValueError:
        return None


def verify_chain(session: SessionRecord, events: Sequence[RecordedEvent]) -> ChainReport:
    """Recompute ``session``'s chain over ``events`` (in the order the store returned them).

    Names the first event that breaks it: the first whose sequence number, link or hash is
    wrong, or the first missing one when the session claims more (``event_count``, a seal) than
    is present. Never raises for bad data.
    """
    prev = genesis_hash(session.id)
    expected = 1
    last_index_of_hash = {e.hash: i for i, e in enumerate(events)}
    last_index_of_seq = {e.seq: i for i, e in enumerate(events)}

    def bad(seq: int, problem: ChainProblem, detail: str) -> ChainReport:
        return ChainReport(session.id, False, expected - 1, prev, seq, problem, detail)

    for i, event in enumerate(events):
        if event.seq < expected:
            return bad(
                expected,
                ChainProblem.REORDERED,
                f"event {event.seq} appears where event {expected} belongs",
            )
        if event.seq > expected:
            if last_index_of_seq.get(expected, -1) > i:
                return bad(
                    expected,
                    ChainProblem.REORDERED,
                    f"event {event.seq} appears before event {expected}",
                )
            return bad(expected, ChainProblem.GAP, f"event {expected} is missing")
        if event.session_id != session.id:
            return bad(expected, ChainProblem.HASH_MISMATCH, "event names another session")
        if event.prev_hash != prev:
            if last_index_of_hash.get(event.prev_hash, -1) > i:
                return bad(
                    expected,
                    ChainProblem.REORDERED,
                    f"event {expected} follows a later event's hash",
                )
            return bad(
                expected,
                ChainProblem.PREV_MISMATCH,
                f"event {expected} does not link to event {expected - 1}",
            )
        if _recomputed(event) != event.hash:
            return bad(
                expected,
                ChainProblem.HASH_MISMATCH,
                f"event {expected}'s content does not match its hash",
            )
        if expected == 1 and (
            event.kind != EventKind.SESSION_OPENED
            or dict(event.payload) != session_identity(session)
        ):
            return bad(
                1,
                ChainProblem.SEAL_MISMATCH,
                "the session row differs from its session-opened event",
            )
        prev = event.hash
        expected += 1

    count = expected - 1

    def end_bad(seq: int, problem: ChainProblem, detail: str) -> ChainReport:
        return ChainReport(session.id, False, count, prev, seq, problem, detail)

    if count == 0:
        return end_bad(1, ChainProblem.TRUNCATED, "the session has no session-opened event")
    if session.event_count > count:
        return end_bad(
            count + 1,
            ChainProblem.TRUNCATED,
            f"the session counts {session.event_count} events but {count} are present",
        )
    last = events[-1]
    if session.head_hash is not None or session.ended_at is not None:
        if last.kind != EventKind.SESSION_CLOSED:
            return end_bad(
                count + 1, ChainProblem.TRUNCATED, "the closed session's session-closed is missing"
            )
        if session.head_hash != prev or last.payload.get("event_count") != count:
            return end_bad(
                count, ChainProblem.SEAL_MISMATCH, "the session's seal does not match its chain"
            )
    return ChainReport(session.id, True, count, prev)
