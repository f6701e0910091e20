"""Recorded sessions as JSON and read whole from the store: shared by the admin API, the review
page and ``broker sessions``. Shell; imports `broker.core.recording` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.core.recording import ChainReport, RecordedEvent, SessionRecord, format_timestamp

__all__ = ["EVENT_BATCH", "all_events", "event_json", "report_json", "session_json"]

EVENT_BATCH = 1000
"""Events read per store call when a whole session is read."""


def session_json(session: SessionRecord) -> dict[str, Any]:
    return {
        "id": session.id,
        "agent_id": session.agent_id,
        "token_jti": session.token_jti,
        "task_id": session.task_id,
        "started_at": format_timestamp(session.started_at),
        "ended_at": None if session.ended_at is None else format_timestamp(session.ended_at),
        "protocol_version": session.protocol_version,
        "transport": session.transport,
        "client_info": dict(session.client_info),
        "event_count": session.event_count,
        "head_hash": session.head_hash,
        "flags": list(session.flags),
    }


def event_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "session_id": event.session_id,
        "seq": event.seq,
        "at": format_timestamp(event.at),
        "kind": event.kind,
        "decision_id": event.decision_id,
        "payload": dict(event.payload),
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def report_json(report: ChainReport) -> dict[str, Any]:
    return {
        "session_id": report.session_id,
        "ok": report.ok,
        "checked": report.checked,
        "head_hash": report.head_hash,
        "first_bad_seq": report.first_bad_seq,
        "problem": None if report.problem is None else report.problem.value,
        "detail": report.detail,
    }


async def all_events(
    store: Any, session_id: str, *, batch_size: int = EVENT_BATCH
) -> list[RecordedEvent]:
    """Every event of a session in order, read ``batch_size`` at a time.

    Raises:
        StoreUnavailable: the store cannot be read.
    """
    events: list[RecordedEvent] = []
    while True:
        after = events[-1].seq if events else 0
        batch: Sequence[RecordedEvent] = await store.session_events(
            session_id, after_seq=after, limit=batch_size
        )
        events.extend(batch)
        if len(batch) < batch_size:
            return events
