"""`broker init` and `broker serve`: create a broker's files, and run it."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli._common import ConfigOption, console, fail, load, open_store, run
from broker.config import BrokerConfig
from broker.core.identity import AdminRole

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("serve")(serve)


def _time_command() -> str:
    """The absolute path of mcp-server-time beside this Python, so no PATH is needed."""
    sibling = Path(sys.executable).parent / "mcp-server-time"
    if sibling.exists():
        return str(sibling)
    found = shutil.which("mcp-server-time")
    return found or "mcp-server-time"


def _private_files() -> None:
    """Files the broker creates (the SQLite store and its WAL, keys) are readable by it alone."""
    os.umask(0o077)


def init(
    config: ConfigOption = Path("broker.toml"),
    examples: Annotated[
        bool, typer.Option("--examples", help="Add the example connectors and scopes.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Write a commented broker.toml, a signing key and the store; print a first admin token."""
    from broker.templates import CONFIG_TEMPLATE, EXAMPLE_CONNECTORS, EXAMPLE_SCOPES

    _private_files()

    if config.exists() and not force:
        fail(f"{config} already exists (use --force to overwrite it)")
    config.parent.mkdir(parents=True, exist_ok=True)
    scope_files = ""
    connectors = ""
    if examples:
        scopes_path = config.parent / "scopes.toml"
        if not scopes_path.exists() or force:
            scopes_path.write_text(EXAMPLE_SCOPES, encoding="utf-8")
        scope_files = '"scopes.toml"'
        connectors = EXAMPLE_CONNECTORS.format(time_command=_time_command())
    config.write_text(
        CONFIG_TEMPLATE.format(scope_files=scope_files, connectors=connectors), encoding="utf-8"
    )
    cfg = load(config)

    async def body() -> str:
        from broker.admin_tokens import create_admin_token
        from broker.keys import ensure_recording_key, ensure_signing_key

        now = datetime.now(UTC)
        ensure_recording_key(cfg.recording.hmac_key, cfg.base_dir)
        async with open_store(cfg, migrate=True) as store:
            kid = await ensure_signing_key(store, cfg.tokens.keys_dir, now)
            _, raw = await create_admin_token(store, role=AdminRole.ADMIN, name="initial", now=now)
        console.print(f"wrote {config} and the store; signing key {kid} in {cfg.tokens.keys_dir}")
        return raw

    raw = run(body)
    if examples:
        _approve_examples(config)
    console.print("first admin token (shown once, store it now):")
    console.print(f"  {raw}", markup=False)


def _approve_examples(config: Path) -> None:
    """Approve the example connectors' tools as first seen: the operator chose them by --examples.

    Every other connector's tools stay hidden until `broker connectors approve` is run for them.
    """
    from broker.cli.connectors import approve

    console.print("approving the example connectors' tools (first registration):")
    for connector_id in ("time", "demo"):
        approve(
            connector_id=connector_id,
            tools=None,
            approve_all=True,
            refresh=True,
            yes=True,
            config=config,
            json_out=False,
        )


def serve(
    config: ConfigOption = Path("broker.toml"),
    host: Annotated[str | None, typer.Option(help="Override [server] host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override [server] port.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes on this port (default [server] workers); more than 1 needs "
            "a PostgreSQL store.",
        ),
    ] = None,
) -> None:
    """Run the broker (HTTP: /mcp, /oauth/token, /.well-known/*, /healthz, /readyz)."""
    _private_files()
    cfg = load(config)
    if host is not None or port is not None:
        server = cfg.server.model_copy(
            update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
        )
        cfg = cfg.model_copy(update={"server": server})
    count = cfg.server.workers if workers is None else workers
    if count > 1 and not cfg.store.url.startswith("postgresql"):
        fail(
            f"--workers {count} needs a PostgreSQL store: worker processes share revocations, "
            "budgets and records through it, and a SQLite file is one process's store. Set "
            '[store] url = "postgresql+asyncpg://..." or run one worker.',
            2,
        )
    base = cfg.server.base_url
    console.print(f"mcp-authz-broker serving on http://{cfg.server.host}:{cfg.server.port}")
    console.print(f"  MCP endpoint:   {cfg.server.resource_url}")
    console.print(f"  token endpoint: {base}/oauth/token")
    console.print("connect an agent:")
    console.print(
        "  .venv/bin/broker agents add my-agent --owner you --scopes time:read,demo:use "
        f"--config {config}"
    )
    console.print(
        "  BROKER_CLIENT_ID=<id> BROKER_CLIENT_SECRET=<secret> "
        f"BROKER_URL={base} .venv/bin/python examples/agents/quickstart.py"
    )
    if count > 1:
        console.print(f"  {count} worker processes (replicas on one port, PostgreSQL store)")
    _run(config, cfg, host=host, port=port, workers=count)


def _run(
    config_path: Path, cfg: BrokerConfig, *, host: str | None, port: int | None, workers: int
) -> None:
    """Serve in this process, or in ``workers`` processes that each build the app themselves."""
    import uvicorn

    options: dict[str, Any] = {
        "host": cfg.server.host,
        "port": cfg.server.port,
        "log_level": "warning",
        "access_log": False,
    }
    if workers == 1:
        from broker.app import create_app
        from broker.logs import configure_logging

        configure_logging(os.environ.get("BROKER_LOG_LEVEL", "INFO"))
        uvicorn.run(create_app(cfg), **options)
        return
    # Workers are spawned fresh: they find the config and this command's overrides here.
    os.environ["BROKER_CONFIG"] = str(config_path.resolve())
    if host is not None:
        os.environ["BROKER_SERVER__HOST"] = host
    if port is not None:
        os.environ["BROKER_SERVER__PORT"] = str(port)
    uvicorn.run("broker.asgi:create", factory=True, workers=workers, **options)
