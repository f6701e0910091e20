"""Broker replicas as real processes on loopback: the plumbing of the two-replica example, the
replica tests and ``bench/replicas.py``.

Each replica is a ``broker serve`` process on its own port with the same ``broker.toml``: one
PostgreSQL store, one key directory, one public URL (the issuer and token audience the load
balancer would present). Agents talk to any replica over the stateless 2026-07-28 HTTP path
(`call_tool`), with task tokens from any replica's token endpoint (`get_token`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2

__all__ = [
    "BROKER",
    "REPO",
    "DEMO_CONNECTOR",
    "DEMO_SCOPES",
    "PROTOCOL",
    "Outcome",
    "Replica",
    "add_agent",
    "call_tool",
    "free_port",
    "get_token",
    "prepare_store",
    "start_replica",
    "stop_replica",
    "wait_ready",
    "write_config",
]

REPO = Path(__file__).resolve().parents[2]
BROKER = Path(sys.executable).parent / "broker"
PROTOCOL = "2026-07-28"
PUBLIC_URL = "http://broker.replicas.test"
"""The URL a load balancer would present: issuer and audience of every replica's tokens."""

DEMO_CONNECTOR = """
[[connectors]]
id = "demo"
kind = "native"
target = "broker.demo_tools:toolset"
"""
DEMO_SCOPES = """
[[scope]]
name = "demo:use"
description = "The broker's built-in demo tools"
[[scope.grant]]
connector = "demo"
tools = ["*"]
"""


def free_port() -> int:
    """A loopback port free right now (the replica binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    workdir: Path,
    store_url: str,
    *,
    staleness: float = 5.0,
    connectors: str = DEMO_CONNECTOR,
    scopes: str = DEMO_SCOPES,
    public_url: str = PUBLIC_URL,
    pool_size: int = 5,
    extra: str = "",
) -> Path:
    """Write ``broker.toml`` and ``scopes.toml`` into ``workdir``; returns the config path."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "scopes.toml").write_text(scopes, encoding="utf-8")
    config = workdir / "broker.toml"
    config.write_text(
        f"""scope_files = ["scopes.toml"]
{extra}
[server]
host = "127.0.0.1"
public_url = "{public_url}"

[store]
url = "{store_url}"
pool_size = {pool_size}
revocation_staleness = {staleness}

[tokens]
keys_dir = "keys"
{connectors}""",
        encoding="utf-8",
    )
    return config


async def prepare_store(config_path: Path) -> None:
    """Migrate, create the signing and recording keys, and approve every tool offered now.

    What ``broker init`` plus ``broker connectors approve --all`` do, before any replica starts.
    """
    from broker.config import load_config
    from broker.keys import ensure_recording_key, ensure_signing_key
    from broker.registry import Registry
    from broker.store import open_store

    config = load_config(config_path, {})
    # Created once here, as `broker init` does: replicas starting together would race for it.
    ensure_recording_key(config.recording.hmac_key, config.base_dir)
    store = open_store(config.store.url, pool_size=2, max_overflow=2)
    try:
        await store.migrate()
        now = datetime.now(UTC)
        await ensure_signing_key(store, config.tokens.keys_dir, now)
        registry = await Registry.from_config(config, store, environ=dict(os.environ))
        async with registry:
            pass
        for pin in await store.list_pins():
            if pin.approved_digest != pin.digest:
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "setup", now)
    finally:
        await store.aclose()


async def add_agent(config_path: Path, name: str, scopes: Sequence[str]) -> tuple[str, str]:
    """Register an agent in the shared store; returns its client id and secret."""
    from broker.agents import register_agent
    from broker.config import load_config
    from broker.store import open_store

    config = load_config(config_path, {})
    store = open_store(config.store.url, pool_size=1, max_overflow=0)
    try:
        agent, secret = await register_agent(
            store,
            name=name,
            owner="ops@example.com",
            scopes=scopes,
            max_ttl=600,
            now=datetime.now(UTC),
        )
    finally:
        await store.aclose()
    assert secret is not None
    return agent.id, secret


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_replica(
    config_path: Path,
    name: str,
    *,
    port: int | None = None,
    workers: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Replica:
    """Start ``broker serve`` for ``config_path`` on a loopback port (not waiting for it)."""
    port = port or free_port()
    log = config_path.parent / f"{name}.log"
    argv = [str(BROKER), "serve", "--config", str(config_path), "--port", str(port)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BROKER_") or k == "BROKER_LOG_LEVEL"
    }
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    environ.update(env or {})
    with log.open("ab") as out:
        process = subprocess.Popen(  # noqa: S603 - our own broker, fixed argv
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environ,
            cwd=config_path.parent,
            start_new_session=True,
        )
    return Replica(name, port, process, log)


async def wait_ready(
    replicas: Sequence[Replica], *, within: float = 60.0, path: str = "/healthz"
) -> None:
    """Wait until every replica answers 200 on ``path``.

    Raises:
        RuntimeError: a replica exited (its log's tail is in the message).
        TimeoutError: not ready within ``within`` seconds.
    """
    async with httpx2.AsyncClient(timeout=2) as http:
        with anyio.fail_after(within):
            pending = list(replicas)
            while pending:
                replica = pending[0]
                if replica.process.poll() is not None:
                    raise RuntimeError(
                        f"replica {replica.name} exited with {replica.process.returncode}:\n"
                        + replica.log_tail()
                    )
                try:
                    response = await http.get(replica.url + path)
                except httpx2.TransportError:
                    response = None
                if response is not None and response.status_code == 200:
                    pending.pop(0)
                    continue
                await anyio.sleep(0.05)


def stop_replica(replica: Replica, *, within: float = 10.0) -> None:
    """SIGTERM the replica's process group, then SIGKILL if it has not exited in time."""
    process = replica.process
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(within)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(within)
        except ProcessLookupError:
            pass


async def get_token(
    http: httpx2.AsyncClient,
    replica: Replica,
    client_id: str,
    secret: str,
    *,
    scope: str = "demo:use",
    budget: int | None = None,
    task: str | None = None,
) -> str:
    """A task token from ``replica``'s token endpoint (client credentials)."""
    form = {"grant_type": "client_credentials", "scope": scope}
    if budget is not None:
        form["budget"] = str(budget)
    if task is not None:
        form["task"] = task
    response = await http.post(
        replica.url + "/oauth/token", data=form, auth=httpx2.BasicAuth(client_id, secret)
    )
    if response.status_code != 200:
        raise RuntimeError(f"token request refused: {response.status_code} {response.text}")
    return str(response.json()["access_token"])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a ``tools/call`` got: the HTTP status, and the tool result when there was one."""

    status: int
    result: Mapping[str, Any] | None

    @property
    def text(self) -> str:
        if self.result is None:
            return ""
        content = self.result.get("content") or []
        return "".join(str(c.get("text", "")) for c in content if isinstance(c, dict))

    @property
    def allowed(self) -> bool:
        return self.status == 200 and self.result is not None and not self.result.get("isError")

    @property
    def refused(self) -> bool:
        """401 (the verifier's answer to a revoked token) or a denial naming its reasons."""
        return self.status == 401 or self.text.startswith("denied (")

    def denied_for(self, reason: str) -> bool:
        return self.text.startswith("denied (") and reason in self.text.split(")")[0]


_IDS = iter(range(1, sys.maxsize))


async def call_tool(
    http: httpx2.AsyncClient,
    replica: Replica,
    token: str,
    name: str,
    arguments: Mapping[str, Any],
) -> Outcome:
    """One stateless 2026-07-28 ``tools/call`` on ``replica``."""
    body = {
        "jsonrpc": "2.0",
        "id": next(_IDS),
        "method": "tools/call",
        "params": {
            "name": name,
            "arguments": dict(arguments),
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": PROTOCOL,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "replicas", "version": "0"},
            },
        },
    }
    response = await http.post(
        replica.url + "/mcp",
        content=json.dumps(body),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": PROTOCOL,
            "Mcp-Method": "tools/call",
            "Mcp-Name": name,
        },
    )
    if response.status_code != 200:
        return Outcome(response.status_code, None)
    return Outcome(200, _result(response))


def _result(response: httpx2.Response) -> Mapping[str, Any] | None:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if "result" in message or "error" in message:
                    return message.get("result")
        return None
    return json.loads(response.text).get("result")
