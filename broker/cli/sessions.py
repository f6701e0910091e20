"""`broker sessions list|show|verify|export`: the reviewer's view of recorded sessions.

Thin over the store and `broker.core.recording`. Recorded strings are untrusted data: they are
printed as plain text (never as rich markup) with control characters made visible, so a
recorded tool result cannot restyle or rewrite the reviewer's terminal.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from broker.cli._common import ConfigOption, JsonOption, console, emit_json, load, open_store, run
from broker.core.recording import (
    ChainReport,
    EventKind,
    RecordedEvent,
    SessionRecord,
    format_timestamp,
    verify_chain,
)
from broker.session_queries import all_events, event_json, report_json, session_json

__all__ = [
    "app",
    "event_json",
    "ocsf_event",
    "parse_when",
    "session_json",
]

app = typer.Typer(
    name="sessions",
    help="Review recorded sessions: list, show a timeline, verify hash chains, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PAGE = 500
OCSF_VERSION = "1.3.0"
PRODUCT = {"name": "mcp-authz-broker", "vendor_name": "mcp-authz-broker"}
_RELATIVE = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class DecisionFilter(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    OCSF = "ocsf"


def parse_when(text: str, now: datetime) -> datetime:
    """An aware time from ISO 8601 (naive means UTC) or an age such as ``90m``, ``2h``, ``7d``.

    Raises:
        typer.BadParameter: anything else.
    """
    relative = _RELATIVE.match(text.strip().lower())
    if relative:
        return now - timedelta(seconds=int(relative.group(1)) * _UNIT[relative.group(2)])
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected an ISO 8601 time (2026-11-23T12:00Z) or an age such as 2h or 7d"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _visible(text: str) -> str:
    """``text`` with control and format characters shown as escapes (no terminal tricks)."""
    return "".join(
        c
        if c in "\n\t" or unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Co"}
        else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _plain(value: object) -> Text:
    return Text(_visible(value if isinstance(value, str) else json.dumps(value, default=str)))


async def _sessions(store: Any, **filters: Any) -> list[SessionRecord]:
    """Every session matching ``filters``, newest first, read page by page."""
    found: list[SessionRecord] = []
    while True:
        page: Sequence[SessionRecord] = await store.list_sessions(
            **filters, limit=PAGE, offset=len(found)
        )
        found.extend(page)
        if len(page) < PAGE:
            return found


def _decisions(events: Sequence[RecordedEvent]) -> tuple[int, int]:
    allowed = denied = 0
    for e in events:
        if e.kind == EventKind.DECISION:
            if e.payload.get("allowed") is True:
                allowed += 1
            else:
                denied += 1
    return allowed, denied


# list


async def list_sessions(
    store: Any,
    *,
    agent: str | None = None,
    task: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    decision: DecisionFilter | None = None,
    flagged: bool | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Sessions newest first, each with its allowed/denied decision counts."""
    filters: dict[str, Any] = {
        "agent_id": agent,
        "task_id": task,
        "since": since,
        "until": until,
        "flagged": flagged,
    }
    rows: list[dict[str, Any]] = []
    offset = 0
    while len(rows) < limit:
        page: Sequence[SessionRecord] = await store.list_sessions(
            **filters, limit=PAGE if decision else limit, offset=offset
        )
        offset += len(page)
        for session in page:
            allowed, denied = _decisions(await all_events(store, session.id, batch_size=PAGE))
            if decision == DecisionFilter.DENIED and not denied:
                continue
            if decision == DecisionFilter.ALLOWED and not allowed:
                continue
            rows.append({**session_json(session), "allowed": allowed, "denied": denied})
            if len(rows) == limit:
                break
        if len(page) < (PAGE if decision else limit):
            break
    return rows


@app.command("list")
def list_command(
    config: ConfigOption = Path("broker.toml"),
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent id.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Only this task id.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Started at or after (ISO 8601 or 2h, 7d).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Started before (ISO 8601 or 2h, 7d).")
    ] = None,
    decision: Annotated[
        DecisionFilter | None,
        typer.Option("--decision", help="Only sessions with at least one such decision."),
    ] = None,
    flagged: Annotated[bool, typer.Option("--flagged", help="Only flagged sessions.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
    as_json: JsonOption = False,
) -> None:
    """List recorded sessions, newest first."""
    cfg = load(config)
    now = datetime.now(UTC)
    since_at = None if since is None else parse_when(since, now)
    until_at = None if until is None else parse_when(until, now)

    async def body() -> list[dict[str, Any]]:
        async with open_store(cfg) as store:
            return await list_sessions(
                store,
                agent=agent,
                task=task,
                since=since_at,
                until=until_at,
                decision=decision,
                flagged=True if flagged else None,
                limit=limit,
            )

    rows = run(body)
    if as_json:
        emit_json(rows)
        return
    table = Table("session", "agent", "task", "started", "ended", "events", "allow/deny", "flags")
    for r in rows:
        table.add_row(
            _plain(r["id"]),
            _plain(r["agent_id"]),
            _plain(r["task_id"]),
            r["started_at"],
            r["ended_at"] or "open",
            str(r["event_count"]),
            f"{r['allowed']}/{r['denied']}",
            _plain(", ".join(r["flags"])),
        )
    console.print(table)


# show


def summary(event: RecordedEvent) -> str:
    """One line saying what an event records (recorded text is shown verbatim, bounded)."""
    p = event.payload
    kind = event.kind
    if kind == EventKind.SESSION_OPENED:
        return f"agent {p.get('agent_id')} task {p.get('task_id')} via {p.get('transport') or '?'}"
    if kind == EventKind.REQUEST:
        target = p.get("tool") or ""
        return f"{p.get('method', '?')} {target}".strip() + _args(p.get("arguments"))
    if kind == EventKind.DECISION:
        verdict = "ALLOWED" if p.get("allowed") is True else "DENIED"
        reasons = ", ".join(str(r) for r in p.get("reasons") or [])
        return f"{verdict} {p.get('tool') or ''}".strip() + (f" ({reasons})" if reasons else "")
    if kind == EventKind.FORWARDED:
        return f"-> {p.get('connector', '?')}/{p.get('tool', '?')}" + _args(p.get("arguments"))
    if kind == EventKind.RESULT:
        excerpt = p.get("excerpt") or {}
        text = str(excerpt.get("text", "")) if isinstance(excerpt, Mapping) else ""
        size = excerpt.get("chars", len(text)) if isinstance(excerpt, Mapping) else 0
        status = "error" if p.get("is_error") else "ok"
        latency = f" {p['latency_ms']} ms" if "latency_ms" in p else ""
        return f"{status}{latency} {size} chars: {_clip(text)}"
    if kind == EventKind.ERROR:
        return f"{p.get('error', '?')} {p.get('detail') or ''}".strip()
    if kind == EventKind.NOTIFICATION:
        return f"{p.get('direction', '?')} {p.get('method', '?')}"
    if kind == EventKind.APPROVAL:
        return f"{p.get('approval_id', '?')} {p.get('state', '?')} {p.get('actor') or ''}".strip()
    if kind == EventKind.DETECTOR_SIGNAL:
        return _signal(p)
    if kind == EventKind.SESSION_CLOSED:
        return f"{p.get('event_count', '?')} events" + (
            f" ({p['reason']})" if p.get("reason") else ""
        )
    return _clip(json.dumps(dict(p), sort_keys=True, default=str))


def _signal(p: Mapping[str, Any]) -> str:
    """A ``detector-signal``: detector, response (or what shadow mode would have done), the
    signal values and the events that triggered it."""
    line = f"{p.get('detector', '?')} -> {p.get('action', '?')}"
    if p.get("shadow") is True:
        line += f" (shadow, would {p.get('would', '?')})"
    if p.get("untrusted") is True:
        line += " (after untrusted content)"
    if "score" in p:
        line += f" score {p['score']}"
    values = p.get("values")
    if isinstance(values, Mapping) and values:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())  # pyright: ignore[reportUnknownVariableType]
        line += f" values {shown}"
    refs = p.get("refs")
    if isinstance(refs, list) and refs:
        line += " refs " + ", ".join(str(r) for r in refs)  # pyright: ignore[reportUnknownVariableType]
    return _clip(line, 400)


def _args(arguments: object) -> str:
    if not arguments:
        return ""
    return " " + _clip(json.dumps(arguments, sort_keys=True, default=str), 100)


def _clip(text: str, n: int = 120) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= n else one_line[: n - 1] + "…"


async def show_session(store: Any, session_id: str) -> dict[str, Any]:
    """The session, its events and its chain report."""
    session = await store.get_session(session_id)
    events = await all_events(store, session_id, batch_size=PAGE)
    return {
        "session": session_json(session),
        "chain": report_json(verify_chain(session, events)),
        "events": [event_json(e) for e in events],
        "_events": events,
    }


@app.command("show")
def show_command(
    session_id: Annotated[str, typer.Argument(help="The session id.")],
    config: ConfigOption = Path("broker.toml"),
    as_json: JsonOption = False,
) -> None:
    """Show one session as a timeline, with its chain status."""
    cfg = load(config)

    async def body() -> dict[str, Any]:
        async with open_store(cfg) as store:
            return await show_session(store, session_id)

    shown = run(body)
    events: list[RecordedEvent] = shown.pop("_events")
    if as_json:
        emit_json(shown)
        return
    s, chain = shown["session"], shown["chain"]
    head = Text()
    for label, value in (
        ("session", s["id"]),
        ("agent", s["agent_id"]),
        ("task", s["task_id"]),
        ("token", s["token_jti"]),
        ("transport", f"{s['transport']} {s['protocol_version']}".strip()),
        ("started", s["started_at"]),
        ("ended", s["ended_at"] or "open"),
        ("flags", ", ".join(s["flags"]) or "-"),
    ):
        head.append(f"{label:>9}: ", style="bold")
        head.append(_visible(str(value)) + "\n")
    head.append("    chain: ", style="bold")
    if chain["ok"]:
        head.append(f"verified ({chain['checked']} events)", style="green")
    else:
        head.append(
            f"BROKEN at event {chain['first_bad_seq']}: {chain['problem']} ({chain['detail']})",
            style="bold red",
        )
    console.print(head)
    table = Table("seq", "time", "kind", "decision", "what")
    started = events[0].at if events else None
    bad = chain["first_bad_seq"]
    for e in events:
        offset = "" if started is None else f"+{(e.at - started).total_seconds() * 1000:.1f} ms"
        style = "red" if bad is not None and e.seq >= bad else None
        if e.kind == EventKind.DECISION and e.payload.get("allowed") is not True:
            style = style or "yellow"
        table.add_row(
            str(e.seq),
            offset,
            _plain(e.kind),
            _plain(e.decision_id or ""),
            _plain(summary(e)),
            style=style,
        )
    console.print(table)


# verify


async def verify_sessions(store: Any, session_id: str | None, *, every: bool) -> list[ChainReport]:
    """Recompute the chain of one session, or of every session."""
    sessions = [await store.get_session(session_id)] if session_id else []
    if every:
        sessions = await _sessions(store)
    return [verify_chain(s, await all_events(store, s.id, batch_size=PAGE)) for s in sessions]


@app.command("verify")
def verify_command(
    session_id: Annotated[str | None, typer.Argument(help="The session id.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Verify every session.")] = False,
    config: ConfigOption = Path("broker.toml"),
    as_json: JsonOption = False,
) -> None:
    """Recompute hash chains; exit 1 and name the first broken event when one is tampered."""
    if (session_id is None) == (not every):
        raise typer.BadParameter("give a session id or --all (not both)")
    cfg = load(config)

    async def body() -> list[ChainReport]:
        async with open_store(cfg) as store:
            return await verify_sessions(store, session_id, every=every)

    reports = run(body)
    broken = [r for r in reports if not r.ok]
    if as_json:
        emit_json(
            {
                "ok": not broken,
                "sessions": len(reports),
                "reports": [report_json(r) for r in reports],
            }
        )
    else:
        for r in reports:
            line = Text()
            if r.ok:
                line.append("ok      ", style="green")
                line.append(_visible(r.session_id))
                line.append(f"  {r.checked} events, head {r.head_hash[:16]}")
            else:
                line.append("BROKEN  ", style="bold red")
                line.append(_visible(r.session_id))
                line.append(f"  first bad event {r.first_bad_seq}: {r.problem} ({r.detail})")
            console.print(line)
        console.print(f"{len(reports) - len(broken)} of {len(reports)} sessions verified")
    if broken:
        raise typer.Exit(1)


# export


def _epoch_ms(at: datetime) -> int:
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    return int(aware.timestamp() * 1000)


def ocsf_event(session: SessionRecord, event: RecordedEvent) -> dict[str, Any]:
    """One recorded event as an OCSF API Activity (class 6003) event."""
    p = event.payload
    failed = (
        (event.kind == EventKind.DECISION and p.get("allowed") is not True)
        or event.kind == EventKind.ERROR
        or (event.kind == EventKind.RESULT and bool(p.get("is_error")))
    )
    severity = 1
    if event.kind == EventKind.DECISION and failed:
        severity = 3
    elif event.kind == EventKind.DETECTOR_SIGNAL:
        severity = 4
    elif event.kind == EventKind.ERROR:
        severity = 2
    operation = str(p.get("tool") or p.get("method") or event.kind)
    activity_id = 99  # Other: an MCP call is neither create, read, update nor delete as such
    out: dict[str, Any] = {
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": event.kind,
        "type_uid": 6003 * 100 + activity_id,
        "time": _epoch_ms(event.at),
        "severity_id": severity,
        "status_id": 2 if failed else 1,
        "status": "Failure" if failed else "Success",
        "message": summary(event),
        "metadata": {
            "version": OCSF_VERSION,
            "product": PRODUCT,
            "uid": f"{event.session_id}:{event.seq}",
            "original_time": format_timestamp(event.at),
            "log_name": "session-record",
            **({"correlation_uid": event.decision_id} if event.decision_id else {}),
        },
        "actor": {
            "user": {"uid": session.agent_id, "type": "AI agent"},
            "session": {"uid": session.id, "created_time": _epoch_ms(session.started_at)},
        },
        "api": {
            "operation": operation,
            **({"service": {"name": str(p["connector"])}} if p.get("connector") else {}),
            **({"request": {"uid": str(p["request_id"])}} if p.get("request_id") else {}),
        },
        "src_endpoint": {"name": session.transport or "unknown"},
        "unmapped": {
            "kind": event.kind,
            "seq": event.seq,
            "task_id": session.task_id,
            "token_jti": session.token_jti,
            "payload": dict(p),
            "prev_hash": event.prev_hash,
            "hash": event.hash,
        },
    }
    if event.kind == EventKind.DECISION and failed:
        out["status_detail"] = ", ".join(str(r) for r in p.get("reasons") or [])
    return out


async def export_events(
    store: Any, session_id: str | None, fmt: ExportFormat
) -> list[dict[str, Any]]:
    """Every event of one session, or of every session, oldest session first."""
    sessions = [await store.get_session(session_id)] if session_id else await _sessions(store)
    out: list[dict[str, Any]] = []
    for session in reversed(sessions) if not session_id else sessions:
        for e in await all_events(store, session.id, batch_size=PAGE):
            if fmt == ExportFormat.OCSF:
                out.append(ocsf_event(session, e))
            else:
                out.append(
                    {
                        **event_json(e),
                        "agent_id": session.agent_id,
                        "task_id": session.task_id,
                        "token_jti": session.token_jti,
                    }
                )
    return out


@app.command("export")
def export_command(
    session_id: Annotated[
        str | None, typer.Option("--session", help="Only this session (default: every session).")
    ] = None,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="jsonl: events as recorded; ocsf: class 6003.")
    ] = ExportFormat.JSONL,
    config: ConfigOption = Path("broker.toml"),
    as_json: JsonOption = False,
) -> None:
    """Write events as JSON Lines on stdout (one JSON array with --json), for a SIEM."""
    cfg = load(config)

    async def body() -> list[dict[str, Any]]:
        async with open_store(cfg) as store:
            return await export_events(store, session_id, fmt)

    rows = run(body)
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        sys.stdout.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
