"""The recorded-event hash chain: canonical bytes, sealing, and verification of every tampering."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.recording import (
    ChainProblem,
    EventKind,
    RecordedEvent,
    SessionRecord,
    canonical_event_bytes,
    chain_hash,
    format_timestamp,
    genesis_hash,
    normalize_json,
    seal_event,
    session_identity,
    verify_chain,
)

T0 = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)


def _session(**changes: Any) -> SessionRecord:
    base = SessionRecord(
        id="sess-1",
        agent_id="agent-1",
        token_jti="jti-1",
        task_id="task-1",
        started_at=T0,
        protocol_version="2025-11-25",
        transport="http",
        client_info={"name": "client", "version": "1.0"},
    )
    return dataclasses.replace(base, **changes)


def _chain(
    session: SessionRecord,
    bodies: Sequence[tuple[str, dict[str, Any], str | None]],
    *,
    close: bool = False,
) -> list[RecordedEvent]:
    events = [
        seal_event(
            session.id,
            1,
            session.started_at,
            EventKind.SESSION_OPENED,
            session_identity(session),
            None,
            genesis_hash(session.id),
        )
    ]
    all_bodies = list(bodies)
    if close:
        all_bodies.append((EventKind.SESSION_CLOSED, {"event_count": len(bodies) + 2}, None))
    for kind, payload, decision_id in all_bodies:
        prev = events[-1]
        events.append(
            seal_event(
                session.id,
                prev.seq + 1,
                prev.at + timedelta(microseconds=7),
                kind,
                payload,
                decision_id,
                prev.hash,
            )
        )
    return events


def _sealed(session: SessionRecord, events: list[RecordedEvent]) -> SessionRecord:
    return dataclasses.replace(
        session,
        ended_at=events[-1].at,
        head_hash=events[-1].hash,
        event_count=len(events),
    )


BODIES: list[tuple[str, dict[str, Any], str | None]] = [
    (
        EventKind.REQUEST,
        {"method": "tools/call", "tool": "files__read", "arguments": {"p": "/a"}},
        None,
    ),
    (EventKind.DECISION, {"allowed": False, "reasons": ["scope-missing"]}, "dec-1"),
    (EventKind.RESULT, {"is_error": True, "excerpt": {"text": "<b>x</b>", "chars": 8}}, "dec-1"),
]


# --- canonical bytes and hashes -------------------------------------------------------------


def test_genesis_is_sha256_of_version_and_session_id() -> None:
    import hashlib

    expected = hashlib.sha256(b"mcp-authz-broker/v1\x00sess-1").hexdigest()
    assert genesis_hash("sess-1") == expected
    assert genesis_hash("sess-2") != expected


def test_canonical_bytes_are_sorted_compact_utf8_json_with_utc_microseconds() -> None:
    at = datetime(2026, 11, 23, 13, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    raw = canonical_event_bytes("s", 3, at, EventKind.REQUEST, {"b": 1, "a": "é<"}, "d")
    assert (
        raw
        == (
            '{"at":"2026-11-23T12:00:00.000000Z","decision_id":"d","kind":"request",'
            '"payload":{"a":"é<","b":1},"seq":3,"session_id":"s"}'
        ).encode()
    )


def test_chain_hash_covers_the_raw_previous_digest_then_the_canonical_bytes() -> None:
    import hashlib

    prev = genesis_hash("s")
    assert chain_hash(prev, b"{}") == hashlib.sha256(bytes.fromhex(prev) + b"{}").hexdigest()


def test_a_known_event_hashes_to_a_pinned_value() -> None:
    event = seal_event("s", 1, T0, "request", {"x": [1, 2.5, None, True]}, None, genesis_hash("s"))
    canonical = canonical_event_bytes("s", 1, T0, "request", {"x": [1, 2.5, None, True]}, None)
    assert event.hash == chain_hash(genesis_hash("s"), canonical)
    # Pinned: changing the canonical form breaks every stored chain, so it must be deliberate.
    assert event.hash == "25cce76b87d27f8b3aea8189ddef75352dbf49281dcbf10315a0c95ced1e8ad4"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, 1),
        (-0.0, 0),
        (1e20, 100000000000000000000),
        (2.5, 2.5),
        ((1, "a"), [1, "a"]),
        ("a\udcffb", "a?b"),
        ({"k\ud800": 1}, {"k?": 1}),
        (T0, "2026-11-23T12:00:00.123456Z"),
        (T0.date(), "2026-11-23"),
        ({"n": None, "b": False}, {"n": None, "b": False}),
    ],
    ids=[
        "integral-float",
        "negative-zero",
        "big-float",
        "fraction",
        "tuple",
        "lone-surrogate",
        "surrogate-key",
        "datetime",
        "date",
        "null-and-bool",
    ],
)
def test_normalize_json_makes_values_that_survive_a_store_round_trip(
    value: object, expected: object
) -> None:
    assert normalize_json(value) == expected


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {1: "a"}, {"a": object()}, b"bytes"],
    ids=["nan", "infinity", "int-key", "object", "bytes"],
)
def test_normalize_json_refuses_what_json_cannot_carry(value: object) -> None:
    with pytest.raises(ValueError, match=r"recorded|cannot record"):
        normalize_json(value)


def test_naive_times_are_read_as_utc() -> None:
    assert format_timestamp(T0.replace(tzinfo=None)) == format_timestamp(T0)


def test_seal_event_refuses_naive_times_and_seq_below_one() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        seal_event("s", 1, T0.replace(tzinfo=None), "request", {}, None, genesis_hash("s"))
    with pytest.raises(ValueError, match="seq starts at 1"):
        seal_event("s", 0, T0, "request", {}, None, genesis_hash("s"))


def test_seal_event_stores_the_normalised_payload_in_utc() -> None:
    at = T0.astimezone(timezone(timedelta(hours=-5)))
    event = seal_event("s", 1, at, EventKind.REQUEST, {"f": 2.0, "t": (1,)}, None, "00" * 32)
    assert event.payload == {"f": 2, "t": [1]}
    assert event.at.utcoffset() == timedelta(0)
    assert event.kind == "request"


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


@given(
    payload=st.dictionaries(st.text(max_size=8), _json_values(), max_size=5),
    at=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
    ),
)
def test_canonical_bytes_are_stable_across_a_json_store_round_trip(
    payload: dict[str, Any], at: datetime
) -> None:
    event = seal_event("s", 1, at, "request", payload, "d", genesis_hash("s"))
    # What a JSON column gives back, and what SQLite gives back for a timestamp (naive UTC).
    stored_payload = json.loads(json.dumps(event.payload))
    stored_at = event.at.replace(tzinfo=None)
    again = canonical_event_bytes("s", 1, stored_at, event.kind, stored_payload, "d")
    assert chain_hash(event.prev_hash, again) == event.hash
    assert normalize_json(stored_payload) == event.payload


@given(
    payload=st.dictionaries(st.text(max_size=8), _json_values(), max_size=5),
    session_id=st.text(max_size=12),
    seq=st.integers(min_value=1, max_value=2**40),
    kind=st.text(max_size=12),
    decision_id=st.none() | st.text(max_size=12),
)
def test_canonical_bytes_are_exactly_the_sorted_compact_json_of_the_event(
    payload: dict[str, Any], session_id: str, seq: int, kind: str, decision_id: str | None
) -> None:
    """The canonical event is built by hand around the payload's text (made once, reused by the
    store): it must be byte for byte what a JSON encoder makes of the whole object."""
    clean = normalize_json(payload)
    expected = json.dumps(
        {
            "session_id": normalize_json(session_id),
            "seq": seq,
            "at": format_timestamp(T0),
            "kind": normalize_json(kind),
            "decision_id": normalize_json(decision_id),
            "payload": clean,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()
    sid, k, did = normalize_json(session_id), normalize_json(kind), normalize_json(decision_id)
    assert canonical_event_bytes(sid, seq, T0, k, payload, did) == expected
    event = seal_event(sid, seq, T0, k, payload, did, genesis_hash("s"))
    assert event.payload_json is not None
    assert json.loads(event.payload_json) == clean
    assert event.hash == chain_hash(genesis_hash("s"), expected)
    again = seal_event(sid, seq, T0, k, clean, did, genesis_hash("s"), normalized=True)
    assert again == event
    assert again.payload_json == event.payload_json


# --- verification ---------------------------------------------------------------------------


def test_an_untouched_open_chain_verifies() -> None:
    session = _session()
    events = _chain(session, BODIES)
    report = verify_chain(session, events)
    assert report.ok
    assert report.checked == 4
    assert report.head_hash == events[-1].hash
    assert report.first_bad_seq is None
    assert report.problem is None


def test_an_untouched_sealed_chain_verifies() -> None:
    events = _chain(_session(), BODIES, close=True)
    report = verify_chain(_sealed(_session(), events), events)
    assert report.ok
    assert report.checked == 5


def _edit(i: int, **changes: Any) -> Callable[[list[RecordedEvent]], list[RecordedEvent]]:
    def apply(events: list[RecordedEvent]) -> list[RecordedEvent]:
        out = list(events)
        out[i] = dataclasses.replace(out[i], **changes)
        return out

    return apply


def _swap(i: int, j: int) -> Callable[[list[RecordedEvent]], list[RecordedEvent]]:
    def apply(events: list[RecordedEvent]) -> list[RecordedEvent]:
        out = list(events)
        out[i], out[j] = out[j], out[i]
        return out

    return apply


def _swap_seq(i: int, j: int) -> Callable[[list[RecordedEvent]], list[RecordedEvent]]:
    """What ``UPDATE events SET seq = ...`` on two rows looks like when read back by seq."""

    def apply(events: list[RecordedEvent]) -> list[RecordedEvent]:
        out = list(events)
        a, b = out[i], out[j]
        out[i] = dataclasses.replace(b, seq=a.seq)
        out[j] = dataclasses.replace(a, seq=b.seq)
        return out

    return apply


def _delete(i: int) -> Callable[[list[RecordedEvent]], list[RecordedEvent]]:
    return lambda events: events[:i] + events[i + 1 :]


TAMPERINGS: list[
    tuple[str, Callable[[list[RecordedEvent]], list[RecordedEvent]], int, ChainProblem]
] = [
    (
        "payload-edited",
        _edit(2, payload={"allowed": True, "reasons": []}),
        3,
        ChainProblem.HASH_MISMATCH,
    ),
    ("kind-edited", _edit(1, kind="notification"), 2, ChainProblem.HASH_MISMATCH),
    ("time-edited", _edit(3, at=T0), 4, ChainProblem.HASH_MISMATCH),
    ("decision-id-edited", _edit(2, decision_id="dec-2"), 3, ChainProblem.HASH_MISMATCH),
    ("hash-edited", _edit(1, hash="ab" * 32), 2, ChainProblem.HASH_MISMATCH),
    ("session-id-edited", _edit(1, session_id="sess-2"), 2, ChainProblem.HASH_MISMATCH),
    ("prev-edited", _edit(2, prev_hash="cd" * 32), 3, ChainProblem.PREV_MISMATCH),
    ("non-json-payload", _edit(2, payload={"x": float("nan")}), 3, ChainProblem.HASH_MISMATCH),
    ("middle-deleted", _delete(1), 2, ChainProblem.GAP),
    ("first-deleted", _delete(0), 1, ChainProblem.GAP),
    ("rows-swapped", _swap(1, 2), 2, ChainProblem.REORDERED),
    ("seqs-swapped", _swap_seq(1, 2), 2, ChainProblem.REORDERED),
    ("seq-lowered", _edit(2, seq=2), 3, ChainProblem.REORDERED),
    ("seq-raised", _edit(2, seq=9), 3, ChainProblem.GAP),
    ("duplicated", lambda e: e[:2] + e[1:], 3, ChainProblem.REORDERED),
]


@pytest.mark.parametrize(
    ("tamper", "bad_seq", "problem"),
    [t[1:] for t in TAMPERINGS],
    ids=[t[0] for t in TAMPERINGS],
)
def test_tampering_with_an_open_chain_names_the_first_bad_event(
    tamper: Callable[[list[RecordedEvent]], list[RecordedEvent]],
    bad_seq: int,
    problem: ChainProblem,
) -> None:
    session = _session()
    events = _chain(session, BODIES)
    report = verify_chain(session, tamper(events))
    assert not report.ok
    assert report.first_bad_seq == bad_seq
    assert report.problem == problem
    assert report.checked == bad_seq - 1
    assert report.detail


@pytest.mark.parametrize(
    ("change", "problem", "bad_seq"),
    [
        ({"agent_id": "agent-2"}, ChainProblem.SEAL_MISMATCH, 1),
        ({"started_at": T0 + timedelta(seconds=1)}, ChainProblem.SEAL_MISMATCH, 1),
        ({"head_hash": "ef" * 32}, ChainProblem.SEAL_MISMATCH, 5),
        ({"head_hash": None}, ChainProblem.SEAL_MISMATCH, 5),
        ({"event_count": 6}, ChainProblem.TRUNCATED, 6),
    ],
    ids=["agent-edited", "start-edited", "seal-edited", "seal-removed", "count-raised"],
)
def test_editing_the_session_row_is_detected(
    change: dict[str, Any], problem: ChainProblem, bad_seq: int
) -> None:
    events = _chain(_session(), BODIES, close=True)
    session = dataclasses.replace(_sealed(_session(), events), **change)
    report = verify_chain(session, events)
    assert (report.ok, report.problem, report.first_bad_seq) == (False, problem, bad_seq)


def test_a_first_event_that_is_not_session_opened_is_a_seal_mismatch() -> None:
    session = _session()
    event = seal_event(session.id, 1, T0, EventKind.REQUEST, {}, None, genesis_hash(session.id))
    report = verify_chain(session, [event])
    assert (report.problem, report.first_bad_seq) == (ChainProblem.SEAL_MISMATCH, 1)


def test_a_session_with_no_events_is_truncated_at_one() -> None:
    report = verify_chain(_session(), [])
    assert (report.ok, report.problem, report.first_bad_seq) == (False, ChainProblem.TRUNCATED, 1)
    assert report.head_hash == genesis_hash("sess-1")


def test_cutting_the_tail_of_a_sealed_session_is_truncation_at_the_first_missing_event() -> None:
    events = _chain(_session(), BODIES, close=True)
    session = dataclasses.replace(_sealed(_session(), events), event_count=0)
    report = verify_chain(session, events[:3])
    assert (report.problem, report.first_bad_seq) == (ChainProblem.TRUNCATED, 4)


def test_a_closing_count_that_disagrees_is_a_seal_mismatch() -> None:
    session = _session()
    events = _chain(session, [(EventKind.SESSION_CLOSED, {"event_count": 7}, None)])
    report = verify_chain(_sealed(session, events), events)
    assert (report.problem, report.first_bad_seq) == (ChainProblem.SEAL_MISMATCH, 2)


# --- property: every single edit, deletion, reorder and truncation is found -----------------

_bodies = st.lists(
    st.tuples(
        st.sampled_from(
            [
                k.value
                for k in EventKind
                if k not in {EventKind.SESSION_OPENED, EventKind.SESSION_CLOSED}
            ]
        ),
        st.dictionaries(st.text(max_size=6), _json_values(), max_size=3),
        st.none() | st.text(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=8,
)


def _differs(old: object, new: object) -> bool:
    return normalize_json(old) != normalize_json(new)


@settings(max_examples=300)
@given(bodies=_bodies, data=st.data())
def test_every_single_field_edit_is_detected_at_that_event(
    bodies: list[tuple[str, dict[str, Any], str | None]], data: st.DataObject
) -> None:
    session = _session()
    events = _chain(session, bodies)
    i = data.draw(st.integers(0, len(events) - 1), label="index")
    target = events[i]
    name = data.draw(
        st.sampled_from(
            ["session_id", "seq", "at", "kind", "payload", "prev_hash", "hash", "decision_id"]
        ),
        label="field",
    )
    new: Any
    if name == "seq":
        new = data.draw(st.integers(-3, 20).filter(lambda s: s != target.seq))
    elif name == "at":
        new = target.at + timedelta(microseconds=data.draw(st.integers(1, 10**9)))
    elif name in {"prev_hash", "hash"}:
        new = data.draw(st.binary(min_size=32, max_size=32)).hex()
    elif name == "payload":
        new = data.draw(
            st.dictionaries(st.text(max_size=6), _json_values(), max_size=3).filter(
                lambda p: _differs(p, target.payload)
            )
        )
    elif name == "decision_id":
        new = data.draw((st.none() | st.text(max_size=6)).filter(lambda d: d != target.decision_id))
    else:
        new = data.draw(st.text(max_size=12).filter(lambda v: v != getattr(target, name)))
    tampered = list(events)
    tampered[i] = dataclasses.replace(target, **{name: new})
    report = verify_chain(session, tampered)
    assert not report.ok
    assert report.first_bad_seq == target.seq


@settings(max_examples=200)
@given(bodies=_bodies, data=st.data())
def test_every_deletion_reorder_and_truncation_is_detected_at_the_first_bad_event(
    bodies: list[tuple[str, dict[str, Any], str | None]], data: st.DataObject
) -> None:
    open_session = _session()
    events = _chain(open_session, bodies, close=True)
    session = _sealed(open_session, events)
    n = len(events)
    what = data.draw(st.sampled_from(["delete", "swap", "swap-seq", "truncate"]))
    if what == "delete":
        i = data.draw(st.integers(0, n - 1))
        tampered, first_bad = events[:i] + events[i + 1 :], i + 1
    elif what == "truncate":
        keep = data.draw(st.integers(0, n - 1))
        tampered, first_bad = events[:keep], keep + 1
    else:
        i = data.draw(st.integers(0, n - 2))
        j = data.draw(st.integers(i + 1, n - 1))
        tampered = (_swap(i, j) if what == "swap" else _swap_seq(i, j))(events)
        first_bad = i + 1
    report = verify_chain(session, tampered)
    assert not report.ok
    assert report.first_bad_seq == first_bad
    if what in {"swap", "swap-seq"}:
        assert report.problem == ChainProblem.REORDERED
