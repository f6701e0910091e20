from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from broker.core.identity import AdminRole, AdminToken, AgentStatus
from broker.core.revocation import RevocationKind
from broker.errors import NotFound
from broker.store import Conflict, SqlStore
from broker.store.testing import make_agent

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


async def test_a_created_agent_reads_back_equal_by_id_and_by_name(store: SqlStore) -> None:
    agent = replace(
        make_agent("reader", scopes=("files:read", "git:log")),
        auth_method="private_key_jwt",
        public_jwk={"kty": "OKP", "crv": "Ed25519", "x": "abc"},
        max_delegation_depth=1,
    )
    await store.create_agent(agent, secret_hash=None)
    assert await store.get_agent(agent.id) == agent
    assert await store.find_agent("reader") == agent
    assert await store.find_agent(agent.id) == agent
    assert await store.list_agents() == [agent]


async def test_agents_are_listed_by_name(store: SqlStore) -> None:
    for name in ("zeta", "alpha", "mid"):
        await store.create_agent(make_agent(name), secret_hash=None)
    assert [a.name for a in await store.list_agents()] == ["alpha", "mid", "zeta"]


async def test_a_taken_agent_name_is_a_conflict(store: SqlStore) -> None:
    await store.create_agent(make_agent("dup"), secret_hash=None)
    with pytest.raises(Conflict):
        await store.create_agent(replace(make_agent("dup"), id="ag_other"), secret_hash=None)


async def test_an_unknown_agent_is_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFound):
        await store.get_agent("ag_nobody")
    with pytest.raises(NotFound):
        await store.find_agent("nobody")
    with pytest.raises(NotFound):
        await store.agent_secret_hash("ag_nobody")
    with pytest.raises(NotFound):
        await store.set_agent_status(
            "ag_nobody", AgentStatus.DISABLED, reason="x", actor="admin", at=T0
        )


async def test_the_secret_hash_is_kept_apart_and_can_be_replaced(store: SqlStore) -> None:
    await store.create_agent(make_agent("a"), secret_hash="$argon2id$one")
    await store.create_agent(make_agent("b"), secret_hash=None)
    assert await store.agent_secret_hash("ag_a") == "$argon2id$one"
    assert await store.agent_secret_hash("ag_b") is None
    await store.set_agent_secret_hash("ag_a", "$argon2id$two")
    assert await store.agent_secret_hash("ag_a") == "$argon2id$two"
    with pytest.raises(NotFound):
        await store.set_agent_secret_hash("ag_nobody", "x")


async def test_quarantine_writes_an_agent_revocation_and_release_does_not(
    store: SqlStore,
) -> None:
    await store.create_agent(make_agent("rogue"), secret_hash=None)
    t1, t2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    quarantined = await store.set_agent_status(
        "ag_rogue", AgentStatus.QUARANTINED, reason="exfiltration", actor="detector:flow", at=t1
    )
    assert quarantined.status is AgentStatus.QUARANTINED
    assert quarantined.status_reason == "exfiltration"
    [rev] = await store.revocations_since(0)
    assert (rev.kind, rev.subject, rev.at, rev.actor) == (
        RevocationKind.AGENT,
        "ag_rogue",
        t1,
        "detector:flow",
    )
    released = await store.set_agent_status(
        "ag_rogue", AgentStatus.ACTIVE, reason="reviewed", actor="adm_1", at=t2
    )
    assert released.is_active
    assert await store.revocations_since(rev.seq) == []
    assert await store.get_agent("ag_rogue") == released


async def test_agent_statuses_since_lists_changes_after_the_instant(store: SqlStore) -> None:
    await store.create_agent(make_agent("a", created_at=T0), secret_hash=None)
    await store.create_agent(make_agent("b", created_at=T0), secret_hash=None)
    t1 = T0 + timedelta(seconds=5)
    await store.set_agent_status("ag_b", AgentStatus.DISABLED, reason="gone", actor="x", at=t1)
    assert await store.agent_statuses_since(T0) == [("ag_b", AgentStatus.DISABLED, t1)]
    assert await store.agent_statuses_since(t1) == []


async def test_admin_tokens_round_trip_and_revoke_once(store: SqlStore) -> None:
    token = AdminToken(id="adm_1", name="ops", role=AdminRole.APPROVER, created_at=T0)
    await store.create_admin_token(token, secret_hash="$argon2id$h")
    assert await store.get_admin_token("adm_1") == (token, "$argon2id$h")
    assert await store.list_admin_tokens() == [token]
    revoked = await store.revoke_admin_token("adm_1", T0 + timedelta(hours=1))
    assert revoked.revoked_at == T0 + timedelta(hours=1)
    again = await store.revoke_admin_token("adm_1", T0 + timedelta(hours=2))
    assert again.revoked_at == T0 + timedelta(hours=1)
    with pytest.raises(Conflict):
        await store.create_admin_token(token, secret_hash="other")
    with pytest.raises(NotFound):
        await store.get_admin_token("adm_2")
    with pytest.raises(NotFound):
        await store.revoke_admin_token("adm_2", T0)


async def test_signing_keys_are_listed_oldest_first_and_retired_once(store: SqlStore) -> None:
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "k1"}
    await store.add_signing_key("k2", {**jwk, "x": "k2"}, T0 + timedelta(days=1))
    await store.add_signing_key("k1", jwk, T0)
    with pytest.raises(Conflict):
        await store.add_signing_key("k1", jwk, T0)
    await store.retire_signing_key("k1", T0 + timedelta(days=2))
    await store.retire_signing_key("k1", T0 + timedelta(days=3))
    keys = await store.list_signing_keys()
    assert [(k.kid, k.public_jwk["x"], k.retired_at) for k in keys] == [
        ("k1", "k1", T0 + timedelta(days=2)),
        ("k2", "k2", None),
    ]
    with pytest.raises(NotFound):
        await store.retire_signing_key("k9", T0)


async def test_datetimes_in_any_offset_come_back_as_the_same_instant_in_utc(
    store: SqlStore,
) -> None:
    plus_five = timezone(timedelta(hours=5, minutes=30))
    local = datetime(2026, 11, 23, 17, 30, 0, 123456, tzinfo=plus_five)
    await store.create_agent(make_agent("tz", created_at=local), secret_hash=None)
    back = (await store.get_agent("ag_tz")).created_at
    assert back == local
    assert back.tzinfo is UTC
    assert back == datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)


async def test_a_naive_datetime_is_refused(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.create_agent(
            make_agent("naive", created_at=datetime(2026, 1, 1)),
            secret_hash=None,
        )
