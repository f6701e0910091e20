"""Review-page logins in the store (`broker.review.auth` applies the rules on top)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.errors import NotFound
from broker.ports import ReviewLoginRecord
from broker.store import Conflict, SqlStore

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def login(
    n: int, *, owner: str = "adm_a", created: int = 0, seen: int | None = None
) -> ReviewLoginRecord:
    return ReviewLoginRecord(
        id_hash=f"{n:064x}",
        token_id=owner,
        created_at=T0 + timedelta(minutes=created),
        last_seen=T0 + timedelta(minutes=created if seen is None else seen),
    )


async def test_a_created_login_reads_back_equal_and_a_duplicate_is_a_conflict(
    store: SqlStore,
) -> None:
    await store.create_review_login(login(1), keep=10)
    assert await store.get_review_login(login(1).id_hash) == login(1)
    with pytest.raises(Conflict):
        await store.create_review_login(login(1), keep=10)
    with pytest.raises(NotFound):
        await store.get_review_login(login(2).id_hash)


async def test_touching_moves_last_seen_only_and_an_unknown_login_is_not_found(
    store: SqlStore,
) -> None:
    await store.create_review_login(login(1), keep=10)
    later = T0 + timedelta(minutes=7, microseconds=123)
    await store.touch_review_login(login(1).id_hash, later)
    assert await store.get_review_login(login(1).id_hash) == ReviewLoginRecord(
        id_hash=login(1).id_hash, token_id="adm_a", created_at=T0, last_seen=later
    )
    with pytest.raises(NotFound):
        await store.touch_review_login(login(2).id_hash, later)
    with pytest.raises(ValueError, match="naive"):
        await store.touch_review_login(login(1).id_hash, later.replace(tzinfo=None))


async def test_a_login_is_deleted_alone_or_with_every_login_of_its_token(store: SqlStore) -> None:
    for n, token in [(1, "adm_a"), (2, "adm_a"), (3, "adm_b"), (4, "adm_a")]:
        await store.create_review_login(login(n, owner=token), keep=10)
    assert await store.delete_review_login(login(1).id_hash) is True
    assert await store.delete_review_login(login(1).id_hash) is False
    assert await store.delete_review_logins_of("adm_a") == 2
    assert await store.delete_review_logins_of("adm_a") == 0
    assert await store.get_review_login(login(3).id_hash) == login(3, owner="adm_b")
    for n in (1, 2, 4):
        with pytest.raises(NotFound):
            await store.get_review_login(login(n).id_hash)


async def test_pruning_deletes_logins_idle_or_older_than_the_bounds(store: SqlStore) -> None:
    await store.create_review_login(login(1, created=0, seen=50), keep=10)  # too old
    await store.create_review_login(login(2, created=20, seen=25), keep=10)  # idle
    await store.create_review_login(login(3, created=20, seen=40), keep=10)  # live
    await store.create_review_login(login(4, created=10, seen=30), keep=10)  # both bounds exactly
    gone = await store.prune_review_logins(
        seen_before=T0 + timedelta(minutes=30), created_before=T0 + timedelta(minutes=10)
    )
    assert gone == 2
    assert [await store.get_review_login(login(n).id_hash) for n in (3, 4)] == [
        login(3, created=20, seen=40),
        login(4, created=10, seen=30),
    ]


async def test_creating_past_the_cap_deletes_the_least_recently_seen(store: SqlStore) -> None:
    for n, seen in [(1, 5), (2, 1), (3, 9)]:
        await store.create_review_login(login(n, seen=seen), keep=3)
    await store.create_review_login(login(4, seen=3), keep=3)
    with pytest.raises(NotFound):
        await store.get_review_login(login(2).id_hash)
    await store.create_review_login(login(5, seen=10), keep=2)
    kept: list[int] = []
    for n in range(1, 6):
        try:
            await store.get_review_login(login(n).id_hash)
        except NotFound:
            continue
        kept.append(n)
    assert kept == [3, 5]
