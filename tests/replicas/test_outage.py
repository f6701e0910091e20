"""PostgreSQL stops under two real replicas: both refuse within the bound, and come back alone.

Runs on a PRIVATE cluster this test creates (``initdb`` into a temporary directory as the
``postgres`` OS user, its own port, ``pg_ctl start/stop``): the machine's shared server is never
touched. The stop is ``-m immediate`` (a crash, no checkpoint): what was acknowledged must
survive it anyway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import asyncpg
import httpx2
import jwt
import pytest

from broker.core.revocation import RevocationKind
from broker.store import open_store
from examples.replicas.cluster import (
    Replica,
    add_agent,
    call_tool,
    free_port,
    get_token,
    prepare_store,
    start_replica,
    stop_replica,
    wait_ready,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BOUND = 3.0
"""``[store] revocation_staleness`` for this test (shorter than the default to keep it quick)."""


@dataclass
class PrivateCluster:
    data: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        self.ctl("start", "-w", "-t", "30", "-l", str(self.log), "-o", options)

    def stop(self) -> None:
        self.ctl("stop", "-m", "immediate", "-w", "-t", "30")


def _as_postgres(*argv: str) -> None:
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("needs PostgreSQL 15 binaries and runuser")
    root = Path(tempfile.mkdtemp(prefix="broker-pg-"))
    shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    cluster = PrivateCluster(root / "data", free_port(), root / "postgres.log")
    try:
        _as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(cluster.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _until(condition: Callable[[], bool], *, within: float) -> None:
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


async def _until_each(
    http: httpx2.AsyncClient,
    replicas: list[Replica],
    token: str,
    want: Callable[[int, bool], bool],
    *,
    within: float,
) -> float:
    """Call every replica until each answers as ``want(status, allowed)``; seconds it took."""
    started = time.monotonic()
    with anyio.fail_after(within):
        for replica in replicas:
            while True:
                try:
                    outcome = await call_tool(http, replica, token, "demo__echo", {"text": "o"})
                    status, allowed = outcome.status, outcome.allowed
                except httpx2.TransportError:
                    status, allowed = 0, False
                if want(status, allowed):
                    break
                await anyio.sleep(0.02)
    return time.monotonic() - started


async def test_with_postgres_stopped_every_replica_refuses_within_the_bound_and_recovers(
    private_postgres: PrivateCluster, tmp_path: Path
) -> None:
    pg = private_postgres
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute('CREATE DATABASE "broker"')
    finally:
        await admin.close()
    store_url = f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/broker"
    config = write_config(tmp_path, store_url, staleness=BOUND)
    await prepare_store(config)
    client_id, secret = await add_agent(config, "outage", ["demo:use"])
    replicas = [start_replica(config, "a"), start_replica(config, "b")]
    try:
        await wait_ready(replicas, within=90)
        async with httpx2.AsyncClient(timeout=10) as http:
            token = await get_token(http, replicas[0], client_id, secret)
            doomed = await get_token(http, replicas[1], client_id, secret)
            doomed_jti = str(jwt.decode(doomed, options={"verify_signature": False})["jti"])
            store = open_store(store_url, pool_size=1, max_overflow=0)
            try:
                # Acknowledged just before the crash: must hold after it.
                await store.revoke(
                    RevocationKind.TOKEN, doomed_jti, reason="t", actor="admin:t", at=_now()
                )
            finally:
                await store.aclose()
            await _until_each(http, replicas, doomed, lambda s, ok: s == 401, within=BOUND)
            await _until_each(http, replicas, token, lambda s, ok: ok, within=BOUND)

            pg.stop()
            stopped = time.monotonic()
            # Calls fail closed at once (their records cannot be written), at the latest when the
            # revocation view passes the bound, and the replicas then report themselves not ready.
            refused_after = await _until_each(
                http, replicas, token, lambda s, ok: not ok, within=BOUND + 2
            )
            assert refused_after <= BOUND + 0.5
            with anyio.fail_after(BOUND + 2):
                for replica in replicas:
                    while True:
                        status = (await http.get(replica.url + "/readyz")).status_code
                        if status in (404, 503):  # 404: the route is not mounted yet
                            break
                        await anyio.sleep(0.05)
            assert time.monotonic() - stopped <= BOUND + 1.5

            pg.start()
            back_after = await _until_each(http, replicas, token, lambda s, ok: ok, within=30)
            for replica in replicas:
                outcome = await call_tool(http, replica, doomed, "demo__echo", {"text": "o"})
                assert outcome.status == 401
            # Notifications flow again: a new revocation lands within the bound.
            store = open_store(store_url, pool_size=1, max_overflow=0)
            try:
                token_jti = str(jwt.decode(token, options={"verify_signature": False})["jti"])
                await store.revoke(
                    RevocationKind.TOKEN, token_jti, reason="t", actor="admin:t", at=_now()
                )
                assert {t.jti for t in await store.list_tokens()} >= {token_jti, doomed_jti}
            finally:
                await store.aclose()
            await _until_each(http, replicas, token, lambda s, ok: s == 401, within=BOUND)
        assert back_after < 30
    finally:
        for replica in replicas:
            stop_replica(replica)


def _now() -> datetime:
    return datetime.now(UTC)
