"""`broker approvals list|approve|deny`: a human decides on held calls and pending token requests.

The CLI works on the store directly: whoever can run it with this config holds the operator's
trust, and is recorded as ``cli:<login>``. A running broker sees a decision taken here within its
store-poll interval (a held call) or at the agent's next poll (a token request).

``list`` shows, for a call, the exact tool and canonical arguments that approving releases; for
a token request, the scopes and the task's stated purpose. Everything an agent chose (arguments,
purpose) is printed as ASCII-escaped JSON, so it cannot carry terminal escapes or markup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from broker.approvals import approval_json
from broker.cli._common import (
    ConfigOption,
    JsonOption,
    cli_actor,
    console,
    emit_json,
    fail,
    load,
    open_store,
    run,
)
from broker.core.approvals import (
    Approval,
    ApprovalKind,
    ApprovalRefused,
    ApprovalStatus,
    effective_status,
)

__all__ = ["app"]

app = typer.Typer(
    name="approvals",
    help="Approve or deny held tool calls and token requests that need a human.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _safe(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, sort_keys=True)


def _block(approval: Approval, now: datetime) -> Text:
    """One approval as lines of plain text: nothing is cut, nothing is interpreted as markup."""
    left = int((approval.expires_at - now).total_seconds())
    who = approval.agent_id
    if approval.client_id != approval.agent_id:
        who = f"{approval.client_id} (for {approval.agent_id})"
    lines = [
        f"{approval.id}  {approval.kind.value}  {effective_status(approval, now).value}  "
        f"agent {who}  task {approval.task_id}  "
        + (f"expires in {left}s" if left > 0 else f"expired {approval.expires_at.isoformat()}")
    ]
    if approval.kind is ApprovalKind.CALL:
        arguments: Mapping[str, Any] = approval.arguments or {}
        lines.append(f"  tool:      {approval.connector} / {approval.tool}")
        lines.append(f"  arguments: {_safe(arguments)}")
    else:
        lines.append(f"  scopes:    {' '.join(approval.scopes)}")
    lines.append(f"  purpose:   {_safe(approval.purpose)}")
    if approval.decided_by is not None:
        lines.append(f"  decided:   by {approval.decided_by}: {_safe(approval.reason)}")
    return Text("\n".join(lines))


@app.command("list")
def list_(
    config: ConfigOption = Path("broker.toml"),
    all_: Annotated[bool, typer.Option("--all", help="Include decided and expired ones.")] = False,
    kind: Annotated[
        ApprovalKind | None, typer.Option("--kind", help="Only calls or only token requests.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List approvals waiting for a decision (with --all: every recent one)."""
    cfg = load(config)

    async def body() -> list[Approval]:
        async with open_store(cfg) as store:
            status = None if all_ else ApprovalStatus.PENDING
            return list(await store.list_approvals(status=status, kind=kind, limit=1000))

    now = datetime.now(UTC)
    approvals = run(body)
    if not all_:
        approvals = [a for a in approvals if effective_status(a, now) is ApprovalStatus.PENDING]
    if as_json:
        emit_json([approval_json(a, now) for a in approvals])
        return
    if not approvals:
        console.print("no approvals waiting" if not all_ else "no approvals")
        return
    for a in approvals:
        console.print(_block(a, now))


def _decide(config: Path, approval_id: str, *, approve: bool, reason: str, as_json: bool) -> None:
    cfg = load(config)
    actor = cli_actor()

    async def body() -> Approval:
        async with open_store(cfg) as store:
            return await store.decide_approval(
                approval_id, approve=approve, actor=actor, reason=reason, at=datetime.now(UTC)
            )

    try:
        decided = run(body)
    except ApprovalRefused as exc:
        fail(str(exc))
    if as_json:
        emit_json(approval_json(decided, datetime.now(UTC)))
        return
    verb = "approved" if approve else "denied"
    if decided.kind is ApprovalKind.CALL:
        what = f"call {decided.connector} / {decided.tool}"
    else:
        what = f"token request for {' '.join(decided.scopes)}"
    console.print(f"{verb} {decided.id}: {what} (agent {decided.agent_id}) as {actor}")


@app.command()
def approve(
    approval_id: Annotated[str, typer.Argument(metavar="ID", help="The approval id.")],
    config: ConfigOption = Path("broker.toml"),
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the record).")] = "",
    as_json: JsonOption = False,
) -> None:
    """Approve one held call (released once, with exactly the arguments shown) or token request."""
    _decide(config, approval_id, approve=True, reason=reason.strip(), as_json=as_json)


@app.command()
def deny(
    approval_id: Annotated[str, typer.Argument(metavar="ID", help="The approval id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; kept in the record).")],
    config: ConfigOption = Path("broker.toml"),
    as_json: JsonOption = False,
) -> None:
    """Deny one held call (the agent gets approval-denied) or token request (access_denied)."""
    if not reason.strip():
        fail("deny needs a --reason", 2)
    _decide(config, approval_id, approve=False, reason=reason.strip(), as_json=as_json)
