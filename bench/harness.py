"""Measure `tools/call` round trips of the echo tool against one or more MCP endpoints.

Layout: every server runs in its own process (the echo server over HTTP for *direct*; `broker
serve` with the echo server as a stdio connector for *broker*), and this process only generates
load. Each worker holds its own `mcp.Client` session (16 workers = 16 agents), opened and warmed
up before anything is timed. Targets alternate within each round, and the one that goes first
alternates between rounds, so drift on a noisy machine hits every target alike.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

__all__ = [
    "BenchConfig",
    "Endpoint",
    "Series",
    "broker_endpoint",
    "direct_endpoint",
    "run_bench",
]

REPO = Path(__file__).resolve().parent.parent
MODES = {"2025": "legacy", "2026": "2026-07-28"}
ECHO_TEXT = "hello from the bench"
CALL_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    url: str
    token: str | None = None


@dataclass(frozen=True, slots=True)
class BenchConfig:
    calls: int = 150
    rounds: int = 10
    concurrencies: tuple[int, ...] = (1, 16)
    protocol: str = "2026"
    warmup: int = 20


@dataclass
class Series:
    """Every timed call of one target at one concurrency, summed over the rounds."""

    target: str
    concurrency: int
    latencies: list[float] = field(default_factory=list[float])
    elapsed: float = 0.0
    round_rates: list[float] = field(default_factory=list[float])

    @property
    def calls_per_s(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return math.nan
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index] * 1000

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "calls": len(self.latencies),
            "calls_per_s": round(self.calls_per_s, 1),
            "p50_ms": round(self.percentile_ms(0.50), 3),
            "p99_ms": round(self.percentile_ms(0.99), 3),
            "round_calls_per_s": [round(r, 1) for r in self.round_rates],
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _read_listening_url(process: Process) -> str:
    assert process.stdout is not None
    seen = ""
    async for chunk in TextReceiveStream(process.stdout):
        seen += chunk
        for line in seen.splitlines():
            if line.startswith("listening on "):
                return line.removeprefix("listening on ").strip()
    raise RuntimeError(f"server exited before listening; output: {seen!r}")


async def _stop(process: Process) -> None:
    if process.returncode is None:
        process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    await process.aclose()


@asynccontextmanager
async def direct_endpoint() -> AsyncIterator[Endpoint]:
    """The echo server's own streamable HTTP endpoint, in a child process."""
    command = [sys.executable, "-m", "bench.echo_server", "--http", "--port", "0"]
    process = await anyio.open_process(command, cwd=REPO, stderr=None)
    try:
        with anyio.fail_after(20):
            url = await _read_listening_url(process)
        yield Endpoint("direct", url)
    finally:
        await _stop(process)


BROKER_TOML = """\
scope_files = ["scopes.toml"]

[server]
host = "127.0.0.1"
port = {port}

[store]
url = "{store_url}"

[tokens]
keys_dir = "keys"
max_ttl = 3600

[limits]
agent_calls_per_minute = 0
agent_max_concurrent = 0
connector_calls_per_minute = 0
connector_max_concurrent = 0

# Every detector runs on every call (their cost is part of the figure), in shadow mode so a
# finding is recorded but never blocks. The bench agent's known workload is hundreds of calls
# a second, so its rate thresholds say so; a flood from an agent without them would be stopped.
[detectors]
shadow = true

[detectors.rate]
cap_per_minute = 100000
spike_floor_per_minute = 100000

[[connectors]]
id = "echo"
kind = "stdio"
prefix = ""
command = "{python}"
args = ["-m", "bench.echo_server", "--stdio"]
cwd = "{repo}"
env_allowlist = ["PATH", "HOME", "LANG", "PYTHONPATH"]
sandbox = "{sandbox}"
"""

BENCH_SCOPES = """\
[[scope]]
name = "bench:echo"
description = "The bench's echo tool"
[[scope.grant]]
connector = "echo"
tools = ["echo"]
"""


SQLITE_STORE = "sqlite+aiosqlite:///broker.db"
"""The bench broker's default store: a SQLite file in its working folder."""


def _broker_cli(workdir: Path, *args: str, store_url: str | None = None) -> str:
    """Run ``broker ARGS --config workdir/broker.toml``; ``store_url`` overrides the store."""
    broker = Path(sys.executable).parent / "broker"
    command = [str(broker), *args, "--config", str(workdir / "broker.toml")]
    env = dict(os.environ)
    if store_url is not None:
        env["BROKER_STORE__URL"] = store_url
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`broker {' '.join(args)}` failed ({done.returncode}): {done.stderr or done.stdout}"
        )
    return done.stdout


@contextmanager
def _broker_workdir() -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def prepare_broker(
    workdir: Path, port: int, sandbox: str = "auto", store_url: str = SQLITE_STORE
) -> str:
    """Write broker.toml and scopes, init the store and keys, register an agent; return a token."""
    # `init` writes its own broker.toml (replaced below); the override puts its keys in our store.
    _broker_cli(workdir, "init", store_url=store_url)
    (workdir / "scopes.toml").write_text(BENCH_SCOPES)
    (workdir / "broker.toml").write_text(
        BROKER_TOML.format(
            port=port, python=sys.executable, repo=REPO, sandbox=sandbox, store_url=store_url
        )
    )
    _broker_cli(
        workdir,
        "agents",
        "add",
        "bench-agent",
        "--scopes",
        "bench:echo",
        "--owner",
        "bench",
        "--max-ttl",
        "1h",
        "--json",
    )
    minted = json.loads(
        _broker_cli(
            workdir,
            "token",
            "mint",
            "--agent",
            "bench-agent",
            "--scope",
            "bench:echo",
            "--task-purpose",
            "benchmark",
            "--ttl",
            "1h",
            "--json",
        )
    )
    return str(minted["access_token"])


async def _wait_healthy(base_url: str, process: Process) -> None:
    async with httpx2.AsyncClient(timeout=2.0) as http:
        with anyio.fail_after(30):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"broker serve exited with {process.returncode}")
                try:
                    if (await http.get(f"{base_url}/healthz")).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                await anyio.sleep(0.1)


async def _wait_tool_visible(endpoint: Endpoint, mode: str, workdir: Path) -> None:
    """Approve the echo tool's pin once the broker has seen it, then wait until it is listed."""
    with anyio.fail_after(30):
        while True:
            async with _client(endpoint, mode) as client:
                names = {t.name for t in (await client.list_tools()).tools}
            if "echo" in names:
                return
            with suppress(RuntimeError):
                await anyio.to_thread.run_sync(
                    lambda: _broker_cli(workdir, "connectors", "approve", "echo", "--all", "--yes")
                )
            await anyio.sleep(0.2)


@asynccontextmanager
async def broker_endpoint(
    protocol: str, sandbox: str = "auto", store_url: str = SQLITE_STORE, *, record: bool = True
) -> AsyncIterator[Endpoint]:
    """`broker serve` in a child process fronting the echo server as a stdio connector.

    ``sandbox`` is the echo connector's sandbox mode: ``auto`` (jailed where the platform
    allows, the default for every stdio connector), ``required`` or ``off``. ``store_url`` is
    the broker's store (a SQLite file in its folder by default). ``record=False`` serves the
    same config with recording off (`bench.unrecorded`): the endpoint is then named
    ``mediation`` rather than ``broker``.
    """
    with _broker_workdir() as workdir:
        port = _free_port()
        token = await anyio.to_thread.run_sync(prepare_broker, workdir, port, sandbox, store_url)
        config = str(workdir / "broker.toml")
        env = {**os.environ, "BROKER_LOG_LEVEL": "WARNING"}
        if record:
            command = [str(Path(sys.executable).parent / "broker"), "serve", "--config", config]
        else:
            command = [sys.executable, "-m", "bench.unrecorded", "--config", config]
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            )
        process = await anyio.open_process(
            command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=None
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await _wait_healthy(base, process)
            endpoint = Endpoint("broker" if record else "mediation", f"{base}/mcp", token)
            await _wait_tool_visible(endpoint, MODES[protocol], workdir)
            yield endpoint
        finally:
            await _stop(process)


@asynccontextmanager
async def _client(endpoint: Endpoint, mode: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}
    timeout = httpx2.Timeout(30.0, read=300.0)
    transport_client = httpx2.AsyncClient(headers=headers, timeout=timeout)
    async with transport_client as http:
        target = streamable_http_client(endpoint.url, http_client=http)
        async with Client(target, mode=mode) as client:
            yield client


_sequence = iter(range(1 << 62))


async def _call(client: Client) -> None:
    # Each call's text differs, as real work does (identical calls in a loop are what the
    # loop detector is for).
    with anyio.fail_after(CALL_TIMEOUT):
        result = await client.call_tool("echo", {"text": f"{ECHO_TEXT} {next(_sequence)}"})
    if result.is_error:
        raise RuntimeError(f"echo returned a tool error: {result.content}")


async def _timed_round(clients: Sequence[Client], calls: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    shares = [calls // len(clients) + (i < calls % len(clients)) for i in range(len(clients))]

    async def worker(client: Client, count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            await _call(client)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for client, count in zip(clients, shares, strict=True):
            tg.start_soon(worker, client, count)
    return latencies, time.perf_counter() - started


async def _warm(clients: Sequence[Client], calls: int) -> None:
    await _timed_round(clients, max(calls, len(clients)))


async def run_bench(endpoints: Sequence[Endpoint], config: BenchConfig) -> list[Series]:
    """Alternate the endpoints round by round at each concurrency; warm-up calls are not timed."""
    mode = MODES[config.protocol]
    pool_size = max(config.concurrencies)
    series = {(e.name, c): Series(e.name, c) for e in endpoints for c in config.concurrencies}
    async with AsyncExitStack() as stack:
        pools: dict[str, list[Client]] = {}
        for endpoint in endpoints:
            pools[endpoint.name] = [
                await stack.enter_async_context(_client(endpoint, mode)) for _ in range(pool_size)
            ]
            await _warm(pools[endpoint.name], config.warmup * pool_size)
        for round_no in range(config.rounds):
            order = list(endpoints) if round_no % 2 == 0 else list(reversed(endpoints))
            for concurrency in config.concurrencies:
                for endpoint in order:
                    clients = pools[endpoint.name][:concurrency]
                    await _warm(clients, concurrency)
                    latencies, elapsed = await _timed_round(clients, config.calls)
                    entry = series[(endpoint.name, concurrency)]
                    entry.latencies.extend(latencies)
                    entry.elapsed += elapsed
                    entry.round_rates.append(len(latencies) / elapsed)
    return list(series.values())
