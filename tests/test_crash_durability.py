"""Crash durability of the record (issue 5, "Done when": the crash test).

A real ``broker serve`` process (SQLite, and PostgreSQL) serves eight concurrent SDK clients over
streamable HTTP (2026-07-28 era), allowed and denied calls under four task tokens. Once enough
responses have reached the clients the broker's process group is killed with ``SIGKILL``. With no
broker running, every decision id a client received must be in the store (a forwarded call's
result event too, since the response was sent after it), and ``broker sessions verify --all``
must exit 0: the sessions the kill cut are open, not sealed, and their chains are intact. The
broker is then started again on the same files: it serves, and the chains still verify.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
import httpx2
import mcp.types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.agents import register_agent
from broker.config import load_config
from broker.core.recording import EventKind, verify_chain
from broker.keys import ensure_recording_key, ensure_signing_key
from broker.mediation import DECISION_META
from broker.registry import Registry
from broker.store import SqlStore, open_store
from broker.store.testing import sqlite_url, temporary_postgres_url

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BROKER = Path(sys.executable).parent / "broker"
ERA = "2026-07-28"
WORKERS = 8
TOKENS = 4
KILL_AFTER = 240
"""Responses the clients must have received before the broker is killed."""
DENIAL = re.compile(r"denied \(([a-z,-]+)\); decision (dec_[0-9a-f]{20})")

SCOPES = """
[[scope]]
name = "demo:echo"
[[scope.grant]]
connector = "demo"
tools = ["echo"]
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Site:
    """A broker's files: ``broker.toml`` (on ``store_url``), scopes, keys, and its port."""

    directory: Path
    store_url: str
    port: int = field(default_factory=free_port)

    @property
    def config(self) -> Path:
        return self.directory / "broker.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self) -> None:
        (self.directory / "scopes.toml").write_text(SCOPES, encoding="utf-8")
        self.config.write_text(
            f"""scope_files = ["scopes.toml"]

[server]
host = "127.0.0.1"
port = {self.port}
public_url = "{self.url}"

[store]
url = "{self.store_url}"

[tokens]
keys_dir = "keys"

[limits]
agent_calls_per_minute = 0
agent_max_concurrent = 0
connector_max_concurrent = 0

[detectors]
shadow = true

[[connectors]]
id = "demo"
kind = "native"
target = "broker.demo_tools:toolset"
""",
            encoding="utf-8",
        )

    @asynccontextmanager
    async def store(self) -> AsyncIterator[SqlStore]:
        store = open_store(self.store_url, pool_size=2, max_overflow=0)
        try:
            yield store
        finally:
            await store.aclose()

    async def prepare(self) -> tuple[str, str]:
        """What ``broker init`` and ``connectors approve --all`` do; returns an agent's creds."""
        self.write()
        config = load_config(self.config, {})
        ensure_recording_key(config.recording.hmac_key, config.base_dir)
        now = datetime.now(UTC)
        async with self.store() as store:
            await store.migrate()
            await ensure_signing_key(store, config.tokens.keys_dir, now)
            async with await Registry.from_config(config, store, environ=dict(os.environ)):
                pass
            for pin in await store.list_pins():
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "test", now)
            agent, secret = await register_agent(
                store,
                name="loader",
                owner="ops@example.com",
                scopes=["demo:echo"],
                max_ttl=600,
                now=now,
            )
        assert secret is not None
        return agent.id, secret


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def start(site: Site, name: str) -> Served:
    """``broker serve`` in a process group of its own (so the kill reaches any child)."""
    log = site.directory / f"{name}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    environ["PYTHONPATH"] = str(REPO)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(BROKER), "serve", "--config", str(site.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environ,
            cwd=site.directory,
            start_new_session=True,
        )
    return Served(process, log)


async def ready(site: Site, served: Served, *, within: float = 60) -> None:
    async with httpx2.AsyncClient(timeout=2) as http:
        with anyio.fail_after(within):
            while True:
                if served.process.poll() is not None:
                    raise RuntimeError(
                        f"broker exited {served.process.returncode}\n{served.tail()}"
                    )
                with suppress(httpx2.TransportError):
                    if (await http.get(site.url + "/readyz")).status_code == 200:
                        return
                await anyio.sleep(0.05)


async def kill(served: Served) -> None:
    """SIGKILL the broker's process group and reap it (bounded)."""
    with suppress(ProcessLookupError):
        os.killpg(served.process.pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(served.process.wait, 10)
    assert served.process.returncode == -signal.SIGKILL


async def stop(served: Served) -> None:
    """Stop gracefully (SIGTERM); SIGKILL only if it does not exit within the bound."""
    if served.process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(served.process.pid, signal.SIGTERM)
    try:
        await anyio.to_thread.run_sync(served.process.wait, 15)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hung shutdown
        await kill(served)


async def task_token(site: Site, client_id: str, secret: str) -> str:
    async with httpx2.AsyncClient(timeout=10) as http:
        with anyio.fail_after(20):
            response = await http.post(
                site.url + "/oauth/token",
                data={"grant_type": "client_credentials", "scope": "demo:echo"},
                auth=httpx2.BasicAuth(client_id, secret),
            )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


@dataclass
class Received:
    """Every decision whose response reached a client: id -> whether it was allowed."""

    decisions: dict[str, bool] = field(default_factory=dict[str, bool])

    def take(self, result: types.CallToolResult, *, allowed: bool, text: str) -> None:
        if allowed:
            assert not result.is_error, text_of(result)
            assert text_of(result) == text
            assert result.meta is not None
            self.decisions[result.meta[DECISION_META]] = True
        else:
            match = DENIAL.fullmatch(text_of(result))
            assert match is not None, text_of(result)
            assert match.group(1) == "scope-missing"
            self.decisions[match.group(2)] = False


async def load(
    site: Site, tokens: list[str], received: Received, *, until: int, kill_with: Served | None
) -> int:
    """``WORKERS`` clients call concurrently. Once ``until`` responses have arrived the broker is
    killed (``kill_with``) while the clients keep calling, or the clients just stop. Returns how
    many clients had a call cut by the kill (those calls' responses never arrived)."""
    done = anyio.Event()
    killed = anyio.Event()
    cut = 0

    async def worker(n: int) -> None:
        nonlocal cut
        headers = {"authorization": f"Bearer {tokens[n % len(tokens)]}"}
        i = 0
        try:
            async with (
                httpx2.AsyncClient(headers=headers, timeout=20) as http,
                Client(streamable_http_client(site.url + "/mcp", http_client=http), mode=ERA) as c,
            ):
                while not (done.is_set() and kill_with is None):
                    i += 1
                    text = f"w{n}-{i}"
                    denied = i % 5 == 0
                    with anyio.fail_after(20):
                        if denied:
                            result = await c.call_tool("demo__add", {"a": n, "b": i})
                        else:
                            result = await c.call_tool("demo__echo", {"text": text})
                    received.take(result, allowed=not denied, text=text)
                    if len(received.decisions) >= until:
                        done.set()
        except Exception:
            if not killed.is_set():
                raise
            cut += 1

    async def killer() -> None:
        await done.wait()
        if kill_with is not None:
            killed.set()  # from here on a client's failure is the kill's doing
            await kill(kill_with)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            for n in range(WORKERS):
                tg.start_soon(worker, n)
    return cut


async def check_record(site: Site, received: Received) -> tuple[int, int]:
    """Every received decision is recorded once (with its result when allowed); every chain
    verifies in-process. Returns how many sessions are still open (cut, not sealed) and how
    many decision events the store holds."""
    async with site.store() as store:
        with anyio.fail_after(60):
            for decision_id, allowed in received.decisions.items():
                # The first event carrying the id (a shadow detector signal may precede the
                # decision); the session then holds exactly one decision event for it.
                first = await store.find_event_by_decision(decision_id)
                mine = [
                    e
                    for e in await store.session_events(first.session_id)
                    if e.decision_id == decision_id
                ]
                decisions = [e for e in mine if e.kind == EventKind.DECISION]
                assert len(decisions) == 1, (decision_id, [e.kind for e in mine])
                assert decisions[0].payload["allowed"] is allowed
                if allowed:
                    assert [e.kind for e in mine if e.seq > decisions[0].seq] == [
                        EventKind.RESULT
                    ], (decision_id, [e.kind for e in mine])
            sessions = await store.list_sessions(limit=1000)
            assert sessions
            recorded = 0
            for session in sessions:
                events = await store.session_events(session.id)
                report = verify_chain(session, events)
                assert report.ok, report
                recorded += sum(1 for e in events if e.kind == EventKind.DECISION)
            return sum(1 for s in sessions if s.head_hash is None), recorded


async def verify_cli(site: Site) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [str(BROKER), "sessions", "verify", "--all", "--config", str(site.config)],
            cwd=site.directory,
            env=environ,
            check=False,
        )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    return out


async def crash_and_recover(site: Site) -> None:
    client_id, secret = await site.prepare()
    first = start(site, "first")
    try:
        await ready(site, first)
        tokens = [await task_token(site, client_id, secret) for _ in range(TOKENS)]
        received = Received()
        cut = await load(site, tokens, received, until=KILL_AFTER, kill_with=first)
    finally:
        if first.process.poll() is None:
            await kill(first)
    assert len(received.decisions) >= KILL_AFTER
    assert cut == WORKERS, "every client was still calling when the broker was killed"
    assert not all(received.decisions.values()), "the load mixed allowed and denied calls"

    # No broker running: the record holds every answered call, and the chains verify.
    open_sessions, recorded = await check_record(site, received)
    assert open_sessions >= 1, "the kill cut at least one session"
    # Decided but never answered: at most the one call each client had in flight.
    assert len(received.decisions) <= recorded <= len(received.decisions) + WORKERS
    verified = await verify_cli(site)
    assert "sessions verified" in verified

    # The broker starts again on the same files, serves the old tokens and new ones, and the
    # chains (old sessions cut by the kill, new ones) still verify.
    second = start(site, "second")
    try:
        await ready(site, second)
        tokens = [*tokens[:2], await task_token(site, client_id, secret)]
        more = Received()
        await load(site, tokens, more, until=40, kill_with=None)
    finally:
        await stop(second)
    assert not set(more.decisions) & set(received.decisions)
    await check_record(site, Received({**received.decisions, **more.decisions}))
    await verify_cli(site)


async def test_every_answered_call_survives_a_sigkill_under_load_and_chains_verify_on_sqlite(
    tmp_path: Path,
) -> None:
    await crash_and_recover(Site(tmp_path, sqlite_url(tmp_path)))


@pytest.mark.postgres
async def test_every_answered_call_survives_a_sigkill_under_load_and_chains_verify_on_postgres(
    tmp_path: Path,
) -> None:
    async with temporary_postgres_url() as url:
        await crash_and_recover(Site(tmp_path, url))
