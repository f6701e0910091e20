"""`broker agents add|list|show|disable|quarantine|release`: agent identities.

Thin over `broker.agents` and the store. A client secret is printed once and never stored.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from broker.cli._common import (
    ConfigOption,
    JsonOption,
    cli_actor,
    console,
    emit_json,
    fail,
    load,
    open_store,
    parse_duration,
    run,
)
from broker.core.identity import Agent, AgentStatus

__all__ = ["agent_json", "app"]

app = typer.Typer(
    name="agents",
    help="Register agents and change their status.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def agent_json(agent: Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "owner": agent.owner,
        "status": agent.status.value,
        "status_reason": agent.status_reason,
        "allowed_scopes": list(agent.allowed_scopes),
        "max_ttl_seconds": agent.max_ttl_seconds,
        "max_delegation_depth": agent.max_delegation_depth,
        "auth_method": agent.auth_method,
        "public_jwk": agent.public_jwk,
        "created_at": agent.created_at.isoformat(),
    }


def _split_scopes(raw: str) -> list[str]:
    return [s for s in re.split(r"[,\s]+", raw.strip()) if s]


Reason = Annotated[
    str, typer.Option("--reason", "-r", help="Why (kept in the audit trail).", show_default=False)
]


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Agent name: a-z, 0-9, '_' and '-'.")],
    scopes: Annotated[
        str, typer.Option("--scopes", help="Scopes it may request, comma-separated.")
    ],
    owner: Annotated[str, typer.Option("--owner", help="Who answers for this agent.")],
    max_ttl: Annotated[
        str, typer.Option("--max-ttl", help="Longest token lifetime: 90s, 10m, 1h.")
    ] = "10m",
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="Ed25519 or P-256 public key (PEM or JWK) for private_key_jwt; no secret then.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    max_depth: Annotated[
        int, typer.Option("--max-delegation-depth", help="How deep it may delegate.")
    ] = 2,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Register an agent; prints its client id and (once) its client secret."""
    from broker.agents import parse_public_key, register_agent

    ttl = parse_duration(max_ttl)
    jwk = None
    if public_key is not None:
        try:
            jwk = parse_public_key(public_key.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            fail(f"{public_key}: {exc}")
    cfg = load(config)

    async def body() -> tuple[Agent, str | None]:
        async with open_store(cfg) as store:
            try:
                return await register_agent(
                    store,
                    name=name,
                    owner=owner,
                    scopes=_split_scopes(scopes),
                    max_ttl=ttl,
                    public_jwk=jwk,
                    now=datetime.now(UTC),
                    max_delegation_depth=max_depth,
                )
            except ValueError as exc:
                fail(str(exc))

    agent, secret = run(body)
    if json_out:
        emit_json({**agent_json(agent), "client_id": agent.id, "client_secret": secret})
        return
    console.print(f"agent [bold]{agent.name}[/] registered")
    console.print(f"  client_id:     {agent.id}", markup=False)
    if secret is not None:
        console.print(f"  client_secret: {secret}", markup=False)
        console.print(
            "[yellow]The secret is shown only now and is not stored (only a hash is): "
            "save it in the agent's secret store.[/]"
        )
    else:
        console.print("  authenticates with private_key_jwt (no secret)")
    console.print(f"  scopes:        {' '.join(agent.allowed_scopes)}", markup=False)
    console.print(f"  max TTL:       {agent.max_ttl_seconds}s")


@app.command("list")
def list_agents(config: ConfigOption = Path("broker.toml"), json_out: JsonOption = False) -> None:
    """List agents with their status and allowed scopes."""
    cfg = load(config)

    async def body() -> list[Agent]:
        async with open_store(cfg) as store:
            return list(await store.list_agents())

    agents = run(body)
    if json_out:
        emit_json([agent_json(a) for a in agents])
        return
    # Ids are copied into other commands: never truncate them.
    id_column = Column("id", no_wrap=True, min_width=24)
    table = Table(id_column, "name", "status", "owner", "scopes", "max TTL", "auth")
    for a in agents:
        status = a.status.value if a.is_active else f"[red]{a.status.value}[/]"
        table.add_row(
            a.id,
            a.name,
            status,
            a.owner,
            " ".join(a.allowed_scopes),
            f"{a.max_ttl_seconds}s",
            a.auth_method,
        )
    console.print(table)


@app.command("show")
def show(
    agent_ref: Annotated[str, typer.Argument(metavar="ID", help="Agent id or name.")],
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Show one agent."""
    cfg = load(config)

    async def body() -> Agent:
        async with open_store(cfg) as store:
            return await store.find_agent(agent_ref)

    agent = run(body)
    data = agent_json(agent)
    if json_out:
        emit_json(data)
        return
    table = Table("field", "value", show_header=False)
    for key, value in data.items():
        shown = " ".join(value) if isinstance(value, list) else str(value)
        table.add_row(key, shown)
    console.print(table)


def _set_status(
    agent_ref: str, status: AgentStatus, reason: str, config: Path, json_out: bool
) -> None:
    if not reason.strip():
        fail("--reason must say why")
    cfg = load(config)

    async def body() -> Agent:
        async with open_store(cfg) as store:
            agent = await store.find_agent(agent_ref)
            return await store.set_agent_status(
                agent.id, status, reason=reason.strip(), actor=cli_actor(), at=datetime.now(UTC)
            )

    agent = run(body)
    if json_out:
        emit_json(agent_json(agent))
        return
    console.print(f"agent {agent.name} ({agent.id}) is now {agent.status.value}", markup=False)
    if status is not AgentStatus.ACTIVE:
        console.print("its existing tokens, and tokens delegated from them, are revoked")


@app.command("disable")
def disable(
    agent_ref: Annotated[str, typer.Argument(metavar="ID", help="Agent id or name.")],
    reason: Reason,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Disable an agent: its tokens stop working and it gets no new ones."""
    _set_status(agent_ref, AgentStatus.DISABLED, reason, config, json_out)


@app.command("quarantine")
def quarantine(
    agent_ref: Annotated[str, typer.Argument(metavar="ID", help="Agent id or name.")],
    reason: Reason,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Quarantine an agent at once: tokens refused, no new ones, until a human releases it."""
    _set_status(agent_ref, AgentStatus.QUARANTINED, reason, config, json_out)


@app.command("release")
def release(
    agent_ref: Annotated[str, typer.Argument(metavar="ID", help="Agent id or name.")],
    reason: Reason,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Make a quarantined or disabled agent active again (a reason is required).

    Tokens revoked by the quarantine stay revoked; the agent must ask for new ones.
    """
    _set_status(agent_ref, AgentStatus.ACTIVE, reason, config, json_out)
