"""The revocation feed inside one process: LISTEN/NOTIFY, its reconnection, cut-off listeners,
and readiness, over a real PostgreSQL database (and SQLite for the polling fallback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest

from broker.core.decision import Reason
from broker.core.identity import AgentStatus
from broker.core.revocation import RevocationKind
from broker.health import readiness
from broker.ports import SystemClock
from broker.revocations import RevocationCache
from broker.store import REVOCATION_CHANNEL, SqlStore
from broker.store.listen import PgListener, libpq_url, listener_for
from broker.store.testing import make_agent, migrated_store, sqlite_url, temporary_postgres_url

pytestmark = pytest.mark.postgres


class _Clock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.at


@pytest.fixture
async def pg_url(replicas_template: str) -> AsyncIterator[str]:
    async with temporary_postgres_url(template=replicas_template) as url:
        yield url


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[SqlStore]:
    async with migrated_store(pg_url, pool_size=2, max_overflow=2) as s:
        yield s


async def _until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    """Bounded polling of a condition (no sleeping to let things settle)."""
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.005)


async def test_a_revocation_by_another_replica_arrives_by_notify_without_waiting_for_the_poll(
    store: SqlStore,
) -> None:
    now = datetime.now(UTC)
    async with RevocationCache(store, SystemClock(), poll_interval=60) as cache:
        await _until(lambda: cache.propagation == "listen")
        revocation = await store.revoke(
            RevocationKind.TOKEN, "jti-1", reason="t", actor="admin", at=now
        )
        # The poll interval is a minute: only the notification can bring it this fast.
        await _until(lambda: "jti-1" in cache.view.revoked_jtis, within=2)
        assert cache.view.seq == revocation.seq


async def test_a_quarantine_elsewhere_calls_the_cut_off_listeners_with_the_reason(
    store: SqlStore,
) -> None:
    agent = make_agent("cut")
    await store.create_agent(agent, secret_hash=None)
    heard: list[tuple[str, Reason]] = []

    async def cut_off(agent_id: str, reason: Reason) -> None:
        heard.append((agent_id, reason))

    async with RevocationCache(store, SystemClock(), poll_interval=60) as cache:
        cache.add_cut_off_listener(cut_off)
        await _until(lambda: cache.propagation == "listen")
        await store.set_agent_status(
            agent.id, AgentStatus.QUARANTINED, reason="test", actor="admin", at=datetime.now(UTC)
        )
        await _until(lambda: heard == [(agent.id, Reason.AGENT_QUARANTINED)])


async def test_history_at_start_up_is_not_cut_off_again(store: SqlStore) -> None:
    agent = make_agent("old")
    await store.create_agent(agent, secret_hash=None)
    await store.set_agent_status(
        agent.id, AgentStatus.DISABLED, reason="old", actor="admin", at=datetime.now(UTC)
    )
    heard: list[str] = []

    async def cut_off(agent_id: str, reason: Reason) -> None:
        heard.append(agent_id)

    cache = RevocationCache(store, SystemClock(), poll_interval=0.01)
    cache.add_cut_off_listener(cut_off)
    async with cache:
        for _ in range(3):
            with anyio.fail_after(5):
                await cache.wait_refreshed()
    assert heard == []


async def test_the_listener_reconnects_after_its_connection_is_killed_and_catches_up(
    pg_url: str,
) -> None:
    payloads: list[str] = []
    connected: list[int] = []
    listener = PgListener(
        libpq_url(pg_url),
        {REVOCATION_CHANNEL: payloads.append},
        on_connected=lambda: connected.append(1),
        keepalive=0.2,
        min_backoff=0.05,
    )
    admin = await asyncpg.connect(libpq_url(pg_url))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            assert listener.listening
            # The listener's is the only other connection to this database.
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database()"
            )
            await _until(lambda: len(connected) == 2 and listener.listening)
            await admin.execute(f"NOTIFY {REVOCATION_CHANNEL}, '42'")
            await _until(lambda: payloads == ["42"])
            assert listener.connections == 2
            tg.cancel_scope.cancel()
    finally:
        await admin.close()


async def test_sqlite_has_no_listener_and_the_cache_polls(tmp_path: Path) -> None:
    async with migrated_store(sqlite_url(tmp_path)) as store:
        assert listener_for(store, {}) is None
        async with RevocationCache(store, SystemClock(), poll_interval=0.01) as cache:
            assert cache.propagation == "poll"
            await store.revoke(
                RevocationKind.TOKEN, "jti-s", reason="t", actor="a", at=datetime.now(UTC)
            )
            await _until(lambda: "jti-s" in cache.view.revoked_jtis)


async def test_readiness_follows_the_views_age_against_the_bound(store: SqlStore) -> None:
    clock = _Clock()
    assert readiness(False, None, clock.now()).reason == "starting"
    async with RevocationCache(store, clock, poll_interval=60, staleness=5.0) as cache:
        ready = readiness(True, cache, clock.now())
        assert ready.ready
        assert ready.body()["revocations"]["bound_s"] == 5.0
        clock.at += timedelta(seconds=5.5)
        stale = readiness(True, cache, clock.now())
        assert (stale.ready, stale.reason) == (False, "revocations-stale")
        assert not cache.fresh(clock.now())
        cache.notify()
        with anyio.fail_after(5):
            await cache.wait_refreshed()
        assert readiness(True, cache, clock.now()).ready
