"""Review-page logins live in the store: two brokers built by `create_app` from one config (one
SQLite file, one keys folder, one clock), each served on its own loopback port, stand for two
processes or replicas behind a load balancer. Driven over real HTTP with one cookie jar."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx2
import pytest

from broker.admin_tokens import create_admin_token
from broker.app import create_app
from broker.config import BrokerConfig, ServerConfig, StoreConfig, TokenConfig
from broker.core.identity import AdminRole, Agent, AgentStatus
from broker.errors import NotFound
from broker.review.auth import COOKIE_NAME, IDLE_TIMEOUT
from broker.store import SqlStore
from broker.store.testing import sqlite_url
from broker.testing import serve_app

SCOPES = """
[[scope]]
name = "files:read"
[[scope.grant]]
connector = "files"
tools = ["read"]
"""


class ManualClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def advance(self, by: timedelta) -> None:
        self.at += by


@dataclass
class Pair:
    first: str
    second: str
    store: SqlStore
    clock: ManualClock
    http: httpx2.AsyncClient

    async def log_in(self, base: str, role: AdminRole) -> str:
        _, raw = await create_admin_token(
            self.store, role=role, name=f"{role.value} person", now=self.clock.now()
        )
        response = await self.http.post(base + "/review/login", data={"token": raw})
        assert response.status_code == 303, response.text
        return response.cookies[COOKIE_NAME]

    async def page(self, base: str, path: str) -> httpx2.Response:
        return await self.http.get(base + path)


def csrf_of(html: str) -> str:
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : start + 64]


@asynccontextmanager
async def two_brokers(tmp_path: Path) -> AsyncIterator[Pair]:
    scope_file = tmp_path / "scopes.toml"
    scope_file.write_text(SCOPES, encoding="utf-8")
    config = BrokerConfig(
        server=ServerConfig(public_url="http://127.0.0.1:1"),
        store=StoreConfig(url=sqlite_url(tmp_path)),
        tokens=TokenConfig(keys_dir=tmp_path / "keys"),
        scope_files=(scope_file,),
        base_dir=tmp_path,
    )
    clock = ManualClock(datetime.now(UTC))
    first = create_app(config, clock=clock, environ={})
    second = create_app(config, clock=clock, environ={})
    with anyio.fail_after(60):
        async with (
            serve_app(first) as first_url,
            serve_app(second) as second_url,
            httpx2.AsyncClient(timeout=10) as http,
        ):
            store: SqlStore = first.state.services.store
            assert second.state.services.store is not store  # a store (engine) each
            yield Pair(first_url, second_url, store, clock, http)


async def test_a_login_made_on_one_broker_is_honoured_with_its_csrf_token_by_another(
    tmp_path: Path,
) -> None:
    async with two_brokers(tmp_path) as pair:
        await pair.store.create_agent(
            Agent(
                id="agt_held",
                name="held",
                owner="ops@example.com",
                status=AgentStatus.QUARANTINED,
                allowed_scopes=("files:read",),
                max_ttl_seconds=600,
                auth_method="client_secret",
                created_at=pair.clock.now(),
                status_reason="burst",
            ),
            secret_hash=None,
        )
        await pair.log_in(pair.first, AdminRole.ADMIN)
        on_first = await pair.page(pair.first, "/review/agents")
        on_second = await pair.page(pair.second, "/review/agents")
        assert on_first.status_code == on_second.status_code == 200
        assert "admin person" in on_second.text
        csrf = csrf_of(on_first.text)
        assert csrf_of(on_second.text) == csrf

        release = pair.second + "/review/agents/agt_held/release"
        wrong = await pair.http.post(release, data={"csrf": "0" * 64, "reason": "checked"})
        assert wrong.status_code == 403
        assert (await pair.store.get_agent("agt_held")).status is AgentStatus.QUARANTINED
        done = await pair.http.post(release, data={"csrf": csrf, "reason": "checked"})
        assert done.status_code == 303
        assert done.headers["location"] == "/review/agents?done=released"
        assert (await pair.store.get_agent("agt_held")).status is AgentStatus.ACTIVE


async def test_logging_out_on_one_broker_ends_the_login_on_the_other(tmp_path: Path) -> None:
    async with two_brokers(tmp_path) as pair:
        session_id = await pair.log_in(pair.first, AdminRole.REVIEWER)
        csrf = csrf_of((await pair.page(pair.first, "/review/sessions")).text)
        out = await pair.http.post(pair.second + "/review/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert out.headers["location"] == "/review/login"
        pair.http.cookies.clear()  # a browser drops it; a thief who kept it resends it
        again = await pair.http.get(
            pair.first + "/review/sessions", headers={"cookie": f"{COOKIE_NAME}={session_id}"}
        )
        assert again.status_code == 303
        assert again.headers["location"] == "/review/login"


async def test_a_login_idle_too_long_is_refused_everywhere_and_deleted(tmp_path: Path) -> None:
    async with two_brokers(tmp_path) as pair:
        session_id = await pair.log_in(pair.first, AdminRole.REVIEWER)
        index = hashlib.sha256(session_id.encode()).hexdigest()
        nearly = IDLE_TIMEOUT - timedelta(minutes=1)
        pair.clock.advance(nearly)
        assert (await pair.page(pair.second, "/review/sessions")).status_code == 200
        pair.clock.advance(nearly)  # idle for less than the timeout since the second broker saw it
        assert (await pair.page(pair.first, "/review/sessions")).status_code == 200
        assert (await pair.store.get_review_login(index)).last_seen == pair.clock.now()

        pair.clock.advance(IDLE_TIMEOUT + timedelta(seconds=1))
        refused = await pair.page(pair.second, "/review/sessions")
        assert refused.status_code == 303
        assert refused.headers["location"] == "/review/login"
        with pytest.raises(NotFound):
            await pair.store.get_review_login(index)
        assert (await pair.page(pair.first, "/review/sessions")).status_code == 303
