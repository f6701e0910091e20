"""`broker sessions ...` through typer's CliRunner against real SQLite and PostgreSQL stores.

Sessions are recorded with the real Recorder; tampering is done with SQL on the tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import typer
from anyio.from_thread import start_blocking_portal
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from broker.cli import sessions as sessions_cli
from broker.cli.sessions import parse_when
from broker.core.recording import EventKind
from broker.core.redaction import Redactor
from broker.recorder import Recorder
from broker.store.testing import migrated_store, sqlite_url, temporary_postgres_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class StepClock:
    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        self._now += timedelta(milliseconds=5)
        return self._now


@dataclass
class Broker:
    url: str
    config: Path
    good: str
    """A closed session with an allowed and a denied call."""
    other: str
    """An open session of another agent, flagged, all allowed."""


def make_cli() -> typer.Typer:
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(sessions_cli.app, name="sessions")
    return root


def invoke(b: Broker, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        make_cli(), ["sessions", *args, "--config", str(b.config)], env={"COLUMNS": "250"}
    )
    return result.exit_code, result.stdout, result.stderr


async def _record(url: str) -> tuple[str, str]:
    async with migrated_store(url) as store:
        recorder = Recorder(store, clock=StepClock(T0), redactor=Redactor(b"c" * 32))
        async with recorder:
            good = await recorder.open_session(
                agent_id="ag_alice", token_jti="jti-1", task_id="task-1", transport="http"
            )
            await good.record(
                EventKind.REQUEST,
                {"method": "tools/call", "tool": "files__read", "arguments": {"path": "/a"}},
            )
            await good.record(EventKind.DECISION, {"allowed": True, "reasons": []}, "dec-ok")
            await good.record(
                EventKind.RESULT,
                {
                    "is_error": False,
                    "excerpt": {"text": "[bold red]hi[/] <script>x</script> \x1b[2J", "chars": 9},
                    "latency_ms": 3,
                },
                "dec-ok",
            )
            await good.record(
                EventKind.REQUEST,
                {"method": "tools/call", "tool": "files__write", "arguments": {"path": "/etc"}},
            )
            await good.record(
                EventKind.DECISION,
                {"allowed": False, "reasons": ["scope-missing"], "tool": "files__write"},
                "dec-no",
            )
            await good.close("done")
            other = await recorder.open_session(
                agent_id="ag_bob", token_jti="jti-2", task_id="task-2", transport="stdio"
            )
            await other.record(EventKind.DECISION, {"allowed": True, "reasons": []}, "dec-b")
            await other.record(EventKind.DETECTOR_SIGNAL, {"detector": "burst", "score": 0.9})
        await store.flag_session(other.id, "suspicious")
    return good.id, other.id


@pytest.fixture(params=BACKENDS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    with start_blocking_portal() as portal:
        if request.param == "sqlite":
            url = sqlite_url(tmp_path)
            yield _broker(portal, url, tmp_path)
        else:
            with portal.wrap_async_context_manager(temporary_postgres_url()) as url:
                yield _broker(portal, url, tmp_path)


def _broker(portal: Any, url: str, tmp_path: Path) -> Broker:
    good, other = portal.call(_record, url)
    config = tmp_path / "broker.toml"
    config.write_text(f'[store]\nurl = "{url}"\n[tokens]\nkeys_dir = "keys"\n', encoding="utf-8")
    return Broker(url, config, good, other)


def sql(b: Broker, *statements: tuple[str, dict[str, Any]]) -> None:
    async def body() -> None:
        engine = create_async_engine(b.url)
        try:
            async with engine.begin() as conn:
                for statement, params in statements:
                    await conn.execute(text(statement), params)
        finally:
            await engine.dispose()

    anyio.run(body)


# --- list, show, export ----------------------------------------------------------------------


def test_list_shows_sessions_newest_first_with_their_decisions(broker: Broker) -> None:
    code, out, _ = invoke(broker, "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [broker.other, broker.good]
    good = rows[1]
    assert (good["agent_id"], good["allowed"], good["denied"]) == ("ag_alice", 1, 1)
    assert good["ended_at"] is not None
    assert rows[0]["flags"] == ["suspicious"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--agent", "ag_bob"], ["other"]),
        (["--task", "task-1"], ["good"]),
        (["--decision", "denied"], ["good"]),
        (["--decision", "allowed"], ["other", "good"]),
        (["--flagged"], ["other"]),
        (["--limit", "1"], ["other"]),
        (["--since", "2026-11-23T12:00:00.038Z"], ["other"]),
        (["--until", "2026-11-23T12:00:00.038"], ["good"]),
    ],
    ids=["agent", "task", "denied", "allowed", "flagged", "limit", "since", "until"],
)
def test_list_filters_sessions(broker: Broker, args: list[str], expected: list[str]) -> None:
    code, out, _ = invoke(broker, "list", *args, "--json")
    assert code == 0
    names = {broker.good: "good", broker.other: "other"}
    assert [names[r["id"]] for r in json.loads(out)] == expected


def test_list_prints_a_table(broker: Broker) -> None:
    code, out, _ = invoke(broker, "list")
    assert code == 0
    assert "ag_alice" in out
    assert "1/1" in out


def test_show_prints_a_timeline_with_the_denial_and_its_reason(broker: Broker) -> None:
    code, out, _ = invoke(broker, "show", broker.good)
    assert code == 0
    assert "verified (7 events)" in out
    assert "DENIED files__write (scope-missing)" in out
    assert "dec-no" in out
    # Recorded text is data: rich markup is printed literally, escape sequences are defused.
    assert "[bold red]hi[/]" in out
    assert "<script>x</script>" in out
    assert "\x1b" not in out
    assert "\\x1b[2J" in out


def test_show_json_carries_the_session_chain_and_events(broker: Broker) -> None:
    code, out, _ = invoke(broker, "show", broker.good, "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["chain"]["ok"] is True
    assert [e["kind"] for e in shown["events"]] == [
        "session-opened",
        "request",
        "decision",
        "result",
        "request",
        "decision",
        "session-closed",
    ]
    assert shown["session"]["head_hash"] == shown["events"][-1]["hash"]


def test_show_of_an_unknown_session_says_so(broker: Broker) -> None:
    code, _, err = invoke(broker, "show", "ses_missing")
    assert code == 1
    assert "ses_missing" in err


def test_export_writes_every_event_as_json_lines_oldest_session_first(broker: Broker) -> None:
    code, out, _ = invoke(broker, "export")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 10
    assert lines[0]["session_id"] == broker.good
    assert lines[0]["agent_id"] == "ag_alice"
    assert [line["seq"] for line in lines[:7]] == list(range(1, 8))


def test_export_of_one_session_as_ocsf_api_activity(broker: Broker) -> None:
    code, out, _ = invoke(broker, "export", "--session", broker.good, "--format", "ocsf")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 7
    assert {e["class_uid"] for e in events} == {6003}
    assert {e["type_uid"] for e in events} == {600399}
    denied = next(e for e in events if e["metadata"].get("correlation_uid") == "dec-no")
    assert (denied["status_id"], denied["severity_id"]) == (2, 3)
    assert denied["status_detail"] == "scope-missing"
    assert denied["actor"]["user"]["uid"] == "ag_alice"
    assert denied["actor"]["session"]["uid"] == broker.good
    assert denied["api"]["operation"] == "files__write"
    assert denied["time"] == int(
        datetime.fromisoformat(denied["metadata"]["original_time"]).timestamp() * 1000
    )


def test_export_json_is_one_array_and_ocsf_marks_detector_signals_high(broker: Broker) -> None:
    code, out, _ = invoke(broker, "export", "--session", broker.other, "--format", "ocsf", "--json")
    assert code == 0
    events = json.loads(out)
    signal = next(e for e in events if e["activity_name"] == "detector-signal")
    assert signal["severity_id"] == 4


# --- verify and tampering --------------------------------------------------------------------


def test_verify_all_passes_an_untouched_store(broker: Broker) -> None:
    code, out, _ = invoke(broker, "verify", "--all")
    assert code == 0
    assert "2 of 2 sessions verified" in out


def test_verify_needs_one_session_or_all(broker: Broker) -> None:
    assert invoke(broker, "verify")[0] == 2
    assert invoke(broker, "verify", broker.good, "--all")[0] == 2


def _swap_seqs(session: str, a: int, b: int) -> list[tuple[str, dict[str, Any]]]:
    move = "UPDATE events SET seq = :to WHERE session_id = :s AND seq = :frm"
    return [
        (move, {"s": session, "frm": a, "to": 1000}),
        (move, {"s": session, "frm": b, "to": a}),
        (move, {"s": session, "frm": 1000, "to": b}),
    ]


TAMPERINGS: list[tuple[str, list[tuple[str, dict[str, Any]]], int, str]] = [
    (
        "edit-payload",
        [
            (
                "UPDATE events SET payload = :p WHERE session_id = :s AND seq = 5",
                {"p": '{"allowed": true, "reasons": []}'},
            )
        ],
        5,
        "hash-mismatch",
    ),
    (
        "edit-decision-id",
        [("UPDATE events SET decision_id = 'dec-x' WHERE session_id = :s AND seq = 3", {})],
        3,
        "hash-mismatch",
    ),
    (
        "edit-kind",
        [("UPDATE events SET kind = 'notification' WHERE session_id = :s AND seq = 2", {})],
        2,
        "hash-mismatch",
    ),
    (
        "delete-event",
        [("DELETE FROM events WHERE session_id = :s AND seq = 4", {})],
        4,
        "gap",
    ),
    ("reorder-events", [], 3, "reordered"),
    (
        "truncate-tail",
        [("DELETE FROM events WHERE session_id = :s AND seq >= 6", {})],
        6,
        "truncated",
    ),
    (
        "edit-session-agent",
        [("UPDATE sessions SET agent_id = 'ag_mallory' WHERE id = :s", {})],
        1,
        "seal-mismatch",
    ),
    (
        "edit-seal",
        [("UPDATE sessions SET head_hash = :h WHERE id = :s", {"h": "ab" * 32})],
        7,
        "seal-mismatch",
    ),
]


@pytest.mark.parametrize(
    ("statements", "bad_seq", "problem"),
    [t[1:] for t in TAMPERINGS],
    ids=[t[0] for t in TAMPERINGS],
)
def test_tampering_with_the_tables_is_named_by_verify(
    broker: Broker, statements: list[tuple[str, dict[str, Any]]], bad_seq: int, problem: str
) -> None:
    statements = statements or _swap_seqs(broker.good, 3, 4)
    sql(broker, *[(stmt, {"s": broker.good, **params}) for stmt, params in statements])
    code, out, _ = invoke(broker, "verify", broker.good)
    assert code == 1
    assert f"first bad event {bad_seq}: {problem}" in out
    code, out, _ = invoke(broker, "verify", "--all", "--json")
    assert code == 1
    result = json.loads(out)
    assert result["ok"] is False
    reports = {r["session_id"]: r for r in result["reports"]}
    assert (reports[broker.good]["first_bad_seq"], reports[broker.good]["problem"]) == (
        bad_seq,
        problem,
    )
    assert reports[broker.other]["ok"] is True
    code, out, _ = invoke(broker, "show", broker.good)
    assert f"BROKEN at event {bad_seq}: {problem}" in out


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-11-23T10:00:00Z", datetime(2026, 11, 23, 10, tzinfo=UTC)),
        ("2026-11-23T10:00:00", datetime(2026, 11, 23, 10, tzinfo=UTC)),
        ("2026-11-23T11:00:00+01:00", datetime(2026, 11, 23, 10, tzinfo=UTC)),
        ("90m", T0 - timedelta(minutes=90)),
        ("2h", T0 - timedelta(hours=2)),
        ("7d", T0 - timedelta(days=7)),
    ],
    ids=["utc", "naive-is-utc", "offset", "minutes", "hours", "days"],
)
def test_times_are_iso_8601_or_an_age(given: str, expected: datetime) -> None:
    assert parse_when(given, T0) == expected


def test_a_nonsense_time_is_refused() -> None:
    with pytest.raises(typer.BadParameter, match="ISO 8601"):
        parse_when("yesterday", T0)


async def _record_signal(url: str) -> str:
    from broker.core.detectors.model import DetectorId, Response, Signal
    from broker.mediation import signal_payload

    signal = Signal(
        DetectorId.SECRET_ECHO,
        (("encoding", "base64"), ("matched", 0.75)),
        ("dec-read", "dec-fetch"),
        would=Response.QUARANTINE_AGENT,
        response=Response.RECORD,
        shadow=True,
    )
    async with migrated_store(url) as store:
        recorder = Recorder(store, clock=StepClock(T0), redactor=Redactor(b"c" * 32))
        async with recorder:
            session = await recorder.open_session(
                agent_id="ag_eve", token_jti="jti-3", task_id="task-3", transport="http"
            )
            await session.record(EventKind.DETECTOR_SIGNAL, signal_payload(signal), "dec-fetch")
            await session.close("done")
    return session.id


def test_show_prints_detector_signal_values_response_shadow_and_refs(broker: Broker) -> None:
    session = anyio.run(_record_signal, broker.url)
    code, out, _ = invoke(broker, "show", session)
    assert code == 0, out
    flat = " ".join(out.split())
    assert "secret-echo -> record (shadow, would quarantine-agent)" in flat
    assert "encoding=base64" in flat
    assert "matched=0.75" in flat
    assert "refs dec-read, dec-fetch" in flat
