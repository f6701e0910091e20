"""`broker connectors add|list|show|approve|remove`: downstream tool sources and their tool pins.

Connectors come from ``broker.toml`` or are added here (stored in the shared store, validated like
config; a running broker picks up added or removed connectors at its next start). Pins are written
by the broker when it lists a connector's tools; ``approve --refresh`` (or ``show --refresh``)
starts the connector here to list and pin it without a running broker. ``approve`` shows each
pending definition, and for a changed one the diff against the approved version, then approves
exactly the digest shown: if the tool changed again meanwhile, the store refuses. A running
broker notices approvals within its pin-poll interval (2 s).

Definitions are printed as ASCII-escaped JSON, so a tool's text cannot carry terminal escapes or
markup to the admin's screen.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

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
from broker.config import BrokerConfig, ConnectorConfig
from broker.core.pinning import PinStatus, ToolPin
from broker.errors import ConfigError, NotFound
from broker.ports import StoredConnector
from broker.registry import Registry, broker_private_paths, build_spec, connector_configs
from connectors import (
    PROVENANCE_PIN_NAME,
    ConnectorError,
    ConnectorSpec,
    EgressEvent,
    EgressProxy,
    StdioSpec,
    describe_sandbox,
    open_connector,
)
from scopes import ScopeError, load_scope_files

__all__ = ["app", "definition_diff", "render_definition"]

app = typer.Typer(
    name="connectors",
    help="Register downstream tool sources and approve their tool definitions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def render_definition(definition: Mapping[str, Any]) -> str:
    """Pretty, sorted, ASCII-only JSON: control characters and escapes cannot reach the terminal."""
    return json.dumps(definition, indent=2, sort_keys=True, ensure_ascii=True)


def definition_diff(approved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """A unified diff from the approved definition to the one seen now."""
    return "\n".join(
        difflib.unified_diff(
            render_definition(approved).splitlines(),
            render_definition(current).splitlines(),
            fromfile="approved",
            tofile="current",
            lineterm="",
        )
    )


def _safe(text: str) -> str:
    """A downstream-chosen string made printable (ASCII, escapes shown, never interpreted)."""
    return json.dumps(text, ensure_ascii=True)[1:-1]


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"{text!r}: expected {what} as NAME=VALUE")
    return name, value


def _counts(pins: Sequence[ToolPin]) -> dict[str, int]:
    out = {status.value: 0 for status in PinStatus}
    for pin in pins:
        out[pin.status.value] += 1
    return out


async def _all_connectors(cfg: BrokerConfig, store: Any) -> list[tuple[ConnectorConfig, str]]:
    stored = {c.id for c in await store.list_connectors()}
    return [
        (c, "store" if c.id in stored else "config")
        for c in connector_configs(cfg, await store.list_connectors())
    ]


async def _find(cfg: BrokerConfig, store: Any, connector_id: str) -> ConnectorConfig:
    for c, _source in await _all_connectors(cfg, store):
        if c.id == connector_id:
            return c
    raise NotFound(f"no connector with id {connector_id!r} (see `broker connectors list`)")


def _spec(cfg: BrokerConfig, connector: ConnectorConfig, config_file: Path) -> ConnectorSpec:
    """The spec exactly as the broker builds it (sandbox from the scope files, broker files
    denied), without the approved provenance.

    Raises:
        ConfigError: a scope file or a secret reference is unusable.
    """
    try:
        definitions = load_scope_files(cfg.scope_files)
    except ScopeError as exc:
        raise ConfigError(str(exc)) from None
    deny = broker_private_paths(cfg, os.environ, config_file)
    return build_spec(connector, os.environ, cfg.base_dir, scopes=definitions, deny_paths=deny)


def _ignore_egress(_event: EgressEvent) -> None:
    """Listing tools here needs no network; attempts are refused by policy and logged anyway."""


async def _refresh(
    cfg: BrokerConfig, store: Any, connector: ConnectorConfig, config_file: Path
) -> None:
    """Start the connector here (sandboxed as the broker would), pin its tools and what it
    runs, stop it."""
    registry = Registry(store, pin_poll_interval=3600)
    try:
        spec = _spec(cfg, connector, config_file)
        if isinstance(spec, StdioSpec):
            registry.add_stdio(
                spec,
                environ=os.environ,
                egress=EgressProxy(on_event=_ignore_egress),
                prefix=connector.tool_prefix,
            )
        else:
            registry.add(open_connector(spec), prefix=connector.tool_prefix)
    except ConnectorError as exc:
        raise ConfigError(f"connector '{connector.id}': {exc}") from None
    try:
        snapshot = await registry.start()
    finally:
        await registry.aclose()
    for problem in snapshot.problems:
        console.print(f"warning: {problem}", markup=False)


@app.command("add")
def add(
    connector_id: Annotated[str, typer.Argument(metavar="ID", help="a-z, 0-9, '-'; 1-32 long.")],
    kind: Annotated[str, typer.Option("--kind", help="stdio, http or native.")],
    command: Annotated[str | None, typer.Option("--command", help="stdio: the program.")] = None,
    args: Annotated[
        list[str] | None, typer.Option("--arg", help="stdio: one argument (repeat).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="stdio: NAME=VALUE; secrets as NAME=env:VAR or file:PATH."),
    ] = None,
    url: Annotated[str | None, typer.Option("--url", help="http: the MCP endpoint.")] = None,
    headers: Annotated[
        list[str] | None,
        typer.Option("--header", help="http: NAME=VALUE; secrets as env:VAR or file:PATH."),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="native: package.module:toolset.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Tool-name prefix (default: the id; '' none).")
    ] = None,
    roots: Annotated[
        list[str] | None, typer.Option("--root", help="A root directory for the server (repeat).")
    ] = None,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Add a connector to the store (validated like broker.toml)."""
    cfg = load(config)
    raw: dict[str, Any] = {"id": connector_id, "kind": kind}
    for key, value in (("command", command), ("url", url), ("target", target), ("prefix", prefix)):
        if value is not None:
            raw[key] = value
    if args:
        raw["args"] = list(args)
    if roots:
        raw["roots"] = list(roots)
    if env:
        raw["env"] = dict(_pair(e, "--env") for e in env)
    if headers:
        raw["headers"] = dict(_pair(h, "--header") for h in headers)
    try:
        parsed = ConnectorConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'connector'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        fail(f"invalid connector: {problems}", 2)
    spec = parsed.model_dump(mode="json", exclude_defaults=True)
    spec.update({"id": parsed.id, "kind": parsed.kind})

    async def body() -> StoredConnector:
        async with open_store(cfg) as store:
            if parsed.id in {c.id for c in cfg.connectors}:
                raise ConfigError(f"connector '{parsed.id}' is already defined in {config}")
            for other, _source in await _all_connectors(cfg, store):
                if other.id == parsed.id:
                    raise ConfigError(f"connector '{parsed.id}' already exists")
                if parsed.tool_prefix and other.tool_prefix == parsed.tool_prefix:
                    raise ConfigError(
                        f"connector '{other.id}' already uses the tool prefix "
                        f"'{parsed.tool_prefix}': choose another with --prefix"
                    )
            stored = StoredConnector(
                id=parsed.id,
                kind=parsed.kind,
                spec=spec,
                created_at=datetime.now(UTC),
                created_by=cli_actor(),
            )
            await store.add_connector(stored)
            return stored

    stored = run(body)
    if json_out:
        emit_json({"id": stored.id, "kind": stored.kind, "spec": dict(stored.spec)})
        return
    console.print(
        f"added connector '{stored.id}' ({stored.kind}); a running broker picks it up at its "
        f"next start. Approve its tools with `broker connectors approve {stored.id} --refresh`.",
        markup=False,
    )


@app.command("list")
def list_connectors(
    config: ConfigOption = Path("broker.toml"), json_out: JsonOption = False
) -> None:
    """Connectors with where they come from and their tools' pin status."""
    cfg = load(config)

    async def body() -> list[dict[str, Any]]:
        async with open_store(cfg) as store:
            rows: list[dict[str, Any]] = []
            for c, source in await _all_connectors(cfg, store):
                pins = await store.get_pins(c.id)
                rows.append(
                    {
                        "id": c.id,
                        "kind": c.kind,
                        "prefix": c.tool_prefix,
                        "source": source,
                        "tools": _counts(pins),
                        "status": _status(pins),
                    }
                )
            return rows

    rows = run(body)
    if json_out:
        emit_json(rows)
        return
    table = Table("id", "kind", "prefix", "source", "status", "approved", "pending", "changed")
    for row in rows:
        counts = row["tools"]
        table.add_row(
            row["id"],
            row["kind"],
            row["prefix"] or "(none)",
            row["source"],
            row["status"],
            str(counts["approved"]),
            str(counts["pending"]),
            str(counts["changed"]),
        )
    console.print(table)


def _sandbox_lines(cfg: BrokerConfig, connector: ConnectorConfig, config_file: Path) -> list[str]:
    """What `describe_sandbox` says of the connector (stdio only; others run no process)."""
    if connector.kind != "stdio":
        return [f"sandbox: none ({connector.kind} connectors run no local process)"]
    try:
        spec = _spec(cfg, connector, config_file)
    except ConfigError as exc:
        return [f"sandbox: cannot be described: {exc}"]
    assert isinstance(spec, StdioSpec)  # noqa: S101 - a stdio config builds a stdio spec
    return describe_sandbox(spec)


def _status(pins: Sequence[ToolPin]) -> str:
    if not pins:
        return "not listed yet"
    if any(p.status is PinStatus.CHANGED for p in pins):
        return "changed tools disabled"
    if any(p.status is PinStatus.PENDING for p in pins):
        return "awaiting approval"
    return "ok"


def _pin_json(pin: ToolPin) -> dict[str, Any]:
    return {
        "tool": pin.tool_name,
        "status": pin.status.value,
        "digest": pin.digest,
        "approved_digest": pin.approved_digest,
        "approved_by": pin.approved_by,
        "approved_at": pin.approved_at.isoformat() if pin.approved_at else None,
        "definition": dict(pin.definition),
        "approved_definition": dict(pin.approved_definition) if pin.approved_definition else None,
    }


@app.command("show")
def show(
    connector_id: Annotated[str, typer.Argument(metavar="ID")],
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Start the connector here to list and pin it first.")
    ] = False,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """A connector's tools with their pin status."""
    cfg = load(config)

    async def body() -> tuple[ConnectorConfig, Sequence[ToolPin]]:
        async with open_store(cfg) as store:
            connector = await _find(cfg, store, connector_id)
            if refresh:
                await _refresh(cfg, store, connector, config)
            return connector, await store.get_pins(connector_id)

    connector, pins = run(body)
    sandbox = _sandbox_lines(cfg, connector, config)
    if json_out:
        emit_json(
            {
                "id": connector.id,
                "kind": connector.kind,
                "prefix": connector.tool_prefix,
                "sandbox": sandbox,
                "tools": [_pin_json(p) for p in pins],
            }
        )
        return
    console.print(
        f"connector '{connector.id}' ({connector.kind}, prefix "
        f"{connector.tool_prefix or '(none)'})",
        markup=False,
    )
    for line in sandbox:
        console.print(line, markup=False, soft_wrap=True)
    table = Table("tool", "status", "digest", "approved by", "approved at")
    for pin in pins:
        table.add_row(
            Text(_safe(pin.tool_name)),
            pin.status.value,
            pin.digest[:12],
            pin.approved_by or "",
            pin.approved_at.isoformat(timespec="seconds") if pin.approved_at else "",
        )
    console.print(table)


@app.command("approve")
def approve(
    connector_id: Annotated[str, typer.Argument(metavar="ID")],
    tools: Annotated[
        list[str] | None, typer.Option("--tool", help="A tool to approve (repeat).")
    ] = None,
    approve_all: Annotated[
        bool, typer.Option("--all", help="Every pending or changed tool of the connector.")
    ] = False,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Start the connector here to list and pin it first.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Show pending and changed tool definitions (with a diff) and approve exactly those."""
    if not tools and not approve_all:
        fail("name the tools to approve with --tool NAME, or use --all", 2)
    cfg = load(config)

    async def candidates() -> list[ToolPin]:
        async with open_store(cfg) as store:
            connector = await _find(cfg, store, connector_id)
            if refresh:
                await _refresh(cfg, store, connector, config)
            pins = await store.get_pins(connector_id)
        by_name = {p.tool_name: p for p in pins}
        if tools:
            unknown = [t for t in tools if t not in by_name]
            if unknown:
                raise NotFound(
                    f"connector '{connector_id}' has no tool named {', '.join(map(repr, unknown))}"
                    " (listed tools appear once the broker or --refresh has seen them)"
                )
            chosen = [by_name[t] for t in tools]
            # No tool of a connector is served before what it runs is approved: take it along.
            if PROVENANCE_PIN_NAME in by_name and PROVENANCE_PIN_NAME not in tools:
                chosen.append(by_name[PROVENANCE_PIN_NAME])
        else:
            chosen = list(pins)
        return [p for p in chosen if p.status is not PinStatus.APPROVED]

    shown = run(candidates)
    if not shown:
        if json_out:
            emit_json([])
        else:
            console.print("nothing to approve: every chosen tool is approved", markup=False)
        return
    if not json_out or not yes:
        for pin in shown:
            _describe(pin)
    if not yes and not typer.confirm(f"approve these {len(shown)} definition(s)?"):
        fail("nothing approved", 1)
    actor = cli_actor()

    async def write() -> list[ToolPin]:
        from broker.store import Conflict

        done: list[ToolPin] = []
        async with open_store(cfg) as store:
            for pin in shown:
                try:
                    done.append(
                        await store.approve_pin(
                            connector_id, pin.tool_name, pin.digest, actor, datetime.now(UTC)
                        )
                    )
                except Conflict:
                    raise ConfigError(
                        f"tool '{pin.tool_name}' changed again since it was shown; nothing more "
                        "was approved: run the command again to see the new definition"
                    ) from None
        return done

    approved = run(write)
    if json_out:
        emit_json([_pin_json(p) for p in approved])
        return
    for pin in approved:
        console.print(
            f"approved {connector_id}/{_safe(pin.tool_name)} (digest {pin.digest[:12]})",
            markup=False,
        )


def _describe(pin: ToolPin) -> None:
    if pin.tool_name == PROVENANCE_PIN_NAME:
        what = "CHANGED since approval" if pin.status is PinStatus.CHANGED else "never approved"
        console.print(
            f"--- what the connector runs ({what}; digest {pin.digest[:12]}):", markup=False
        )
        if pin.status is PinStatus.CHANGED and pin.approved_definition is not None:
            console.print(definition_diff(pin.approved_definition, pin.definition), markup=False)
        else:
            console.print(render_definition(pin.definition), markup=False)
        return
    if pin.status is PinStatus.CHANGED and pin.approved_definition is not None:
        console.print(
            f"--- tool '{_safe(pin.tool_name)}' CHANGED since approval (digest "
            f"{(pin.approved_digest or '')[:12]} -> {pin.digest[:12]}); diff from the approved "
            "version:",
            markup=False,
        )
        console.print(definition_diff(pin.approved_definition, pin.definition), markup=False)
    else:
        console.print(
            f"--- tool '{_safe(pin.tool_name)}' new, never approved (digest {pin.digest[:12]}):",
            markup=False,
        )
        console.print(render_definition(pin.definition), markup=False)


@app.command("remove")
def remove(
    connector_id: Annotated[str, typer.Argument(metavar="ID")],
    config: ConfigOption = Path("broker.toml"),
    json_out: JsonOption = False,
) -> None:
    """Remove a connector added with `connectors add` (and its pins)."""
    cfg = load(config)
    if connector_id in {c.id for c in cfg.connectors}:
        fail(f"connector '{connector_id}' is defined in {config}: remove it there", 2)

    async def body() -> None:
        async with open_store(cfg) as store:
            await store.remove_connector(connector_id)

    run(body)
    if json_out:
        emit_json({"removed": connector_id})
        return
    console.print(f"removed connector '{connector_id}' and its tool pins", markup=False)
