"""TokenService rules without HTTP, on real stores (SQLite; PostgreSQL where marked)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.agents import register_agent
from broker.config import BrokerConfig, ServerConfig, TokenConfig
from broker.core.decision import Reason
from broker.core.identity import Agent, AgentStatus
from broker.errors import NotFound, OAuthError
from broker.keys import KeyRing, ensure_signing_key
from broker.revocations import RevocationCache
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url, temporary_postgres_url
from broker.token_service import ACCESS_TOKEN_TYPE, TokenService

BASE = "http://127.0.0.1:8765"
SCOPES_TOML = """
[[scope]]
name = "files:read"
description = "read"
[[scope.grant]]
connector = "files"
tools = ["read_text_file"]

[[scope]]
name = "files:delete"
description = "delete"
approval = "token"
[[scope.grant]]
connector = "files"
tools = ["delete_file"]
"""


class Clock:
    def __init__(self, now: datetime) -> None:
        self.t = now

    def now(self) -> datetime:
        return self.t


@dataclass
class Parts:
    store: SqlStore
    service: TokenService
    clock: Clock

    async def agent(self, name: str, scopes: list[str], max_ttl: int = 600) -> Agent:
        agent, _ = await register_agent(
            self.store, name=name, owner="ops", scopes=scopes, max_ttl=max_ttl, now=self.clock.t
        )
        return agent


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    if request.param == "sqlite":
        async with migrated_store(sqlite_url(tmp_path)) as s:
            yield s
    else:
        async with temporary_postgres_url() as url, migrated_store(url) as s:
            yield s


async def make_parts(
    store: SqlStore, tmp_path: Path, *, scope_files: bool = False, **tokens: Any
) -> Parts:
    # The real clock: pyjwt's signature layer is clock-free, and the key ring's retirement
    # window is measured from now.
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    files: tuple[Path, ...] = ()
    if scope_files:
        path = tmp_path / "scopes.toml"
        path.write_text(SCOPES_TOML, encoding="utf-8")
        files = (path,)
    config = BrokerConfig(
        server=ServerConfig(public_url=BASE),
        tokens=TokenConfig(keys_dir=tmp_path / "keys", **tokens),
        scope_files=files,
    )
    await ensure_signing_key(store, config.tokens.keys_dir, clock.now())
    keyring = await KeyRing.load(
        store, config.tokens.keys_dir, max_ttl=config.tokens.max_ttl, leeway=config.tokens.leeway
    )
    revocations = RevocationCache(store, clock, staleness=60)
    await revocations.refresh()
    return Parts(store, TokenService(store, keyring, revocations, config, clock), clock)


@pytest.mark.parametrize(
    ("requested", "agent_max", "config_max", "expected"),
    [
        (None, 900, 3600, 600),
        (120, 900, 3600, 120),
        (5000, 900, 3600, 900),
        (5000, 3000, 1200, 1200),
    ],
    ids=["default", "requested", "agent-cap", "config-cap"],
)
async def test_ttl_is_the_smallest_of_request_agent_and_config(
    store: SqlStore,
    tmp_path: Path,
    requested: int | None,
    agent_max: int,
    config_max: int,
    expected: int,
) -> None:
    parts = await make_parts(store, tmp_path, max_ttl=config_max)
    agent = await parts.agent("bot", ["a"], max_ttl=agent_max)
    granted = await parts.service.client_credentials(agent, scope="a", expires_in=requested)
    assert granted.expires_in == expected
    assert granted.claims.exp - granted.claims.iat == expected


async def test_an_omitted_scope_grants_the_agents_registered_scopes(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path)
    agent = await parts.agent("bot", ["a", "b"])
    granted = await parts.service.client_credentials(agent)
    assert granted.scope == "a b"
    assert granted.to_json()["scope"] == "a b"


async def test_issued_tokens_are_recorded_with_their_task(store: SqlStore, tmp_path: Path) -> None:
    parts = await make_parts(store, tmp_path)
    agent = await parts.agent("bot", ["a"])
    granted = await parts.service.client_credentials(
        agent, scope="a", task_id="t-9", purpose="why", budget=4
    )
    recorded = await store.get_token(granted.claims.jti)
    assert (recorded.agent_id, recorded.task_id, recorded.purpose) == (agent.id, "t-9", "why")
    assert recorded.scopes == ("a",)
    assert recorded.budget == 4
    assert recorded.parent_jti is None


async def test_defined_scopes_are_checked_and_approval_gated_ones_refused(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path, scope_files=True)
    agent = await parts.agent("bot", ["files:read", "files:delete", "files:ghost"])
    assert (await parts.service.client_credentials(agent, scope="files:read")).scope
    with pytest.raises(OAuthError) as unknown:
        await parts.service.client_credentials(agent, scope="files:ghost")
    assert unknown.value.error == "invalid_scope"
    with pytest.raises(OAuthError) as gated:
        await parts.service.client_credentials(agent, scope="files:delete")
    assert gated.value.error == "access_denied"
    # An omitted scope grants only what is defined and needs no human.
    assert (await parts.service.client_credentials(agent)).scope == "files:read"
    only_gated = await parts.agent("careful", ["files:delete"])
    with pytest.raises(OAuthError) as none_left:
        await parts.service.client_credentials(only_gated)
    assert none_left.value.error == "invalid_scope"


@pytest.mark.parametrize(
    ("status", "error"),
    [(AgentStatus.DISABLED, "invalid_client"), (AgentStatus.QUARANTINED, "access_denied")],
)
async def test_an_agent_that_is_not_active_gets_no_token(
    store: SqlStore, tmp_path: Path, status: AgentStatus, error: str
) -> None:
    parts = await make_parts(store, tmp_path)
    agent = await parts.agent("bot", ["a"])
    changed = await store.set_agent_status(
        agent.id, status, reason="r", actor="t", at=parts.clock.t
    )
    with pytest.raises(OAuthError) as err:
        await parts.service.client_credentials(changed, scope="a")
    assert err.value.error == error


async def test_a_resource_other_than_the_mcp_endpoint_is_invalid_target(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path)
    agent = await parts.agent("bot", ["a"])
    ok = await parts.service.client_credentials(agent, scope="a", resource=BASE + "/mcp")
    assert ok.claims.aud == BASE + "/mcp"
    with pytest.raises(OAuthError) as err:
        await parts.service.client_credentials(agent, scope="a", resource=BASE + "/mcp/")
    assert err.value.error == "invalid_target"


async def test_a_revocation_takes_effect_in_this_process_at_once(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path)
    agent = await parts.agent("bot", ["a"])
    granted = await parts.service.client_credentials(agent, scope="a")
    claims = granted.claims
    assert parts.service.revocations.check(claims, parts.clock.t) is None
    rev = await parts.service.revoke_token(claims.jti, reason="leaked", actor="test")
    assert rev.subject == claims.jti
    # No refresh from the store: apply_local already updated the view.
    assert parts.service.revocations.check(claims, parts.clock.t) is Reason.TOKEN_REVOKED


async def test_revoking_needs_a_known_token_and_a_reason(store: SqlStore, tmp_path: Path) -> None:
    parts = await make_parts(store, tmp_path)
    with pytest.raises(NotFound):
        await parts.service.revoke_token("x" * 32, reason="r", actor="t")
    with pytest.raises(NotFound):
        await parts.service.revoke_agent("nobody", reason="r", actor="t")
    with pytest.raises(ValueError, match="reason"):
        await parts.service.revoke_task("t-1", reason="  ", actor="t")


async def test_exchange_checks_token_types_audience_and_actor(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path)
    parent = await parts.agent("planner", ["a"])
    await parts.agent("worker", ["a"])
    token = (await parts.service.client_credentials(parent, scope="a")).access_token
    base: dict[str, Any] = {
        "subject_token": token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "actor": "worker",
    }
    cases = [
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:jwt"}, "invalid_request"),
        ({"audience": "http://elsewhere/mcp"}, "invalid_target"),
        ({"actor": "nobody"}, "invalid_request"),
        ({"subject_token": token[:-4] + "AAAA"}, "invalid_grant"),
        ({"scope": "b"}, "invalid_scope"),
    ]
    for extra, error in cases:
        with pytest.raises(OAuthError) as err:
            await parts.service.exchange(parent, **{**base, **extra})
        assert err.value.error == error, extra
    granted = await parts.service.exchange(parent, **base)
    assert granted.issued_token_type == ACCESS_TOKEN_TYPE
    assert granted.to_json()["issued_token_type"] == ACCESS_TOKEN_TYPE
    recorded = await store.get_token(granted.claims.jti)
    assert granted.claims.delegation is not None
    assert recorded.chain == granted.claims.delegation.chain
    assert recorded.parent_jti == granted.claims.delegation.parent
    assert recorded.agent_id == granted.claims.client_id


async def test_an_expired_parent_cannot_be_exchanged(store: SqlStore, tmp_path: Path) -> None:
    parts = await make_parts(store, tmp_path)
    parent = await parts.agent("planner", ["a"])
    await parts.agent("worker", ["a"])
    token = (await parts.service.client_credentials(parent, scope="a", expires_in=60)).access_token
    parts.clock.t += timedelta(minutes=10)
    with pytest.raises(OAuthError) as err:
        await parts.service.exchange(
            parent, subject_token=token, subject_token_type=ACCESS_TOKEN_TYPE, actor="worker"
        )
    assert err.value.error == "invalid_grant"


async def test_an_admin_mint_follows_the_same_rules(store: SqlStore, tmp_path: Path) -> None:
    parts = await make_parts(store, tmp_path)
    await parts.agent("bot", ["a"])
    granted = await parts.service.mint_for("bot", scope="a", purpose="manual", expires_in=30)
    assert granted.expires_in == 30
    with pytest.raises(OAuthError):
        await parts.service.mint_for("bot", scope="b")
    with pytest.raises(NotFound):
        await parts.service.mint_for("ghost", scope="a")


async def test_data_flow_declarations_are_accepted_and_unknown_detail_types_refused(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path)
    agent = await parts.agent("reader", ["a"])
    flow = {"type": "data_flow", "allow": ["private->egress"]}
    granted = await parts.service.client_credentials(agent, scope="a", authorization_details=[flow])
    assert granted.claims.authorization_details == (flow,)
    for bad in ({"type": "payment"}, {"type": "data_flow", "allow": ["anything"]}):
        with pytest.raises(OAuthError) as err:
            await parts.service.client_credentials(agent, scope="a", authorization_details=[bad])
        assert err.value.error == "invalid_authorization_details", bad


async def test_a_delegated_token_cannot_declare_a_flow_its_parent_did_not(
    store: SqlStore, tmp_path: Path
) -> None:
    parts = await make_parts(store, tmp_path)
    parent = await parts.agent("planner", ["a"])
    await parts.agent("worker", ["a"])
    token = (await parts.service.client_credentials(parent, scope="a")).access_token
    flow = {"type": "data_flow", "allow": ["private->egress"]}
    with pytest.raises(OAuthError) as err:
        await parts.service.exchange(
            parent,
            subject_token=token,
            subject_token_type=ACCESS_TOKEN_TYPE,
            actor="worker",
            authorization_details=[flow],
        )
    assert err.value.error == "invalid_authorization_details"
    assert "parent" in err.value.description
