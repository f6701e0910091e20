from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from broker.core.revocation import IssuedToken, RevocationKind
from broker.errors import NotFound
from broker.store import Conflict, SqlStore, open_store
from broker.store.testing import make_agent

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def token(jti: str, *, agent_id: str = "ag_a", task: str = "t1", start: int = 0) -> IssuedToken:
    issued = T0 + timedelta(minutes=start)
    return IssuedToken(
        jti=jti,
        agent_id=agent_id,
        task_id=task,
        purpose="summarise the repo",
        scopes=("files:read",),
        issued_at=issued,
        expires_at=issued + timedelta(minutes=10),
    )


@pytest.fixture
async def agents(store: SqlStore) -> None:
    await store.create_agent(make_agent("a"), secret_hash=None)
    await store.create_agent(make_agent("b"), secret_hash=None)


@pytest.mark.usefixtures("agents")
async def test_a_recorded_token_reads_back_equal(store: SqlStore) -> None:
    child = IssuedToken(
        jti="j2",
        agent_id="ag_b",
        task_id="t1",
        purpose="sub-task",
        scopes=("files:read", "git:log"),
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=5),
        parent_jti="j1",
        chain=("j0", "j1"),
        budget=20,
    )
    await store.record_token(child)
    assert await store.get_token("j2") == child


@pytest.mark.usefixtures("agents")
async def test_a_duplicate_jti_or_unknown_agent_is_a_conflict(store: SqlStore) -> None:
    await store.record_token(token("j1"))
    with pytest.raises(Conflict):
        await store.record_token(token("j1"))
    with pytest.raises(Conflict):
        await store.record_token(token("j9", agent_id="ag_nobody"))
    with pytest.raises(NotFound):
        await store.get_token("j9")


@pytest.mark.usefixtures("agents")
async def test_tokens_are_filtered_by_agent_task_and_activity(store: SqlStore) -> None:
    await store.record_token(token("j1", start=0))
    await store.record_token(token("j2", agent_id="ag_b", start=5))
    await store.record_token(token("j3", task="t2", start=20))
    assert [t.jti for t in await store.list_tokens()] == ["j1", "j2", "j3"]
    assert [t.jti for t in await store.list_tokens(agent_id="ag_a")] == ["j1", "j3"]
    assert [t.jti for t in await store.list_tokens(task_id="t1")] == ["j1", "j2"]
    at = T0 + timedelta(minutes=10)  # j1 expires exactly now; j2 is live; j3 not yet issued
    assert [t.jti for t in await store.list_tokens(active_at=at)] == ["j2"]


async def test_revocations_since_returns_newer_ones_oldest_first(store: SqlStore) -> None:
    made = [
        await store.revoke(kind, subject, reason="r", actor="adm_1", at=T0)
        for kind, subject in [
            (RevocationKind.TOKEN, "j1"),
            (RevocationKind.TASK, "t1"),
            (RevocationKind.AGENT, "ag_a"),
            (RevocationKind.TASK_CLOSED, "t2"),
        ]
    ]
    seqs = [r.seq for r in made]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 4
    assert await store.revocations_since(0) == made
    assert await store.revocations_since(seqs[0]) == made[1:]
    assert await store.revocations_since(seqs[-1]) == []


async def test_concurrent_revocations_get_distinct_increasing_seqs(store: SqlStore) -> None:
    async with asyncio.timeout(30):
        made = await asyncio.gather(
            *(
                store.revoke(RevocationKind.TOKEN, f"j{i}", reason="r", actor="a", at=T0)
                for i in range(40)
            )
        )
    listed = await store.revocations_since(0)
    assert sorted(r.seq for r in made) == [r.seq for r in listed]
    assert len({r.seq for r in listed}) == 40


async def test_a_budget_counts_down_then_stays_exhausted(store: SqlStore) -> None:
    assert [await store.consume_budget("j1", 3) for _ in range(5)] == [2, 1, 0, None, None]
    assert await store.consume_budget("j2", 1) == 0
    assert await store.consume_budget("j3", 0) is None


async def test_concurrent_budget_use_from_two_stores_yields_exactly_the_limit(
    store_url: str,
) -> None:
    first = open_store(store_url, pool_size=10)
    await first.migrate()
    second = open_store(store_url, pool_size=10)
    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(
                *(s.consume_budget("jti-hot", 25) for _ in range(60) for s in (first, second))
            )
        granted = sorted(r for r in results if r is not None)
        assert granted == list(range(25))
        assert results.count(None) == 120 - 25
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_client_assertion_jti_is_accepted_once(store: SqlStore) -> None:
    exp = T0 + timedelta(minutes=5)
    assert await store.remember_assertion_jti("a1", exp) is True
    assert await store.remember_assertion_jti("a1", exp) is False
    assert await store.remember_assertion_jti("a2", exp + timedelta(minutes=5)) is True


async def test_expired_assertion_jtis_are_forgotten(store: SqlStore) -> None:
    await store.remember_assertion_jti("old", T0)
    await store.remember_assertion_jti("new", T0 + timedelta(minutes=10))
    assert await store.forget_assertion_jtis(T0 + timedelta(minutes=1)) == 1
    assert await store.remember_assertion_jti("old", T0 + timedelta(minutes=11)) is True
    assert await store.remember_assertion_jti("new", T0 + timedelta(minutes=10)) is False
