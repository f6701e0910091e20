"""Two broker replicas on this machine against the local PostgreSQL: throughput, latency, and
revocation propagation delay. Run by hand:

    .venv/bin/python -m bench.replicas [--calls 2000] [--concurrency 16] [--revocations 100]

Layout: replicas A and B are ``broker serve`` processes on loopback ports sharing one fresh
database on 127.0.0.1:5432 (dropped afterwards); this process only generates load, with raw
stateless 2026-07-28 ``tools/call`` requests of ``demo__echo`` over pooled HTTP connections.

- Throughput: the same number of calls at the same concurrency against A alone, then spread
  over A and B (alternating), in rounds that alternate which goes first.
- Propagation: for each of ``--revocations`` tokens (all usable on B first), the token is revoked
  through the shared store (what ``broker token revoke`` or A's admin API write), and B is called
  in a loop until it refuses; the delay runs from the revocation's commit to the refusal's
  arrival, so it includes one request round trip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt

from broker.core.revocation import RevocationKind
from broker.store import open_store
from broker.store.testing import temporary_postgres_url
from examples.replicas.cluster import (
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


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(
    http: httpx2.AsyncClient, targets: Sequence[Replica], token: str, calls: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(calls))

    async def worker() -> None:
        nonlocal failures
        for i in counter:
            started = time.perf_counter()
            outcome = await call_tool(
                http, targets[i % len(targets)], token, "demo__echo", {"text": "b"}
            )
            latencies.append(time.perf_counter() - started)
            failures += not outcome.allowed

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - started
    return {
        "calls_per_s": calls / elapsed,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "failures": failures,
    }


async def _propagation(
    http: httpx2.AsyncClient, a: Replica, b: Replica, store_url: str, creds: tuple[str, str], n: int
) -> list[float]:
    tokens = [await get_token(http, a, *creds) for _ in range(n)]
    for token in tokens:
        assert (await call_tool(http, b, token, "demo__echo", {"text": "p"})).allowed
    store = open_store(store_url, pool_size=1, max_overflow=0)
    delays: list[float] = []
    try:
        for token in tokens:
            jti = str(jwt.decode(token, options={"verify_signature": False})["jti"])
            await store.revoke(
                RevocationKind.TOKEN, jti, reason="bench", actor="bench", at=datetime.now(UTC)
            )
            committed = time.perf_counter()
            with anyio.fail_after(30):
                while not (await call_tool(http, b, token, "demo__echo", {"text": "p"})).refused:
                    pass
            delays.append(time.perf_counter() - committed)
    finally:
        await store.aclose()
    return delays


async def run(calls: int, concurrency: int, revocations: int, rounds: int) -> dict[str, Any]:
    async with temporary_postgres_url() as url:
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            # Rate limits are per replica and would cap the load; the bench measures the broker.
            unlimited = "[limits]\nagent_calls_per_minute = 0\nagent_max_concurrent = 0\n"
            config = write_config(Path(tmp), url, pool_size=10, extra=unlimited)
            await prepare_store(config)
            creds = await add_agent(config, "bench", ["demo:use"])
            replicas = [start_replica(config, "a"), start_replica(config, "b")]
            try:
                await wait_ready(replicas, within=120)
                a, b = replicas
                limits = httpx2.Limits(max_connections=concurrency * 2)
                async with httpx2.AsyncClient(timeout=30, limits=limits) as http:
                    token = await get_token(http, a, *creds)
                    await _load(http, replicas, token, 200, concurrency)  # warm both
                    series: dict[str, list[dict[str, float]]] = {"one": [], "two": []}
                    for r in range(rounds):
                        order = [("one", [a]), ("two", [a, b])]
                        for name, targets in order if r % 2 == 0 else order[::-1]:
                            series[name].append(
                                await _load(http, targets, token, calls, concurrency)
                            )
                    delays = await _propagation(http, a, b, url, creds, revocations)
            finally:
                for replica in replicas:
                    stop_replica(replica)
    summary: dict[str, Any] = {
        name: {
            key: round(statistics.median(s[key] for s in runs), 2)
            for key in ("calls_per_s", "p50_ms", "p99_ms", "failures")
        }
        for name, runs in series.items()
    }
    summary["two_vs_one"] = round(summary["two"]["calls_per_s"] / summary["one"]["calls_per_s"], 2)
    summary["propagation_ms"] = {
        "count": len(delays),
        "median": round(statistics.median(delays) * 1000, 2),
        "p99": round(_percentile(delays, 0.99) * 1000, 2),
        "worst": round(max(delays) * 1000, 2),
    }
    summary["setup"] = {"calls": calls, "concurrency": concurrency, "rounds": rounds}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--revocations", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = anyio.run(run, args.calls, args.concurrency, args.revocations, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
