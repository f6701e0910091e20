"""`broker scopes list|check` and `broker explain`: the scope language from the command line.

Thin over `scopes` and `broker.core.policy.decide`. ``check`` validates scope files (the
configured ones, or those named) and, given ``--scope``, ``--connector``, ``--tool`` and
``--args``, decides one call as a token holding those scopes would get it. ``explain`` is the
dry run of a real token against a tool as agents see it: the token is verified, its revocation
view consulted, the tool's route and pin status read from the store, and the decision printed
with its reasons, the grants involved and the canonical arguments that would be forwarded.
Stateful stages (budget, rate limits, approvals) are not run by a dry run and nothing is
recorded.

Register with `register(app)` (adds the ``scopes`` group and the top-level ``explain``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
    open_token_parts,
    run,
)
from broker.config import BrokerConfig
from broker.core.decision import Reason
from broker.core.pinning import PinStatus
from broker.core.policy import AccessRequest, Authorization, TokenPolicy, decide
from broker.mediation import new_decision_id, token_policy
from scopes import ScopeDefinition, ScopeError, load_scope_files

__all__ = ["app", "explain", "register"]

app = typer.Typer(
    name="scopes",
    help="List and check scope definitions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def register(root: typer.Typer) -> None:
    """Add ``broker scopes ...`` and ``broker explain`` to the root command."""
    root.add_typer(app, name="scopes")
    root.command("explain")(explain)


def _definitions(files: Sequence[Path]) -> tuple[ScopeDefinition, ...]:
    try:
        return load_scope_files(files)
    except ScopeError as exc:
        fail(str(exc))


def _describe(definition: ScopeDefinition) -> dict[str, Any]:
    return {
        "name": definition.name,
        "description": definition.description,
        "labels": sorted(definition.labels),
        "approval": str(definition.approval),
        "source": definition.source,
        "grants": [
            {
                "id": g.id,
                "connector": g.connector,
                "tools": list(g.tools),
                "constraints": [
                    f"{c.path} {'+'.join(op for op, _ in c.operators)}" for c in g.constraints.items
                ],
            }
            for g in definition.grants
        ],
    }


@app.command("list")
def list_scopes(config: ConfigOption = Path("broker.toml"), json_out: JsonOption = False) -> None:
    """List the scopes defined by the configured scope files."""
    cfg = load(config)
    rows = [_describe(d) for d in _definitions(cfg.scope_files)]
    if json_out:
        emit_json(rows)
        return
    table = Table("scope", "labels", "approval", "grants", "source")
    for row in rows:
        grants = "\n".join(
            f"{g['connector']}: {', '.join(g['tools'])}"
            + (f" [{', '.join(g['constraints'])}]" if g["constraints"] else "")
            for g in row["grants"]
        )
        table.add_row(row["name"], ", ".join(row["labels"]), row["approval"], grants, row["source"])
    console.print(table)


@app.command("check")
def check(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Scope files to check (default: the configured ones)."),
    ] = None,
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="Check a call as a token holding these.")
    ] = None,
    connector: Annotated[str | None, typer.Option("--connector", help="Connector id.")] = None,
    tool: Annotated[str | None, typer.Option("--tool", help="The connector's tool name.")] = None,
    args: Annotated[str, typer.Option("--args", help="The call's arguments (JSON object).")] = "{}",
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Validate scope files; with --scope/--connector/--tool, also decide one call."""
    paths: Sequence[Path] = files or load(config).scope_files
    definitions = _definitions(paths)
    report: dict[str, Any] = {"ok": True, "files": [str(p) for p in paths]}
    report["scopes"] = [d.name for d in definitions]
    if scope or connector or tool:
        if not (scope and connector and tool):
            fail("checking a call needs --scope, --connector and --tool")
        by_name = {d.name: d for d in definitions}
        unknown = [s for s in scope if s not in by_name]
        if unknown:
            fail(f"unknown scope(s): {', '.join(unknown)}")
        policy = token_policy(scope, None, by_name)
        auth = _decide(policy, connector, tool, _arguments(args), PinStatus.APPROVED)
        report["call"] = _outcome(auth)
    if json_out:
        emit_json(report)
        return
    console.print(f"ok: {len(definitions)} scope(s) in {len(paths)} file(s)")
    if "call" in report:
        _print_outcome(report["call"])


def explain(
    token: Annotated[str, typer.Option("--token", help="The capability token (JWT).")],
    tool: Annotated[str, typer.Option("--tool", help="The tool name as agents see it.")],
    args: Annotated[str, typer.Option("--args", help="The call's arguments (JSON object).")] = "{}",
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Dry run: how the broker would decide this token calling this tool with these arguments.

    Budget, rate limits and approvals are not evaluated; nothing is forwarded or recorded.
    """
    cfg = load(config)
    arguments = _arguments(args)
    definitions = {d.name: d for d in _definitions(cfg.scope_files)}
    outcome = run(lambda: _explain(cfg, token.strip(), tool, arguments, definitions))
    if json_out:
        emit_json(outcome)
        return
    _print_outcome(outcome)


async def _explain(
    cfg: BrokerConfig,
    raw: str,
    tool: str,
    arguments: dict[str, Any],
    definitions: Mapping[str, ScopeDefinition],
) -> dict[str, Any]:
    from broker.core.tokens import TokenRejected
    from broker.registry import connector_configs

    async with open_token_parts(cfg) as parts:
        store, clock, revocations = parts.store, parts.clock, parts.revocations
        try:
            claims = parts.verifier.verify_claims(raw)
        except TokenRejected as exc:
            fail(f"the token is refused: {exc.reason}")
        await revocations.refresh()
        problem = revocations.check(claims, clock.now())
        try:
            policy = token_policy(claims.scopes, claims.authorization_details, definitions)
        except (ScopeError, TypeError):
            fail("the token's authorization_details cannot be parsed")
        route = _route(tool, connector_configs(cfg, await store.list_connectors()))
        pin: PinStatus | None = None
        if route is not None:
            pins = {p.tool_name: p for p in await store.get_pins(route[0])}
            found = pins.get(route[1])
            pin = PinStatus(found.status) if found is not None else None
        connector, downstream = route if route is not None else ("", tool)
        auth = _decide(policy, connector, downstream, arguments, pin, problem)
    outcome = _outcome(auth)
    outcome |= {"tool": tool, "agent": claims.sub, "token": claims.jti}
    return outcome


def _route(tool: str, configs: Sequence[Any]) -> tuple[str, str] | None:
    """(connector id, downstream tool name) for an exposed name, by the connectors' prefixes."""
    for c in configs:
        prefix = c.tool_prefix
        if prefix and tool.startswith(f"{prefix}__"):
            return c.id, tool[len(prefix) + 2 :]
    for c in configs:
        if c.tool_prefix == "":
            return c.id, tool
    return None


def _decide(
    policy: TokenPolicy,
    connector: str,
    tool: str,
    arguments: Mapping[str, Any],
    pin: PinStatus | None,
    problem: Reason | None = None,
) -> Authorization:
    request = AccessRequest(
        decision_id=new_decision_id(),
        connector=connector,
        tool=tool,
        arguments=arguments,
        policy=policy,
        pin_status=pin,
        token_problem=problem,
    )
    return decide(request)


def _arguments(text: str) -> dict[str, Any]:
    def strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=strict)
    except ValueError:
        fail("--args is not a JSON object (duplicate keys are refused)")
    if not isinstance(value, dict):
        fail("--args must be a JSON object")
    return value  # pyright: ignore[reportUnknownVariableType]


def _outcome(auth: Authorization) -> dict[str, Any]:
    d = auth.decision
    return {
        "allowed": d.allowed,
        "reasons": sorted(str(r) for r in d.reasons),
        "decision_id": d.decision_id,
        "rule_ids": list(d.rule_ids),
        "detail": list(d.detail),
        "scope": auth.scope.name if auth.scope else None,
        "approval": str(auth.approval),
        "labels": sorted(auth.labels),
        "arguments": auth.arguments if d.allowed else None,
    }


def _print_outcome(outcome: Mapping[str, Any]) -> None:
    if outcome["allowed"]:
        console.print(f"allowed by {', '.join(outcome['rule_ids'])} (scope {outcome['scope']})")
        if outcome["approval"] == "call":
            console.print("needs a human approval on every call (approval = call)")
        if outcome["labels"]:
            console.print(f"labels: {', '.join(outcome['labels'])}")
        console.print("forwarded arguments (canonical):")
        console.print(json.dumps(outcome["arguments"], indent=2, sort_keys=True), markup=False)
    else:
        console.print(f"denied ({','.join(outcome['reasons'])})")
        for rule in outcome["rule_ids"]:
            console.print(f"  considered {rule}", markup=False)
        for line in outcome["detail"]:
            console.print(f"  {line}", markup=False)
    console.print(f"decision {outcome['decision_id']} (dry run: not recorded)")
