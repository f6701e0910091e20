"""Two broker replicas on loopback against one PostgreSQL, and what they share. Runs here:

    .venv/bin/python -m examples.replicas.run_two_replicas [--postgres postgresql://postgres@127.0.0.1:5432/test]

It creates a fresh database next to ``--postgres`` (dropped at the end), writes one
``broker.toml`` both replicas use (same store, key directory and public URL), starts two
``broker serve`` processes, gets a task token from replica A, calls a tool on replica B with it,
revokes the token through the shared store and shows replica B refusing it, then stops both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx2
import jwt

from broker.core.revocation import RevocationKind
from broker.store import open_store
from broker.store.testing import temporary_postgres_url
from examples.replicas.cluster import (
    add_agent,
    call_tool,
    get_token,
    prepare_store,
    start_replica,
    stop_replica,
    wait_ready,
    write_config,
)


async def main(postgres: str) -> None:
    async with temporary_postgres_url(postgres) as url:
        with tempfile.TemporaryDirectory(prefix="two-replicas-") as tmp:
            config = write_config(Path(tmp), url)
            await prepare_store(config)
            client_id, secret = await add_agent(config, "demo-agent", ["demo:use"])
            a, b = start_replica(config, "a"), start_replica(config, "b")
            try:
                await wait_ready([a, b])
                print(f"replica A: {a.url}   replica B: {b.url}   store: {url}")
                async with httpx2.AsyncClient(timeout=10) as http:
                    token = await get_token(http, a, client_id, secret)
                    print(
                        "token from A; call on B:",
                        (
                            await call_tool(http, b, token, "demo__echo", {"text": "hello from B"})
                        ).text,
                    )
                    store = open_store(url, pool_size=1, max_overflow=0)
                    try:
                        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
                        await store.revoke(
                            RevocationKind.TOKEN,
                            jti,
                            reason="demo",
                            actor="admin:demo",
                            at=datetime.now(UTC),
                        )
                    finally:
                        await store.aclose()
                    revoked = time.perf_counter()
                    with anyio.fail_after(10):
                        while not (
                            outcome := await call_tool(
                                http, b, token, "demo__echo", {"text": "again"}
                            )
                        ).refused:
                            pass
                    delay = (time.perf_counter() - revoked) * 1000
                    print(f"revoked; B refused it ({outcome.status}) after {delay:.0f} ms")
            finally:
                stop_replica(a)
                stop_replica(b)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Two broker replicas on loopback.")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    anyio.run(main, parser.parse_args().postgres)
