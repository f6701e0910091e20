"""Event appends on the appender's own connection: stored as the ORM stores, all or nothing,
concurrent, and written again once a database that failed comes back. Real databases only."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from broker.core.recording import RecordedEvent, SessionRecord
from broker.errors import StoreUnavailable
from broker.store import Conflict, SqlStore, open_store
from broker.store.testing import can_make_unwritable, migrated_store, sqlite_url, unwritable

T0 = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
GENESIS = "0" * 64
PAYLOAD: dict[str, Any] = {
    "method": "tools/call",
    "params": {"name": "read", "arguments": {"path": "/srv/ä €", "n": [1, 2.5, None, True]}},
    "z": {"b": 1, "a": 2},
}


def session(sid: str) -> SessionRecord:
    return SessionRecord(
        id=sid,
        agent_id="ag_a",
        token_jti=f"jti-{sid}",
        task_id="t1",
        started_at=T0,
        protocol_version="2025-11-25",
        transport="http",
        client_info=PAYLOAD,
    )


def chain(
    sid: str, count: int, *, first_seq: int = 1, prev: str = GENESIS, at: datetime = T0
) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    for seq in range(first_seq, first_seq + count):
        payload = {**PAYLOAD, "seq": seq}
        digest = hashlib.sha256((prev + json.dumps([sid, seq, payload])).encode()).hexdigest()
        events.append(
            RecordedEvent(
                session_id=sid,
                seq=seq,
                at=at,
                kind="decision",
                payload=payload,
                prev_hash=prev,
                hash=digest,
                decision_id=f"dec-{sid}-{seq}" if seq % 2 else None,
            )
        )
        prev = digest
    return events


async def test_appended_events_read_back_equal_and_stored_as_the_orm_stores(
    store: SqlStore,
) -> None:
    await store.open_session(session("s1"))
    local = T0.astimezone(timezone(timedelta(hours=2)))
    events = chain("s1", 3, at=local)
    await store.append_events(events[:1])
    await store.append_events(events[1:])

    assert await store.session_events("s1") == events
    assert await store.find_event_by_decision("dec-s1-3") == events[2]
    assert all(e.at.tzinfo == UTC for e in await store.session_events("s1"))
    assert await store.session_head("s1") == (3, events[2].hash)
    assert (await store.get_session("s1")).event_count == 3
    # Stored as the ORM path stores: the instant as the session's start (written by the ORM
    # path) is, and the payload as SQLAlchemy's JSON serialiser writes it, byte for byte.
    at, started, payload, info = await _raw_representations(store, "s1")
    assert at == started
    assert payload == json.dumps({**PAYLOAD, "seq": 1})
    if store.dialect == "sqlite":
        assert info == json.dumps(PAYLOAD)


async def test_concurrent_batches_from_many_sessions_all_commit_in_order(
    store: SqlStore,
) -> None:
    sids = [f"s{n}" for n in range(8)]
    for sid in sids:
        await store.open_session(session(sid))
    chains = {sid: chain(sid, 12) for sid in sids}

    async def one_session(sid: str) -> None:
        for event in chains[sid][:6]:
            await store.append_events([event])

    async with asyncio.timeout(30):
        await asyncio.gather(*(one_session(sid) for sid in sids))
        # Then batches spanning every session, raced against each other.
        await asyncio.gather(
            store.append_events([e for sid in sids[:4] for e in chains[sid][6:]]),
            store.append_events([e for sid in sids[4:] for e in chains[sid][6:]]),
        )
    for sid in sids:
        assert await store.session_events(sid) == chains[sid]
        assert await store.session_head(sid) == (12, chains[sid][-1].hash)


async def test_a_batch_forking_one_session_is_refused_whole_and_names_it(
    store: SqlStore,
) -> None:
    await store.open_session(session("s1"))
    await store.open_session(session("s2"))
    first = chain("s1", 2)
    await store.append_events(first)
    fork = replace(first[1], payload={"forked": True}, hash="f" * 64)
    innocent = chain("s2", 2)

    with pytest.raises(Conflict, match="'s1' from seq 2"):
        await store.append_events([*innocent, fork])
    assert await store.session_events("s2") == []
    assert await store.session_events("s1") == first

    await store.append_events(innocent)
    assert await store.session_events("s2") == innocent


async def test_a_sealed_session_refuses_appends_on_the_fast_path(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    first = chain("s1", 1)
    await store.append_events(first)
    await store.close_session("s1", T0, first[0].hash)
    with pytest.raises(Conflict, match="sealed"):
        await store.append_events(chain("s1", 1, first_seq=2, prev=first[0].hash))
    assert await store.session_events("s1") == first


async def test_write_ahead_appends_are_written_guarded_and_read_back_like_durable_ones(
    store: SqlStore,
) -> None:
    await store.open_session(session("s1"))
    events = chain("s1", 4)
    await store.append_events(events[:1], durable=False)
    await store.append_events(events[1:2])
    await store.append_events(events[2:4], durable=False)
    fork = replace(events[3], payload={"forked": True}, hash="f" * 64)
    with pytest.raises(Conflict, match="'s1' from seq 4"):
        await store.append_events([fork], durable=False)

    # Read on the store's pool, not on the appender's connection that wrote them.
    assert await store.session_events("s1") == events
    assert await store.session_head("s1") == (4, events[3].hash)


async def test_a_naive_timestamp_is_refused_before_anything_is_written(store: SqlStore) -> None:
    await store.open_session(session("s1"))
    naive = chain("s1", 1, at=datetime(2026, 11, 23, 12, 0))
    with pytest.raises(ValueError, match="aware"):
        await store.append_events(naive)
    good = chain("s1", 1)
    await store.append_events(good)
    assert await store.session_events("s1") == good


async def test_appends_fail_while_the_database_cannot_be_written_and_resume_after(
    store_url: str, tmp_path: Path
) -> None:
    if not can_make_unwritable(store_url, tmp_path):
        pytest.skip("chattr +i is not available here")
    async with migrated_store(store_url) as store:
        await store.open_session(session("s1"))
        events = chain("s1", 3)
        await store.append_events(events[:1])
        async with unwritable(store_url):
            # A write-ahead append is refused like a durable one: it is written, only not synced.
            for durable in (True, False, True):
                with pytest.raises(StoreUnavailable) as caught:
                    await store.append_events(events[1:2], durable=durable)
                assert caught.value.__cause__ is not None
        async with asyncio.timeout(30):
            await store.append_events(events[1:2])
            await store.append_events(events[2:])
        assert await store.session_events("s1") == events


async def test_a_store_closed_after_appending_can_append_again(store_url: str) -> None:
    store = open_store(store_url)
    try:
        await store.migrate()
        await store.open_session(session("s1"))
        events = chain("s1", 2)
        await store.append_events(events[:1])
        await store.aclose()
        await store.append_events(events[1:])
        assert await store.session_events("s1") == events
    finally:
        await store.aclose()


# -- helpers ----------------------------------------------------------------------------------


async def _raw_representations(store: SqlStore, sid: str) -> tuple[Any, Any, str, str]:
    """``events.at``, ``sessions.started_at``, ``events.payload`` and ``sessions.client_info`` of
    ``sid``'s first event, read by the driver alone (no SQLAlchemy type processing)."""
    if store.dialect == "sqlite":
        return await asyncio.to_thread(_sqlite_raw, store, sid)
    conn = await asyncpg.connect(_libpq(store))
    try:
        row = await conn.fetchrow(
            "SELECT e.at, s.started_at, e.payload::text AS payload, s.client_info::text AS info "
            "FROM events e JOIN sessions s ON s.id = e.session_id "
            "WHERE e.session_id = $1 AND e.seq = 1",
            sid,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["at"], row["started_at"], row["payload"], row["info"]


def _sqlite_raw(store: SqlStore, sid: str) -> tuple[Any, Any, str, str]:
    path = _database(store)
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT e.at, s.started_at, e.payload, s.client_info "
            "FROM events e JOIN sessions s ON s.id = e.session_id "
            "WHERE e.session_id = ? AND e.seq = 1",
            (sid,),
        ).fetchone()
    finally:
        conn.close()
    return row[0], row[1], row[2], row[3]


def _database(store: SqlStore) -> str:
    return str(store._engine.url.database)  # pyright: ignore[reportPrivateUsage]


def _libpq(store: SqlStore) -> str:
    url = store._engine.url  # pyright: ignore[reportPrivateUsage]
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.mark.parametrize("durable", [False, True])
async def test_an_append_on_the_loop_waits_off_it_while_another_connection_holds_the_lock(
    tmp_path: Path, durable: bool
) -> None:
    async with migrated_store(sqlite_url(tmp_path)) as store:
        await store.open_session(session("s1"))
        events = chain("s1", 2)
        await store.append_events(events[:1], durable=durable, alone=True)
        holder = sqlite3.connect(_database(store), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        done = anyio.Event()

        async def append() -> None:
            await store.append_events(events[1:], durable=durable, alone=True)
            done.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(append)
                # The loop is not stuck in SQLite's busy wait: the append waits on its thread.
                await anyio.wait_all_tasks_blocked()
                assert not done.is_set()
                holder.execute("COMMIT")
        holder.close()
        assert await store.session_events("s1") == events


async def test_the_wal_is_checkpointed_off_the_loop_as_appends_go_on(tmp_path: Path) -> None:
    async with migrated_store(sqlite_url(tmp_path)) as store:
        await store.open_session(session("s1"))
        events = chain("s1", 1200)
        wal = anyio.Path(_database(store) + "-wal")
        await store.append_events(events[:1], alone=True)
        for event in events[1:101]:
            await store.append_events([event], alone=True)
        per_hundred = (await wal.stat()).st_size
        for event in events[101:]:
            await store.append_events([event], durable=False)
        # Without checkpoints the log would hold all 1200 commits; restarted after each one, it
        # stays near what a few hundred need.
        assert (await wal.stat()).st_size < 6 * per_hundred
        assert await store.session_head("s1") == (1200, events[-1].hash)
