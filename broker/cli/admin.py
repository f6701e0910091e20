"""`broker admin-token create|list|revoke`: credentials for the admin API and the review page.

Thin over `broker.admin_tokens` and the store. A token is printed once, at creation; only its
SHA-256 is stored. Roles: ``reviewer`` reads, ``approver`` also approves tool definitions and
human approvals, ``admin`` does everything.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli._common import (
    ConfigOption,
    JsonOption,
    console,
    emit_json,
    fail,
    load,
    open_store,
    run,
)
from broker.core.identity import AdminRole, AdminToken

__all__ = ["app"]

app = typer.Typer(
    name="admin-token",
    help="Create, list and revoke admin tokens (admin API and review page).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _json(token: AdminToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role.value,
        "created_at": token.created_at.isoformat(),
        "revoked_at": None if token.revoked_at is None else token.revoked_at.isoformat(),
    }


@app.command("create")
def create(
    role: Annotated[
        AdminRole, typer.Option("--role", help="reviewer, approver or admin.", case_sensitive=False)
    ],
    name: Annotated[str, typer.Option("--name", help="Who or what holds it (for the audit).")],
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Create an admin token and print it once."""
    from broker.admin_tokens import create_admin_token

    name = name.strip()
    if not name or len(name) > 200 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        fail("--name: expected 1-200 printable characters")
    cfg = load(config)

    async def body() -> tuple[AdminToken, str]:
        async with open_store(cfg) as store:
            return await create_admin_token(store, role=role, name=name, now=datetime.now(UTC))

    record, raw = run(body)
    if json_out:
        emit_json({**_json(record), "token": raw})
        return
    console.print(f"admin token {record.id} ({record.role.value}) created for {name}", markup=False)
    console.print(f"  token: {raw}", markup=False)
    console.print(
        "[yellow]The token is shown only now and is not stored (only a hash is): "
        "keep it in a secret store.[/]"
    )


@app.command("list")
def list_tokens(config: ConfigOption = Path("broker.toml"), json_out: JsonOption = False) -> None:
    """List admin tokens (never the tokens themselves)."""
    cfg = load(config)

    async def body() -> list[AdminToken]:
        async with open_store(cfg) as store:
            return list(await store.list_admin_tokens())

    tokens = run(body)
    if json_out:
        emit_json([_json(t) for t in tokens])
        return
    table = Table("id", "name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(
            t.id,
            t.name,
            t.role.value,
            t.created_at.isoformat(timespec="seconds"),
            "" if t.revoked_at is None else t.revoked_at.isoformat(timespec="seconds"),
        )
    console.print(table)


@app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The admin token's id.")],
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Revoke an admin token at once (its review-page logins end too)."""
    cfg = load(config)

    async def body() -> AdminToken:
        async with open_store(cfg) as store:
            return await store.revoke_admin_token(token_id, datetime.now(UTC))

    token = run(body)
    if json_out:
        emit_json(_json(token))
        return
    console.print(f"admin token {token.id} ({token.name}) is revoked", markup=False)
