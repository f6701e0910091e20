"""The recorder on real SQLite and PostgreSQL: group commit, durability, failure, resumption."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from broker.core.recording import EventKind, verify_chain
from broker.core.redaction import Redactor
from broker.errors import NotFound, StoreUnavailable
from broker.recorder import Recorder
from broker.store import SqlStore
from broker.store.errors import Conflict
from broker.store.testing import (
    can_make_unwritable,
    migrated_store,
    sqlite_url,
    temporary_postgres_url,
    unwritable,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2


class SteppingClock:
    """Each reading is one millisecond after the last: distinct, ordered event times."""

    def __init__(self) -> None:
        self._now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        self._now += timedelta(milliseconds=1)
        return self._now


class NaiveClock:
    def now(self) -> datetime:
        return datetime(2026, 11, 23, 12, 0)


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        async with temporary_postgres_url() as url:
            yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    async with migrated_store(store_url) as s:
        yield s


def _recorder(store: SqlStore, **options: Any) -> Recorder:
    return Recorder(store, clock=SteppingClock(), redactor=Redactor(b"r" * 32), **options)


async def _open(recorder: Recorder, n: int = 0) -> str:
    handle = await recorder.open_session(
        agent_id=f"ag_{n}", token_jti=f"jti-{n}", task_id=f"task-{n}", transport="http"
    )
    return handle.id


async def _verified(store: SqlStore, session_id: str) -> int:
    session = await store.get_session(session_id)
    events = await store.session_events(session_id)
    report = verify_chain(session, events)
    assert report.ok, report
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    return len(events)


async def test_concurrent_sessions_get_every_event_recorded_gapless_and_verifiable(
    store: SqlStore,
) -> None:
    sessions, per_session = 16, 20
    async with _recorder(store) as recorder:
        ids = [await _open(recorder, n) for n in range(sessions)]

        async def drive(session_id: str) -> None:
            for i in range(per_session):
                await recorder.record(session_id, EventKind.REQUEST, {"i": i}, f"{session_id}-{i}")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for sid in ids:
                    tg.start_soon(drive, sid)
        for sid in ids[:4]:
            await recorder.close_session(sid)
        stats = recorder.stats
    for sid in ids:
        count = await _verified(store, sid)
        assert count == per_session + 1 + (sid in ids[:4])
        events = await store.session_events(sid)
        assert [e.payload["i"] for e in events if e.kind == EventKind.REQUEST] == list(
            range(per_session)
        )
    assert stats.events == sessions * (per_session + 1) + 4
    # Group commit: concurrent callers shared transactions.
    assert stats.batches < stats.events
    assert stats.largest_batch > 1


async def test_an_event_is_readable_through_another_connection_when_record_returns(
    store: SqlStore, store_url: str
) -> None:
    async with _recorder(store) as recorder:
        sid = await _open(recorder)
        event = await recorder.record(sid, EventKind.DECISION, {"allowed": False}, "dec-1")
        async with migrated_store(store_url) as other:
            found = await other.find_event_by_decision("dec-1")
    assert found == event


class FlushSpy:
    """The real store, noting for each append whether it was asked to be durable."""

    def __init__(self, inner: SqlStore) -> None:
        self.inner = inner
        self.appends: list[tuple[bool, list[bool]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def append_events(
        self, events: Any, *, durable: bool = True, alone: bool = False
    ) -> None:
        await self.inner.append_events(events, durable=durable, alone=alone)
        self.appends.append((durable, [bool(e.payload.get("durable", True)) for e in events]))


async def test_a_batch_is_flushed_whenever_any_event_in_it_asks_to_be_durable(
    store: SqlStore,
) -> None:
    spy = FlushSpy(store)
    async with Recorder(spy, clock=SteppingClock(), redactor=Redactor(b"r" * 32)) as recorder:  # pyright: ignore[reportArgumentType]
        sid = await _open(recorder)

        async def one(durable: bool) -> None:
            await recorder.record(sid, "request", {"durable": durable}, durable=durable)

        await one(False)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                # The first commits alone (the recorder is idle) and, being durable, waits for
                # the disk: the rest queue behind it and share the next batch.
                for durable in (True, False, False, True, False, False):
                    tg.start_soon(one, durable)
    events = [(d, flags) for d, flags in spy.appends if flags != [True]]  # not the opening
    assert events[0] == (False, [False])
    assert all(durable == any(flags) for durable, flags in events)
    assert any(len(set(flags)) == 2 for _, flags in events), "no batch mixed both kinds"
    assert await _verified(store, sid) == 8


async def test_events_queued_at_shutdown_are_committed_before_exit(store: SqlStore) -> None:
    results: list[int] = []
    async with _recorder(store) as recorder:
        sid = await _open(recorder)

        async def one(i: int) -> None:
            results.append((await recorder.record(sid, "request", {"i": i})).seq)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
    assert sorted(results) == list(range(2, 12))
    assert await _verified(store, sid) == 11


async def test_a_resumed_session_continues_its_chain_in_a_new_recorder(store: SqlStore) -> None:
    async with _recorder(store) as first:
        sid = await _open(first)
        await first.record(sid, "request", {"n": 1})
    async with _recorder(store) as second:
        handle = await second.resume_session(sid)
        event = await handle.record("request", {"n": 2})
        closed = await handle.close("agent disconnected")
    assert event.seq == 3
    assert closed.seq == 4
    assert closed.payload == {"event_count": 4, "reason": "agent disconnected"}
    session = await store.get_session(sid)
    assert session.head_hash == closed.hash
    assert session.ended_at == closed.at
    assert await _verified(store, sid) == 4


async def test_two_recorders_writing_one_session_never_fork_it(store: SqlStore) -> None:
    async with _recorder(store) as a, _recorder(store) as b:
        sid = await _open(a)
        other = await _open(b, 2)
        await b.record(sid, "request", {"by": "b"})  # a's cached head is now stale
        with pytest.raises(Conflict):
            await a.record(sid, "request", {"by": "a", "stale": True})
        # a reloads the head after the conflict and continues the one chain.
        event = await a.record(sid, "request", {"by": "a", "again": True})
        assert event.seq == 3
        # Now b is stale; its conflict does not sink other sessions batched with it.
        async with anyio.create_task_group() as tg:
            tg.start_soon(_expect_conflict, b, sid)
            tg.start_soon(b.record, other, "request", {"with": "conflict"})
    assert await _verified(store, sid) == 3
    assert await _verified(store, other) == 2


async def _expect_conflict(recorder: Recorder, sid: str) -> None:
    with pytest.raises(Conflict):
        await recorder.record(sid, "request", {"stale": True})


async def test_a_closed_session_refuses_further_events(store: SqlStore) -> None:
    async with _recorder(store) as recorder:
        handle = await recorder.open_session(agent_id="ag", token_jti="j", task_id="t")
        sid = handle.id

        async def late() -> None:
            with pytest.raises(Conflict, match=r"closed|sealed"):
                await recorder.record(sid, "request", {"late": True})

        # Queued behind the close: refused, not appended after the seal (by the recorder, or,
        # once the seal is written, by the store's guard).
        async with anyio.create_task_group() as tg:
            tg.start_soon(handle.close)
            tg.start_soon(late)
        with pytest.raises(Conflict):
            await recorder.record(sid, "request", {"later": True})
        assert (await handle.close()).kind == EventKind.SESSION_CLOSED
    assert await _verified(store, sid) == 2


async def test_secrets_never_reach_the_database(store: SqlStore, store_url: str) -> None:
    async with _recorder(store) as recorder:
        handle = await recorder.open_session(
            agent_id="ag", token_jti="j", task_id="t", client_info={"api_key": GITHUB}
        )
        await handle.record(
            "request",
            {"arguments": {"token": "hunter2-secret", "note": f"use {GITHUB} <b>now</b>"}},
        )
    engine = create_async_engine(store_url)
    try:
        async with engine.connect() as conn:
            events = (await conn.execute(text("SELECT payload FROM events"))).scalars().all()
            sessions = (await conn.execute(text("SELECT client_info FROM sessions"))).all()
    finally:
        await engine.dispose()
    dump = repr(events) + repr(sessions)
    assert GITHUB not in dump
    assert "hunter2-secret" not in dump
    assert "<b>now</b>" in dump  # recorded text is data: stored as given, not escaped
    assert await _verified(store, handle.id) == 2


async def test_recording_into_an_unknown_session_is_not_found(store: SqlStore) -> None:
    async with _recorder(store) as recorder:
        with pytest.raises(NotFound):
            await recorder.record("ses_nope", "request", {})


async def test_reserved_kinds_bad_payloads_and_naive_clocks_are_refused_before_queueing(
    store: SqlStore,
) -> None:
    async with _recorder(store) as recorder:
        sid = await _open(recorder)
        with pytest.raises(ValueError, match="written by"):
            await recorder.record(sid, EventKind.SESSION_CLOSED, {})
        with pytest.raises(ValueError, match="finite"):
            await recorder.record(sid, "request", {"x": float("nan")})
    async with Recorder(store, clock=NaiveClock(), redactor=Redactor(b"r" * 32)) as naive:
        with pytest.raises(ValueError, match="aware"):
            await naive.record(sid, "request", {})
    assert await _verified(store, sid) == 1


async def test_a_recorder_that_is_not_running_refuses_to_record(store: SqlStore) -> None:
    recorder = _recorder(store)
    with pytest.raises(StoreUnavailable, match="not running"):
        await recorder.record("s", "request", {})
    async with recorder:
        pass
    with pytest.raises(StoreUnavailable):
        await recorder.record("s", "request", {})


def test_nonsense_options_are_refused(tmp_path: Path) -> None:
    from broker.store import open_store

    store = open_store(sqlite_url(tmp_path))
    with pytest.raises(ValueError, match="batch_max"):
        _recorder(store, batch_max=0)
    with pytest.raises(ValueError, match="flush_interval"):
        _recorder(store, flush_interval=-1)


# --- a real store failure mid-run ----------------------------------------------------------


async def test_a_store_that_cannot_write_fails_every_waiter_loses_nothing_and_recovers(
    store: SqlStore, store_url: str, tmp_path: Path
) -> None:
    if not can_make_unwritable(store_url, tmp_path):
        pytest.skip("chattr +i is not available here")
    async with _recorder(store) as recorder:
        ids = [await _open(recorder, n) for n in range(4)]
        before = [await recorder.record(sid, "request", {"phase": "before"}) for sid in ids]
        failures: list[BaseException] = []

        async def refused(sid: str, i: int) -> None:
            try:
                await recorder.record(sid, "request", {"phase": "down", "i": i})
            except StoreUnavailable as exc:
                failures.append(exc)

        async with unwritable(store_url):
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for sid in ids:
                        for i in range(3):
                            tg.start_soon(refused, sid, i)
            assert len(failures) == 12
            assert recorder.stats.failed_events >= 1

        with anyio.fail_after(30):
            after = [await recorder.record(sid, "request", {"phase": "after"}) for sid in ids]
            await recorder.close_session(ids[0])
    for sid, b, a in zip(ids, before, after, strict=True):
        events = await store.session_events(sid)
        assert events[1] == b
        assert a.seq == b.seq + 1
        assert a.prev_hash == b.hash
        assert [e.payload.get("phase") for e in events[1:3]] == ["before", "after"]
        await _verified(store, sid)


async def test_a_caller_cancelled_while_its_event_commits_leaves_it_recorded_and_the_chain_whole(
    store: SqlStore,
) -> None:
    async with _recorder(store) as recorder:
        sid = await _open(recorder)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                # The recorder is idle, so this caller commits its own event (on the store's
                # thread for a flushed one): cancelling the caller must not cut the commit.
                tg.start_soon(recorder.record, sid, EventKind.REQUEST, {"i": 1})
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
            await recorder.record(sid, EventKind.REQUEST, {"i": 2})
    assert await _verified(store, sid) == 3
    events = await store.session_events(sid)
    assert [e.payload.get("i") for e in events] == [None, 1, 2]
