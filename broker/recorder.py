"""The session recorder: durable, hash-chained events with group commit. Shell; uses anyio.

`Recorder.record` returns only after its event is committed. One writer task gathers the events
that concurrent callers hand in (many sessions at once) into one `append_events` transaction,
so a busy broker pays one commit for many calls. When the recorder is idle (no event waiting or
being committed) a caller commits its lone event itself, on its own task: handing it to the
writer task and being woken again would cost two task switches for nothing to batch with. One
lock lets a single commit run at a time, and a caller takes that shortcut only when no earlier
event is outstanding, so events commit in the order they were handed in either way (one
exception: a caller cancelled while its event waits in the queue stops holding the shortcut
back, so a later event may commit first; both still get their own places in the chain). A commit
is the only place that assigns a session's ``seq`` and ``prev_hash``: the recorder keeps each
session's chain head in memory (loaded with `session_head` the first time a resumed session is
seen) and advances it only once the batch is committed. When a batch fails, every waiter in it
gets the error (`StoreUnavailable`: the caller refuses the call with ``store-unavailable``) and
the heads of the sessions in it are forgotten, so the next event reloads the head from the
store and continues the chain with no gap and no fork, whether or not the failed commit
actually landed.

Payloads are redacted (`broker.core.redaction`) before they are sealed; the chain itself is
`broker.core.recording`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker.core.recording import (
    EventKind,
    RecordedEvent,
    SessionRecord,
    genesis_hash,
    normalize_json,
    seal_event,
    session_identity,
)
from broker.core.redaction import Redactor
from broker.errors import StoreError, StoreUnavailable
from broker.ports import Clock
from broker.store.errors import Conflict

__all__ = ["EventStore", "Recorder", "RecorderStats", "SessionHandle"]

logger = logging.getLogger(__name__)


class EventStore(Protocol):
    """The part of `broker.ports.Store` the recorder writes through."""

    async def open_session(self, session: SessionRecord) -> None: ...

    async def append_events(
        self, events: Sequence[RecordedEvent], *, durable: bool = True, alone: bool = False
    ) -> None: ...

    async def session_head(self, session_id: str) -> tuple[int, str] | None: ...

    async def close_session(self, session_id: str, ended_at: datetime, head_hash: str) -> None: ...

    async def get_session(self, session_id: str) -> SessionRecord: ...

    async def session_events(
        self, session_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> Sequence[RecordedEvent]: ...


@dataclass(slots=True)
class RecorderStats:
    """Counters for metrics: what the writer did since start."""

    events: int = 0
    batches: int = 0
    failed_batches: int = 0
    failed_events: int = 0
    largest_batch: int = 0


@dataclass(slots=True, eq=False)
class _Pending:
    session_id: str
    at: datetime
    kind: str
    payload: dict[str, Any]
    decision_id: str | None
    durable: bool = True
    alone: bool = False
    result: RecordedEvent | None = None
    error: BaseException | None = None
    finished: bool = False
    _done: anyio.Event | None = None
    """Made only for a waiter that must sleep: the idle shortcut never waits on it."""

    async def wait(self) -> None:
        if not self.finished:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()

    def outcome(self) -> RecordedEvent:
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise StoreUnavailable("the event was neither recorded nor refused")
        return self.result

    def resolve(self, result: RecordedEvent) -> None:
        self.result = result
        self._finish()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self._done is not None:
            self._done.set()


@dataclass(frozen=True, slots=True)
class SessionHandle:
    """One open session: record into it, then close it (which seals it)."""

    recorder: Recorder
    session: SessionRecord

    @property
    def id(self) -> str:
        return self.session.id

    async def record(
        self, kind: EventKind | str, payload: Mapping[str, Any], decision_id: str | None = None
    ) -> RecordedEvent:
        """See `Recorder.record`."""
        return await self.recorder.record(self.session.id, kind, payload, decision_id)

    async def close(self, reason: str | None = None) -> RecordedEvent:
        """See `Recorder.close_session`."""
        return await self.recorder.close_session(self.session.id, reason=reason)


class Recorder:
    """Records session events durably; use as ``async with Recorder(store, ...) as recorder``.

    ``batch_max`` bounds one transaction; ``flush_interval`` (seconds) is how long the writer
    lingers to grow a batch, and it lingers only while the previous batch held more than one
    event, so a lone caller never waits for company.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        clock: Clock,
        redactor: Redactor,
        batch_max: int = 256,
        flush_interval: float = 0.002,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        self._store = store
        self._clock = clock
        self._redactor = redactor
        self._batch_max = batch_max
        self._flush_interval = flush_interval
        self._heads: dict[str, tuple[int, str]] = {}
        """Committed chain head per session this process writes: (seq, hash)."""
        self._closed: dict[str, RecordedEvent] = {}
        """Sessions whose session-closed event is committed (kept to retry a failed seal)."""
        self._send: MemoryObjectSendStream[_Pending] | None = None
        self._task_group: TaskGroup | None = None
        self._committing = anyio.Lock()
        """Held by whoever commits (the writer, or a caller on the idle shortcut)."""
        self._outstanding = 0
        """Events handed in and not yet answered: the shortcut is only for when this is 0."""
        self.stats = RecorderStats()

    async def __aenter__(self) -> Self:
        send, receive = anyio.create_memory_object_stream[_Pending](self._batch_max * 16)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._send = send
        self._task_group.start_soon(self._writer, receive)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # Closing the send side lets the writer commit what is queued, then stop.
        send, group = self._send, self._task_group
        self._send = None
        self._task_group = None
        if send is not None:
            send.close()
        try:
            if group is not None:
                return await group.__aexit__(exc_type, exc, tb)
            return None
        finally:
            # A caller may still be committing on the shortcut: the store must outlive it.
            with anyio.CancelScope(shield=True):
                async with self._committing:
                    pass

    # sessions

    async def open_session(
        self,
        *,
        agent_id: str,
        token_jti: str,
        task_id: str,
        session_id: str | None = None,
        protocol_version: str = "",
        transport: str = "",
        client_info: Mapping[str, Any] | None = None,
    ) -> SessionHandle:
        """Create the session row and record its ``session-opened`` event (seq 1).

        Raises:
            StoreUnavailable: the store cannot write; the session does not exist.
            Conflict: ``session_id`` is taken.
        """
        record = SessionRecord(
            id=session_id or f"ses_{uuid.uuid4().hex}",
            agent_id=agent_id,
            token_jti=token_jti,
            task_id=task_id,
            started_at=self._clock.now(),
            protocol_version=protocol_version,
            transport=transport,
            client_info=normalize_json(self._redactor.redact(dict(client_info or {}))),
        )
        await self._store.open_session(record)
        identity = session_identity(record)
        await self._submit(
            _Pending(
                record.id,
                record.started_at,
                EventKind.SESSION_OPENED,
                normalize_json(identity),
                None,
            )
        )
        return SessionHandle(self, record)

    async def resume_session(self, session_id: str) -> SessionHandle:
        """A handle on a session opened earlier (by this or another process).

        Raises:
            NotFound: no such session.
            StoreUnavailable: the store cannot be read.
        """
        return SessionHandle(self, await self._store.get_session(session_id))

    async def record(
        self,
        session_id: str,
        kind: EventKind | str,
        payload: Mapping[str, Any],
        decision_id: str | None = None,
        *,
        durable: bool = True,
        alone: bool = False,
    ) -> RecordedEvent:
        """Redact ``payload``, append it to the session's chain, and return once committed.

        ``durable=False`` is for a write-ahead record that a durable one will follow before
        anything is acknowledged (the decision to forward a call, then its result): it returns
        once written, without waiting for the flush (see `broker.ports.Store.append_events`).
        A batch holding any durable event is flushed as a whole.

        ``alone=True`` says the caller is the only work in progress in this process (no other
        call is being served): when the recorder is idle too, the store may wait for the flush
        on the event loop rather than on a worker thread (see `broker.ports.Store.append_events`).

        Raises:
            StoreUnavailable: the event is not recorded (the caller must refuse the call).
            Conflict: the session is closed, or another writer advanced its chain meanwhile.
            NotFound: no such session.
            ValueError: ``payload`` is not JSON-shaped, or ``kind`` is reserved.
        """
        if kind in (EventKind.SESSION_OPENED, EventKind.SESSION_CLOSED):
            raise ValueError(f"{kind} events are written by open_session and close_session")
        clean = normalize_json(self._redactor.redact(payload))
        return await self._submit(
            _Pending(session_id, self._now(), kind, clean, decision_id, durable, alone)
        )

    async def close_session(self, session_id: str, *, reason: str | None = None) -> RecordedEvent:
        """Record ``session-closed`` and seal the session with its hash; returns that event.

        Safe to retry, and closing a sealed session again returns its closing event.

        Raises:
            StoreUnavailable: the session is not (yet) sealed; retrying later completes it.
        """
        closing = self._closed.get(session_id)
        if closing is None:
            extra: dict[str, Any] = {} if reason is None else {"reason": reason}
            try:
                closing = await self._submit(
                    _Pending(
                        session_id,
                        self._now(),
                        EventKind.SESSION_CLOSED,
                        normalize_json(extra),
                        None,
                    )
                )
            except Conflict:
                sealed = await self._sealed_by_now(session_id)
                if sealed is None:
                    raise
                return sealed
        await self._store.close_session(session_id, closing.at, closing.hash)
        self._closed.pop(session_id, None)
        return closing

    async def _sealed_by_now(self, session_id: str) -> RecordedEvent | None:
        """The closing event of a session sealed earlier (a repeated close), else None."""
        session = await self._store.get_session(session_id)
        if session.head_hash is None:
            return None
        tail = await self._store.session_events(session_id, after_seq=session.event_count - 1)
        return tail[-1] if tail else None

    # the writer

    def _now(self) -> datetime:
        now = self._clock.now()
        if now.tzinfo is None:
            raise ValueError("the clock must give aware datetimes")
        return now

    async def _submit(self, pending: _Pending) -> RecordedEvent:
        if self._send is None:
            raise StoreUnavailable("the recorder is not running")
        if self._outstanding == 0 and not self._committing.locked():
            # The idle shortcut (module docstring). Shielded like the writer's commits: once
            # started, a commit finishes (the store's own timeouts bound it), so the heads
            # never disagree with what is on disk.
            self._committing.acquire_nowait()
            self._outstanding += 1
            try:
                with anyio.CancelScope(shield=True):
                    await self._commit_batch([pending], alone=pending.alone)
            finally:
                self._outstanding -= 1
                self._committing.release()
            return pending.outcome()
        self._outstanding += 1
        try:
            try:
                await self._send.send(pending)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise StoreUnavailable("the recorder is shutting down") from None
            await pending.wait()
        finally:
            self._outstanding -= 1
        return pending.outcome()

    async def _writer(self, receive: MemoryObjectReceiveStream[_Pending]) -> None:
        previous = 1
        async with receive:
            while True:
                try:
                    first = await receive.receive()
                except anyio.EndOfStream:
                    return
                batch = [first]
                async with self._committing:
                    self._drain(receive, batch)
                    if previous > 1 and len(batch) < self._batch_max and self._flush_interval:
                        with anyio.move_on_after(self._flush_interval):
                            while len(batch) < self._batch_max:
                                try:
                                    batch.append(await receive.receive())
                                except anyio.EndOfStream:
                                    break
                                self._drain(receive, batch)
                    previous = len(batch)
                    await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Pending], *, alone: bool = False) -> None:
        """Commit ``batch`` under ``self._committing``; every waiter in it is answered."""
        try:
            await self._commit(batch, alone=alone)
        except Exception as exc:
            # The writer is a top-level loop: an unexpected error fails this batch (closed) and
            # the writer carries on with the next one.
            logger.exception("recorder batch failed")
            error = StoreUnavailable("recording failed")
            error.__cause__ = exc
            self._abandon(batch, error)
        except BaseException:
            self._abandon(batch, StoreUnavailable("the recorder stopped"))
            raise

    def _drain(self, receive: MemoryObjectReceiveStream[_Pending], batch: list[_Pending]) -> None:
        while len(batch) < self._batch_max:
            try:
                batch.append(receive.receive_nowait())
            except anyio.WouldBlock:
                return

    def _abandon(self, batch: list[_Pending], error: StoreUnavailable) -> None:
        """Nobody may wait forever, or believe an unconfirmed event was recorded."""
        for p in batch:
            self._heads.pop(p.session_id, None)
            if not p.finished:
                p.fail(error)

    async def _head(self, session_id: str) -> tuple[int, str]:
        head = self._heads.get(session_id)
        if head is None:
            found = await self._store.session_head(session_id)
            head = found if found is not None else (0, genesis_hash(session_id))
            self._heads[session_id] = head
        return head

    async def _commit(self, batch: list[_Pending], *, alone: bool = False) -> None:
        """Seal the batch on top of the committed heads, append it, resolve the waiters."""
        heads: dict[str, tuple[int, str]] = {}
        groups: dict[str, list[tuple[_Pending, RecordedEvent]]] = {}
        for p in batch:
            head = heads.get(p.session_id)
            if head is None:
                try:
                    head = await self._head(p.session_id)
                except StoreError as exc:
                    p.fail(exc)
                    continue
            pending_here = groups.get(p.session_id, [])
            closing = pending_here and pending_here[-1][1].kind == EventKind.SESSION_CLOSED
            if p.session_id in self._closed or closing:
                p.fail(Conflict(f"session {p.session_id!r} is closed"))
                continue
            seq, prev = head
            payload = p.payload
            if p.kind == EventKind.SESSION_CLOSED:
                payload = {**payload, "event_count": seq + 1}
            # Every payload was normalised when it was handed in (`_Pending.payload`).
            event = seal_event(
                p.session_id, seq + 1, p.at, p.kind, payload, p.decision_id, prev, normalized=True
            )
            heads[p.session_id] = (event.seq, event.hash)
            groups.setdefault(p.session_id, []).append((p, event))
        if not groups:
            return
        durable = any(p.durable for g in groups.values() for p, _ in g)
        try:
            await self._store.append_events(
                [e for g in groups.values() for _, e in g], durable=durable, alone=alone
            )
        except Conflict:
            # One session's chain moved under us (another process wrote it): isolate it so the
            # other sessions in the batch still commit.
            for sid, group in groups.items():
                await self._commit_group(sid, group)
            return
        except StoreError as exc:
            self._fail_groups(groups, exc)
            return
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, sum(map(len, groups.values())))
        for sid, group in groups.items():
            self._committed(sid, group)

    async def _commit_group(self, sid: str, group: list[tuple[_Pending, RecordedEvent]]) -> None:
        try:
            await self._store.append_events(
                [e for _, e in group], durable=any(p.durable for p, _ in group)
            )
        except StoreError as exc:
            self._fail_groups({sid: group}, exc)
        else:
            self.stats.batches += 1
            self._committed(sid, group)

    def _committed(self, sid: str, group: list[tuple[_Pending, RecordedEvent]]) -> None:
        last = group[-1][1]
        self._heads[sid] = (last.seq, last.hash)
        self.stats.events += len(group)
        for p, event in group:
            if event.kind == EventKind.SESSION_CLOSED:
                self._closed[sid] = event
                self._heads.pop(sid, None)
            p.resolve(event)

    def _fail_groups(
        self, groups: Mapping[str, list[tuple[_Pending, RecordedEvent]]], exc: StoreError
    ) -> None:
        self.stats.failed_batches += 1
        logger.warning(
            "recording failed",
            extra={"error_type": type(exc).__name__, "events": sum(map(len, groups.values()))},
        )
        for sid, group in groups.items():
            self._heads.pop(sid, None)
            self.stats.failed_events += len(group)
            for p, _ in group:
                p.fail(exc)
