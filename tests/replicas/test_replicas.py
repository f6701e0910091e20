"""Three real ``broker serve`` processes on loopback against one PostgreSQL database.

The replicas share the module (one database, started once: a replica takes seconds to start on
this machine); each test uses agents of its own. Revocations and quarantines are written to the
shared store from outside the replicas, as ``broker token revoke`` / ``broker agents
quarantine`` do from an operator's shell.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from broker.core.identity import AgentStatus
from broker.core.recording import verify_chain
from broker.core.revocation import RevocationKind
from broker.store import SqlStore, open_store
from broker.store.testing import create_postgres_database, drop_postgres_database
from examples.replicas.cluster import (
    BROKER,
    DEMO_CONNECTOR,
    DEMO_SCOPES,
    REPO,
    Outcome,
    Replica,
    add_agent,
    call_tool,
    get_token,
    prepare_store,
    start_replica,
    stop_replica,
    wait_ready,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BOUND = 5.0
"""``[store] revocation_staleness``: the promised propagation bound."""
SLOW_CONNECTOR = """
[[connectors]]
id = "slow"
kind = "native"
target = "tests.replicas.slow_tools:toolset"
call_timeout = 60
"""
SLOW_SCOPES = """
[[scope]]
name = "slow:use"
description = "A tool that runs until told"
[[scope.grant]]
connector = "slow"
tools = ["*"]
"""


@dataclass
class Cluster:
    config: Path
    store_url: str
    replicas: list[Replica]

    @asynccontextmanager
    async def store(self) -> AsyncIterator[SqlStore]:
        store = open_store(self.store_url, pool_size=1, max_overflow=1)
        try:
            yield store
        finally:
            await store.aclose()


@pytest.fixture(scope="module")
def cluster(replicas_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    replicas: list[Replica] = []
    with ThreadPoolExecutor(1) as pool:
        url = pool.submit(asyncio.run, create_postgres_database(template=replicas_template)).result(
            60
        )
        try:
            config = write_config(
                tmp_path_factory.mktemp("replicas"),
                url,
                staleness=BOUND,
                connectors=DEMO_CONNECTOR + SLOW_CONNECTOR,
                scopes=DEMO_SCOPES + SLOW_SCOPES,
            )
            pool.submit(asyncio.run, prepare_store(config)).result(60)
            replicas.extend(start_replica(config, name) for name in ("a", "b", "c"))
            pool.submit(asyncio.run, wait_ready(replicas, within=90)).result(100)
            yield Cluster(config, url, replicas)
        finally:
            for replica in replicas:
                stop_replica(replica)
            pool.submit(asyncio.run, drop_postgres_database(url)).result(60)


async def _until(condition: Callable[[], bool], *, within: float) -> None:
    """Bounded polling of a condition."""
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


def _jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def _until_refused(
    http: httpx2.AsyncClient, replica: Replica, token: str, *, within: float
) -> tuple[float, Outcome]:
    """Call ``demo__echo`` until the replica refuses; seconds it took and the refusal."""
    started = time.monotonic()
    with anyio.fail_after(within):
        while True:
            outcome = await call_tool(http, replica, token, "demo__echo", {"text": "x"})
            if outcome.refused:
                return time.monotonic() - started, outcome
            assert outcome.allowed, outcome


async def test_a_token_revoked_on_one_replica_is_refused_on_the_others_within_the_bound(
    cluster: Cluster,
) -> None:
    a, b, c = cluster.replicas
    client_id, secret = await add_agent(cluster.config, "revoked-token", ["demo:use"])
    async with httpx2.AsyncClient(timeout=10) as http:
        token = await get_token(http, a, client_id, secret)
        other = await get_token(http, b, client_id, secret)
        for replica in (a, b, c):
            assert (await call_tool(http, replica, token, "demo__echo", {"text": "x"})).allowed
        async with cluster.store() as store:
            await store.revoke(
                RevocationKind.TOKEN,
                _jti(token),
                reason="test",
                actor="admin:test",
                at=datetime.now(UTC),
            )
        delays = [
            (await _until_refused(http, replica, token, within=BOUND))[0] for replica in (a, b, c)
        ]
        # Only that token: the agent's other token still works on every replica.
        for replica in (a, b, c):
            assert (await call_tool(http, replica, other, "demo__echo", {"text": "y"})).allowed
    assert max(delays) < BOUND


async def test_a_2026_client_uses_any_replica_and_a_2025_session_is_404_elsewhere(
    cluster: Cluster,
) -> None:
    a, b, _ = cluster.replicas
    client_id, secret = await add_agent(cluster.config, "sessions", ["demo:use"])
    async with httpx2.AsyncClient(timeout=10) as http:
        token = await get_token(http, a, client_id, secret)
        for replica in cluster.replicas:
            outcome = await call_tool(http, replica, token, "demo__echo", {"text": "any"})
            assert outcome.text == "any"
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
        opened = await http.post(a.url + "/mcp", json=init, headers=headers)
        assert opened.status_code == 200
        session = {
            **headers,
            "mcp-session-id": opened.headers["mcp-session-id"],
            "MCP-Protocol-Version": "2025-11-25",
        }
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        elsewhere = await http.post(b.url + "/mcp", json=listing, headers=session)
        home = await http.post(a.url + "/mcp", json=listing, headers=session)
    # The spec's answer to an unknown session: 404, and the client initialises again.
    assert elsewhere.status_code == 404
    assert home.status_code == 200


async def test_a_budget_is_exact_across_replicas_under_concurrent_calls(cluster: Cluster) -> None:
    client_id, secret = await add_agent(cluster.config, "budgeted", ["demo:use"])
    outcomes: list[Outcome] = []
    async with httpx2.AsyncClient(timeout=30) as http:
        token = await get_token(http, cluster.replicas[0], client_id, secret, budget=10)

        async def one(replica: Replica) -> None:
            outcomes.append(await call_tool(http, replica, token, "demo__echo", {"text": "b"}))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(one, cluster.replicas[i % 3])
    assert sum(o.allowed for o in outcomes) == 10
    assert sum(o.denied_for("budget-exhausted") for o in outcomes) == 20


_CONSUMER = """
import asyncio, sys
from broker.store import open_store

async def main(url, jti, calls):
    store = open_store(url, pool_size=10, max_overflow=10)
    try:
        left = await asyncio.gather(*(store.consume_budget(jti, 10) for _ in range(calls)))
    finally:
        await store.aclose()
    print(sum(x is not None for x in left))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_budget_counting_is_exact_across_two_processes_at_the_store(
    cluster: Cluster,
) -> None:
    argv = [sys.executable, "-c", _CONSUMER, cluster.store_url, "jti-shared-budget", "20"]

    def run() -> list[subprocess.Popen[str]]:
        return [
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)
        ]

    processes = run()
    granted = 0
    for process in processes:
        out, _ = await anyio.to_thread.run_sync(lambda p=process: p.communicate(timeout=60))
        assert process.returncode == 0
        granted += int(out.strip())
    assert granted == 10


async def test_a_quarantine_closes_a_live_session_and_cancels_a_call_held_on_another_replica(
    cluster: Cluster, tmp_path: Path
) -> None:
    _, b, _ = cluster.replicas
    client_id, secret = await add_agent(cluster.config, "quarantined", ["demo:use", "slow:use"])
    marker = tmp_path / "started"
    result: dict[str, Any] = {}
    async with httpx2.AsyncClient(timeout=10) as token_http:
        token = await get_token(token_http, b, client_id, secret, scope="demo:use slow:use")
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(b.url + "/mcp", http_client=http), mode="legacy") as client,
    ):
        await client.list_tools()

        async def long_call() -> None:
            try:
                call = await client.call_tool("slow__sleep", {"seconds": 60, "marker": str(marker)})
            except MCPError as exc:
                # The session closed under the call: the stream ends without an answer.
                result["call"] = exc
            else:
                result["call"] = call

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            await _until(marker.exists, within=10)
            async with cluster.store() as store:
                await store.set_agent_status(
                    client_id,
                    AgentStatus.QUARANTINED,
                    reason="test",
                    actor="admin:test",
                    at=datetime.now(UTC),
                )
            await _until(lambda: "call" in result, within=BOUND)
        call = result["call"]
        # Cancelled, not completed: either a denial naming the quarantine or no answer at all.
        if not isinstance(call, MCPError):
            assert call.is_error
            assert "agent-quarantined" in json.dumps(call.model_dump(mode="json"))
        # The session is gone (the quarantined token is refused before it is even looked up)...
        with pytest.raises(MCPError):
            await client.list_tools()
    # ...and sealed on the replica that held it.
    async with cluster.store() as store:
        sessions = await store.list_sessions(agent_id=client_id)
    assert sessions
    assert all(s.ended_at is not None for s in sessions)


async def test_records_from_every_replica_verify_as_one_chain_per_session(
    cluster: Cluster,
) -> None:
    client_id, secret = await add_agent(cluster.config, "recorded", ["demo:use"])
    async with httpx2.AsyncClient(timeout=10) as http:
        token = await get_token(http, cluster.replicas[0], client_id, secret)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(
                        call_tool, http, cluster.replicas[i % 3], token, "demo__echo", {"text": "r"}
                    )
    async with cluster.store() as store:
        agent = next(x for x in await store.list_agents() if x.name == "recorded")
        sessions = await store.list_sessions(agent_id=agent.id)
        decisions = 0
        assert sessions
        for session in sessions:
            events = await store.session_events(session.id)
            report = verify_chain(session, events)
            assert report.ok, report
            decisions += sum(e.kind == "decision" for e in events)
    assert decisions == 12


def test_serve_refuses_several_workers_on_sqlite(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/broker.db")
    done = subprocess.run(
        [str(BROKER), "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "needs a PostgreSQL store" in done.stderr


async def test_serve_with_two_workers_shares_the_port_and_the_revocation_view(
    cluster: Cluster,
) -> None:
    served = start_replica(cluster.config, "workers", workers=2)
    try:
        await wait_ready([served], within=90)
        client_id, secret = await add_agent(cluster.config, "workers", ["demo:use"])
        async with httpx2.AsyncClient(timeout=10) as http:
            token = await get_token(http, served, client_id, secret)
            for _ in range(4):
                assert (await call_tool(http, served, token, "demo__echo", {"text": "w"})).allowed
            async with cluster.store() as store:
                await store.revoke(
                    RevocationKind.TOKEN,
                    _jti(token),
                    reason="test",
                    actor="admin:test",
                    at=datetime.now(UTC),
                )
            # Both workers refuse: new connections land on either.
            await _until_refused(http, served, token, within=BOUND)
            for _ in range(4):
                async with httpx2.AsyncClient(timeout=10) as fresh:
                    outcome = await call_tool(fresh, served, token, "demo__echo", {"text": "w"})
                assert outcome.refused
    finally:
        stop_replica(served)
