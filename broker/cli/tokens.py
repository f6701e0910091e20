"""`broker token mint|revoke|inspect` and `broker keys rotate`.

Thin over `broker.token_service`, `broker.keys` and `broker.verifier`. A minted token is printed
once; ``inspect`` never prints a signature.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli._common import (
    ConfigOption,
    JsonOption,
    cli_actor,
    console,
    emit_json,
    fail,
    load,
    open_store,
    open_token_parts,
    parse_duration,
    run,
)
from broker.config import BrokerConfig
from broker.core.revocation import Revocation

__all__ = ["app", "keys_app"]

app = typer.Typer(
    name="token",
    help="Mint, revoke and inspect capability tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    name="keys",
    help="Manage the token-signing keys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class _Parts:
    store: Any
    service: Any
    verifier: Any
    revocations: Any


@asynccontextmanager
async def _services(cfg: BrokerConfig) -> AsyncIterator[_Parts]:
    from broker.token_service import TokenService

    async with open_token_parts(cfg) as parts:
        service = TokenService(
            parts.store,
            parts.keyring,
            parts.revocations,
            cfg,
            parts.clock,
            verifier=parts.verifier,
        )
        yield _Parts(
            store=parts.store,
            service=service,
            verifier=parts.verifier,
            revocations=parts.revocations,
        )


@app.command("mint")
def mint(
    agent: Annotated[str, typer.Option("--agent", help="Agent id or name.")],
    scope: Annotated[
        str, typer.Option("--scope", help="Scopes for this task, comma- or space-separated.")
    ],
    purpose: Annotated[
        str, typer.Option("--task-purpose", help="What the task is for (kept in the token).")
    ],
    task: Annotated[
        str | None, typer.Option("--task", help="Task id (default: a new random one).")
    ] = None,
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Lifetime: 90s, 10m, 1h (capped by policy).")
    ] = None,
    budget: Annotated[
        int | None, typer.Option("--budget", min=1, help="Maximum number of tool calls.")
    ] = None,
    details: Annotated[
        str | None,
        typer.Option("--details", help="authorization_details as a JSON array (narrowing)."),
    ] = None,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Mint a token for an agent directly (admin convenience, no client authentication)."""
    from broker.errors import OAuthError

    expires_in = parse_duration(ttl) if ttl is not None else None
    parsed_details: list[dict[str, Any]] | None = None
    if details is not None:
        try:
            value = json.loads(details)
        except ValueError:
            fail("--details is not JSON")
        if not isinstance(value, list):
            fail("--details must be a JSON array of objects")
        parsed_details = value  # pyright: ignore[reportUnknownVariableType]
    names = " ".join(s for s in scope.replace(",", " ").split() if s)
    cfg = load(config)

    async def body() -> Any:
        async with _services(cfg) as parts:
            try:
                return await parts.service.mint_for(
                    agent,
                    scope=names,
                    task_id=task,
                    purpose=purpose,
                    expires_in=expires_in,
                    authorization_details=parsed_details,
                    budget=budget,
                )
            except OAuthError as exc:
                fail(f"{exc.error}: {exc.description}")

    granted = run(body)
    claims = granted.claims
    if json_out:
        emit_json(
            {
                **granted.to_json(),
                "jti": claims.jti,
                "task_id": claims.task.id,
                "expires_at": claims.expires_at.isoformat(),
            }
        )
        return
    console.print(
        f"token {claims.jti} for {claims.client_id}, task {claims.task.id}, "
        f"scope '{claims.scope}', expires {claims.expires_at.isoformat()}",
        markup=False,
    )
    console.print(granted.access_token, markup=False, soft_wrap=True)
    console.print("[yellow]Shown once and not stored: hand it to the agent now.[/]")


@app.command("revoke")
def revoke(
    jti: Annotated[str | None, typer.Argument(metavar="[JTI]", help="Token id.")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Revoke every token of a task.")
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Revoke every token of an agent (id or name).")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (audit trail).")] = "",
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Revoke one token (JTI), a task's tokens, or an agent's tokens; children follow."""
    chosen = [x for x in (jti, task, agent) if x is not None]
    if len(chosen) != 1:
        fail("name exactly one of JTI, --task or --agent")
    if not reason.strip():
        fail("--reason must say why")
    cfg = load(config)

    async def body() -> Revocation:
        async with _services(cfg) as parts:
            service = parts.service
            actor = cli_actor()
            if jti is not None:
                return await service.revoke_token(jti, reason=reason, actor=actor)
            if task is not None:
                return await service.revoke_task(task, reason=reason, actor=actor)
            return await service.revoke_agent(agent or "", reason=reason, actor=actor)

    rev = run(body)
    if json_out:
        emit_json(
            {
                "seq": rev.seq,
                "kind": rev.kind.value,
                "subject": rev.subject,
                "at": rev.at.isoformat(),
                "reason": rev.reason,
                "actor": rev.actor,
            }
        )
        return
    console.print(
        f"revoked {rev.kind.value} {rev.subject} (seq {rev.seq}); delegated tokens follow",
        markup=False,
    )


def _read_token(arg: str) -> str:
    raw = sys.stdin.read() if arg == "-" else arg
    return raw.strip()


@app.command("inspect")
def inspect(
    token: Annotated[str, typer.Argument(metavar="TOKEN_OR_-", help="The token, or - for stdin.")],
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Decode and verify a token: its claims, whether it is valid now, and its revocation."""
    import jwt

    from broker.core.tokens import TokenRejected, unverified_header

    raw = _read_token(token)
    cfg = load(config)

    async def body() -> dict[str, Any]:
        out: dict[str, Any] = {"valid": False, "reason": None, "revocation": None}
        try:
            out["header"] = unverified_header(raw)
            out["claims"] = jwt.decode(raw, options={"verify_signature": False})
        except (TokenRejected, jwt.InvalidTokenError):
            out["reason"] = "malformed"
            out["header"], out["claims"] = None, None
            return out
        async with _services(cfg) as parts:
            try:
                claims = parts.verifier.verify_claims(raw)
            except TokenRejected as exc:
                out["reason"] = exc.reason
                return out
            out["valid"] = True
            try:
                await parts.revocations.refresh()
                why = parts.revocations.check(claims, datetime.now(UTC))
            except Exception as exc:  # the store is unreadable: say so, do not guess
                why = f"unknown ({type(exc).__name__})"
            out["revocation"] = None if why is None else str(why)
            if why is not None:
                out["valid"] = False
                out["reason"] = str(why)
        return out

    result = run(body)
    if json_out:
        emit_json(result)
        raise typer.Exit(0 if result["valid"] else 1)
    verdict = "[green]valid[/]" if result["valid"] else f"[red]not valid[/]: {result['reason']}"
    console.print(f"token: {verdict}")
    if result["claims"] is not None:
        label = "claims" if result["reason"] in (None, "token-revoked") else "claims (UNVERIFIED)"
        table = Table("claim", "value", title=label)
        for key, value in sorted(result["header"].items()):
            table.add_row(f"header.{key}", str(value))
        for key, value in result["claims"].items():
            shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
            if key in ("exp", "iat", "nbf") and isinstance(value, int):
                shown = f"{value} ({datetime.fromtimestamp(value, UTC).isoformat()})"
            table.add_row(key, shown)
        console.print(table)
    console.print(f"revocation: {result['revocation'] or 'none known'}", markup=False)
    raise typer.Exit(0 if result["valid"] else 1)


@keys_app.command("rotate")
def rotate(config: ConfigOption = Path("broker.toml"), json_out: JsonOption = False) -> None:
    """Start signing with a new key; old keys keep verifying until their last token expires."""
    from broker.keys import rotate as rotate_keys

    cfg = load(config)

    async def body() -> str:
        async with open_store(cfg) as store:
            return await rotate_keys(store, cfg.tokens.keys_dir, datetime.now(UTC))

    kid = run(body)
    if json_out:
        emit_json({"kid": kid})
        return
    console.print(f"new signing key {kid}; earlier keys verify until their tokens expire")
