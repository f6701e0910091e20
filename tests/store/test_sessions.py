from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.core.recording import RecordedEvent, SessionRecord
from broker.errors import NotFound
from broker.store import Conflict, SqlStore, open_store

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
GENESIS = "0" * 64


def session(sid: str, *, agent: str = "ag_a", task: str = "t1", start: int = 0) -> SessionRecord:
    return SessionRecord(
        id=sid,
        agent_id=agent,
        token_jti=f"jti-{sid}",
        task_id=task,
        started_at=T0 + timedelta(minutes=start),
        protocol_version="2025-11-25",
        transport="http",
        client_info={"name": "claude", "version": "1.0"},
    )


def chain(
    sid: str, count: int, *, first_seq: int = 1, prev: str = GENESIS, decision: str | None = None
) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    for seq in range(first_seq, first_seq + count):
        payload: dict[str, Any] = {"method": "tools/call", "n": seq, "args": {"path": "/srv/ä"}}
        digest = hashlib.sha256((prev + json.dumps([sid, seq, payload])).encode()).hexdigest()
        events.append(
            RecordedEvent(
                session_id=sid,
                seq=seq,
                at=T0 + timedelta(seconds=seq),
                kind="call",
                payload=payload,
                prev_hash=prev,
                hash=digest,
                decision_id=decision and f"{decision}-{seq}",
            )
        )
        prev = digest
    return events


async def seqs(store: SqlStore, sid: str) -> Sequence[int]:
    return [e.seq for e in await store.session_events(sid)]


async def test_an_opened_session_reads_back_equal_and_has_no_head(store: SqlStore) -> None:
    record = replace(session("s1"), flags=("canary",))
    await store.open_session(record)
    assert await store.get_session("s1") == record
    assert await store.session_head("s1") is None
    with pytest.raises(Conflict):
        await store.open_session(record)
    with pytest.raises(NotFound):
        await store.get_session("s9")
    with pytest.raises(NotFound):
        await store.session_head("s9")


async def test_a_batch_across_sessions_is_appended_and_read_back_in_order(
    store: SqlStore,
) -> None:
    await store.open_session(session("s1"))
    await store.open_session(session("s2"))
    one, two = chain("s1", 3), chain("s2", 2)
    await store.append_events([one[0], two[0], one[1], two[1], one[2]])
    assert await store.session_events("s1") == one
    assert await store.session_events("s2") == two
    assert await store.session_head("s1") == (3, one[-1].hash)
    assert (await store.get_session("s1")).event_count == 3
    assert await store.session_events("s1", after_seq=1, limit=1) == one[1:2]
    more = chain("s1", 2, first_seq=4, prev=one[-1].hash)
    await store.append_events(more)
    assert await seqs(store, "s1") == [1, 2, 3, 4, 5]
    assert await store.session_head("s1") == (5, more[-1].hash)


async def test_a_batch_repeating_a_recorded_seq_writes_nothing(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    await store.open_session(session("s2"))
    first = chain("s1", 2)
    await store.append_events(first)
    fork = chain("s1", 1, first_seq=2, prev=first[0].hash)[0]
    fork = replace(fork, hash="f" * 64)
    with pytest.raises(Conflict):
        await store.append_events([*chain("s2", 2), fork])
    assert await seqs(store, "s2") == []
    assert await store.session_head("s2") is None
    assert await store.session_events("s1") == first


async def test_a_batch_with_the_same_seq_twice_writes_nothing(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    events = chain("s1", 2)
    with pytest.raises(Conflict):
        await store.append_events([events[0], events[0], events[1]])
    assert await seqs(store, "s1") == []


async def test_a_chain_cannot_skip_a_seq_or_break_its_hash_link(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    first = chain("s1", 2)
    await store.append_events(first)
    with pytest.raises(Conflict):
        await store.append_events(chain("s1", 1, first_seq=4, prev=first[-1].hash))
    with pytest.raises(Conflict):
        await store.append_events(chain("s1", 1, first_seq=3, prev="e" * 64))
    assert await store.session_head("s1") == (2, first[-1].hash)


async def test_events_for_an_unknown_or_sealed_session_are_refused(store: SqlStore) -> None:
    with pytest.raises(Conflict):
        await store.append_events(chain("ghost", 1))
    await store.open_session(session("s1"))
    first = chain("s1", 1)
    await store.append_events(first)
    await store.close_session("s1", T0 + timedelta(hours=1), first[-1].hash)
    with pytest.raises(Conflict):
        await store.append_events(chain("s1", 1, first_seq=2, prev=first[-1].hash))


async def test_closing_seals_with_the_last_hash_once(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    events = chain("s1", 2)
    await store.append_events(events)
    end = T0 + timedelta(hours=1)
    with pytest.raises(Conflict):
        await store.close_session("s1", end, events[0].hash)
    await store.close_session("s1", end, events[-1].hash)
    await store.close_session("s1", end, events[-1].hash)
    sealed = await store.get_session("s1")
    assert (sealed.ended_at, sealed.head_hash, sealed.event_count) == (end, events[-1].hash, 2)
    with pytest.raises(Conflict):
        await store.close_session("s1", end, "d" * 64)
    with pytest.raises(NotFound):
        await store.close_session("s9", end, "d" * 64)


async def test_an_event_is_found_by_its_decision_id(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    events = chain("s1", 3, decision="dec")
    await store.append_events(events)
    assert await store.find_event_by_decision("dec-2") == events[1]
    with pytest.raises(NotFound):
        await store.find_event_by_decision("dec-9")


async def test_flags_are_added_once_and_filter_the_listing(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    await store.open_session(session("s2", start=1))
    flagged = await store.flag_session("s1", "exfiltration")
    again = await store.flag_session("s1", "exfiltration")
    both = await store.flag_session("s1", "canary")
    assert flagged.flags == again.flags == ("exfiltration",)
    assert both.flags == ("exfiltration", "canary")
    assert [s.id for s in await store.list_sessions(flagged=True)] == ["s1"]
    assert [s.id for s in await store.list_sessions(flagged=False)] == ["s2"]
    with pytest.raises(NotFound):
        await store.flag_session("s9", "x")


async def test_sessions_are_listed_newest_first_with_filters_and_paging(
    store: SqlStore,
) -> None:
    await store.open_session(session("s1", agent="ag_a", task="t1", start=0))
    await store.open_session(session("s2", agent="ag_b", task="t1", start=10))
    await store.open_session(session("s3", agent="ag_a", task="t2", start=20))

    async def ids(**filters: Any) -> list[str]:
        return [s.id for s in await store.list_sessions(**filters)]

    assert await ids() == ["s3", "s2", "s1"]
    assert await ids(agent_id="ag_a") == ["s3", "s1"]
    assert await ids(task_id="t1") == ["s2", "s1"]
    assert await ids(since=T0 + timedelta(minutes=10)) == ["s3", "s2"]
    assert await ids(until=T0 + timedelta(minutes=10)) == ["s1"]
    assert await ids(limit=1, offset=1) == ["s2"]


async def test_two_writers_racing_for_the_same_seq_cannot_fork_the_chain(store_url: str) -> None:
    writers = [open_store(store_url) for _ in range(2)]
    await writers[0].migrate()
    try:
        await writers[0].open_session(session("s1"))
        rivals = [chain("s1", 3, prev=GENESIS), chain("s1", 3, prev="a" * 64)]
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(
                *(w.append_events(c) for w, c in zip(writers, rivals, strict=True)),
                return_exceptions=True,
            )
        assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "NoneType"]
        winner = rivals[outcomes.index(None)]
        assert await writers[1].session_events("s1") == winner
    finally:
        for w in writers:
            await w.aclose()


async def test_the_decision_event_is_found_before_a_signal_recorded_under_the_same_id(
    store: SqlStore,
) -> None:
    await store.open_session(session("s1"))
    signal, decision, result = chain("s1", 3)
    events = [
        replace(signal, kind="detector-signal", decision_id="dec-x"),
        replace(decision, kind="decision", decision_id="dec-x"),
        replace(result, kind="result", decision_id="dec-x"),
    ]
    await store.append_events(events)
    assert await store.find_event_by_decision("dec-x") == events[1]
