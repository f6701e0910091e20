"""The engine shared by the MCP connectors: one supervised downstream session at a time.

A connector owns one background task (the supervisor) that opens a session, waits until it dies
or the connector closes, and reopens it with backoff. Callers never hold the session: each call
takes the live one, runs under its own deadline and maps SDK failures onto `connectors.errors`.
Imports mcp, anyio and stdlib only; never `broker`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, Literal, Self, TypeVar

import anyio
import mcp.types as types
from mcp import Client, MCPError
from mcp.client.session import ClientRequestContext
from mcp.shared.dispatcher import ProgressFnT
from pydantic import ValidationError

from connectors._direct_calls import DirectCalls, InvalidAnswer
from connectors.base import ChangeKind, ChangeListener, ConnectorSpec, JSONValue, ProgressCallback
from connectors.errors import (
    CallTimeout,
    ConnectorBroken,
    ConnectorClosed,
    ConnectorError,
    DownstreamError,
)
from connectors.relay import InFlight, current_relay

__all__ = [
    "CLIENT_INFO",
    "Link",
    "McpConnector",
    "ResourceListener",
    "call_deadline",
    "roots_result",
]

logger = logging.getLogger("connectors")

T = TypeVar("T")

CLIENT_INFO = types.Implementation(name="mcp-authz-broker", version="0.1.0")

CONNECTION_CLOSED = -32000
"""The SDK's code for a request whose transport went away (``mcp_types.CONNECTION_CLOSED``)."""

_STABLE_AFTER = 30.0
"""A session up this long resets the restart counter: crashes hours apart are not a loop."""

_CLOSE_TIMEOUT = 10.0
"""Upper bound for the supervisor to tear a session down after `aclose()`."""

_RESUBSCRIBE_TIMEOUT = 5.0
"""Upper bound for renewing one resource subscription on a restarted session."""

ResourceListener = Callable[[str], Awaitable[None]]
"""Told the URI of each ``notifications/resources/updated`` the downstream sends."""

_DEATH_NOTE_WAIT = 1.0
"""How long a failed call waits for the transport to say why it died (exit code) before raising."""


def call_deadline(spec: ConnectorSpec, timeout: float | None) -> float:
    """The deadline for one call: ``timeout`` or the spec's default, capped at the hard maximum."""
    wanted = spec.call_timeout if timeout is None else timeout
    return max(0.0, min(wanted, spec.max_call_timeout))


def roots_result(roots: tuple[str, ...]) -> types.ListRootsResult:
    """Answer `roots/list` from the spec's roots only (absolute paths become file:// URIs)."""
    return types.ListRootsResult(
        roots=[
            types.Root(uri=Path(root).absolute().as_uri(), name=Path(root).name or "/")  # pyright: ignore[reportArgumentType]
            for root in roots
        ]
    )


@dataclass(frozen=True, slots=True)
class _Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


class Link:
    """One live downstream session: the client, and how and why it ended.

    ``direct`` is the stdio child's direct ``tools/call`` channel (`connectors._direct_calls`),
    taken by every call that wants no progress; None for HTTP links.
    """

    def __init__(self, client: Client, direct: DirectCalls | None = None) -> None:
        self.client = client
        self.direct = direct
        self.dead = anyio.Event()
        self.why = ""

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, JSONValue],
        progress: ProgressFnT | None,
    ) -> types.CallToolResult:
        if progress is None and self.direct is not None:
            result = await self.direct.call_tool(name, arguments)
            if not result.is_error:
                # The SDK's own check of structured content against the tool's output schema.
                await self.client.session.validate_tool_result(name, result)
            return result
        return await self.client.call_tool(name, arguments, progress_callback=progress)

    def die(self, why: str) -> None:
        if not self.why:
            self.why = why
        self.dead.set()


State = Literal["new", "running", "failed", "closed"]


class McpConnector(ABC):
    """Supervision, deadlines and error mapping common to `StdioConnector` and `HttpConnector`."""

    kind: ClassVar[str]
    """Used in messages: ``"stdio"`` or ``"http"``."""

    def __init__(self, spec: ConnectorSpec) -> None:
        self._spec = spec
        self._state: State = "new"
        self._link: Link | None = None
        self._listeners: list[ChangeListener] = []
        self._resource_listeners: list[ResourceListener] = []
        self._subscribed: set[str] = set()
        self._inflight = InFlight()
        self._capabilities = types.ServerCapabilities()
        self._gave_up: ConnectorBroken | None = None
        # anyio primitives need a running loop, so they are made in start().
        self._start_lock: anyio.Lock | None = None
        self._changed: anyio.Event | None = None
        self._closing: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the seam the subclasses fill ---------------------------------------------------------

    @abstractmethod
    async def _open(self, stack: AsyncExitStack) -> Link:
        """Open one session on ``stack`` (spawn or connect, then handshake) and return it."""

    @abstractmethod
    def _describe(self) -> str:
        """``"stdio server 'fs'"``: how messages name this downstream."""

    @property
    @abstractmethod
    def _connect_timeout(self) -> float: ...

    def _session_lost(self, error: MCPError) -> bool:
        """Whether ``error`` means the downstream session is gone (and must be reopened)."""
        return False

    def _client(self, transport: object) -> Client:
        """A legacy-mode `Client` with the broker's callbacks; no cache (pins need fresh lists)."""
        roots = self._spec.roots

        async def list_roots(context: ClientRequestContext) -> types.ListRootsResult:
            return roots_result(roots)

        return Client(
            transport,  # pyright: ignore[reportArgumentType]
            mode="legacy",
            cache=None,
            client_info=CLIENT_INFO,
            message_handler=self._on_message,
            logging_callback=self._on_log,
            # Advertised so downstream servers may ask; each request is relayed only to the
            # caller of the one tool call in flight (see `connectors.relay`), else refused.
            sampling_callback=self._on_sampling,
            elicitation_callback=self._on_elicitation,
            # Advertise roots only when the broker has some: a server started with its own
            # directories keeps them instead of being narrowed to nothing.
            list_roots_callback=list_roots if roots else None,
        )

    # -- public surface -----------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._spec.id

    @property
    def capabilities(self) -> types.ServerCapabilities:
        return self._capabilities

    def add_change_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Spawn or connect and complete the handshake. Idempotent.

        Raises:
            ConnectorClosed: after `aclose()`.
            ConnectorBroken: the first session could not be opened; the cause is kept.
        """
        if self._start_lock is None:
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            if self._state == "closed":
                raise ConnectorClosed(f"{self._describe()} is closed")
            if self._state == "running":
                return
            self._gave_up = None
            self._changed = anyio.Event()
            self._closing = anyio.Event()
            self._stopped = anyio.Event()
            first: list[BaseException | None] = []
            first_done = anyio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(first, first_done), name=f"connector {self.id}"
            )
            self._state = "running"
            try:
                await first_done.wait()
            except BaseException:
                await self.aclose()
                raise
            if first and first[0] is not None:
                self._state = "failed"
                raise ConnectorBroken(f"{self._describe()} failed to start") from first[0]

    async def aclose(self) -> None:
        """Stop the session (and the child process) and fail in-flight calls. Idempotent."""
        was = self._state
        self._state = "closed"
        if was == "new" or self._closing is None or self._stopped is None:
            return
        self._closing.set()
        self._wake()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await self._stopped.wait()
            if not self._stopped.is_set() and self._task is not None:
                logger.error("connector did not stop in time", extra={"connector": self.id})
                self._task.cancel()

    async def list_tools(self) -> list[types.Tool]:
        async def fetch(client: Client, cursor: str | None) -> _Page[types.Tool]:
            page = await client.list_tools(cursor=cursor)
            return _Page(page.tools, page.next_cursor)

        return await self._list("tools/list", fetch)

    async def list_resources(self) -> list[types.Resource]:
        async def fetch(client: Client, cursor: str | None) -> _Page[types.Resource]:
            page = await client.list_resources(cursor=cursor)
            return _Page(page.resources, page.next_cursor)

        return await self._list("resources/list", fetch)

    async def list_resource_templates(self) -> list[types.ResourceTemplate]:
        async def fetch(client: Client, cursor: str | None) -> _Page[types.ResourceTemplate]:
            page = await client.list_resource_templates(cursor=cursor)
            return _Page(page.resource_templates, page.next_cursor)

        return await self._list("resources/templates/list", fetch)

    async def list_prompts(self) -> list[types.Prompt]:
        async def fetch(client: Client, cursor: str | None) -> _Page[types.Prompt]:
            page = await client.list_prompts(cursor=cursor)
            return _Page(page.prompts, page.next_cursor)

        return await self._list("prompts/list", fetch)

    async def read_resource(self, uri: str) -> types.ReadResourceResult:
        return await self._request(
            "resources/read", lambda link: link.client.read_resource(uri), None
        )

    async def get_prompt(
        self, name: str, arguments: Mapping[str, str] | None = None
    ) -> types.GetPromptResult:
        args = dict(arguments) if arguments is not None else None
        return await self._request(
            "prompts/get", lambda link: link.client.get_prompt(name, args), None
        )

    async def complete(
        self,
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: Mapping[str, str],
        context_arguments: Mapping[str, str] | None = None,
    ) -> types.Completion:
        ctx = dict(context_arguments) if context_arguments is not None else None
        result = await self._request(
            "completion/complete", lambda link: link.client.complete(ref, dict(argument), ctx), None
        )
        return result.completion

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, JSONValue],
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the Connector protocol's deadline
    ) -> types.CallToolResult:
        """Call ``name`` downstream within the deadline; tool errors come back as results.

        Raises:
            CallTimeout: the deadline passed; the downstream call was cancelled.
            ConnectorBroken: the downstream died or is unreachable.
            ConnectorClosed: the connector is closed.
            DownstreamError: the downstream answered with a protocol error (e.g. unknown tool).
        """
        args = dict(arguments)
        report = progress

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if report is not None:
                await report(progress, total, message)

        with self._inflight.call(current_relay.get()):
            return await self._request(
                "tools/call",
                lambda link: link.call_tool(name, args, on_progress if report else None),
                timeout,
            )

    # -- resource subscriptions ---------------------------------------------------------------

    def add_resource_listener(self, listener: ResourceListener) -> None:
        """Be told of every ``notifications/resources/updated`` (the downstream's URI)."""
        self._resource_listeners.append(listener)

    async def subscribe_resource(self, uri: str) -> None:
        """Subscribe downstream to ``uri``; renewed whenever the session is reopened.

        Raises:
            DownstreamError: the server refused (e.g. it does not support subscriptions).
        """
        await self._request(
            "resources/subscribe", lambda link: link.client.subscribe_resource(uri), None
        )
        self._subscribed.add(uri)

    async def unsubscribe_resource(self, uri: str) -> None:
        self._subscribed.discard(uri)
        await self._request(
            "resources/unsubscribe", lambda link: link.client.unsubscribe_resource(uri), None
        )

    async def _resubscribe(self, link: Link) -> None:
        for uri in sorted(self._subscribed):
            with anyio.move_on_after(_RESUBSCRIBE_TIMEOUT):
                try:
                    await link.client.subscribe_resource(uri)
                except Exception:
                    logger.warning(
                        "renewing a resource subscription failed", extra={"connector": self.id}
                    )

    # -- downstream traffic during a call -----------------------------------------------------

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        relay = self._inflight.route()
        if relay is None or relay.log is None:
            return
        try:
            await relay.log(params)
        except Exception:
            logger.warning("relaying a log message failed", extra={"connector": self.id})

    async def _on_sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        relay = self._inflight.route()
        if relay is None or relay.sampling is None:
            return _refused("sampling")
        try:
            # The agent answers within the longest a call may run, or the server hears no.
            with anyio.move_on_after(self._spec.max_call_timeout):
                return await relay.sampling(params)
            return _refused("sampling")
        except Exception:
            logger.warning("relaying a sampling request failed", extra={"connector": self.id})
            return _refused("sampling")

    async def _on_elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        relay = self._inflight.route()
        if relay is None or relay.elicitation is None:
            return _refused("elicitation")
        try:
            # The agent answers within the longest a call may run, or the server hears no.
            with anyio.move_on_after(self._spec.max_call_timeout):
                return await relay.elicitation(params)
            return _refused("elicitation")
        except Exception:
            logger.warning("relaying an elicitation request failed", extra={"connector": self.id})
            return _refused("elicitation")

    # -- calls --------------------------------------------------------------------------------

    async def _list(
        self,
        method: str,
        fetch: Callable[[Client, str | None], Awaitable[_Page[T]]],
    ) -> list[T]:
        async def all_pages(link: Link) -> list[T]:
            items: list[T] = []
            cursor: str | None = None
            for _ in range(1000):  # a paginator that never ends must not hang the broker
                page = await fetch(link.client, cursor)
                items.extend(page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
            return items

        return await self._request(method, all_pages, None)

    async def _request(
        self,
        method: str,
        send: Callable[[Link], Awaitable[T]],
        timeout: float | None,  # noqa: ASYNC109 - mapped onto our own cancel scope
    ) -> T:
        limit = call_deadline(self._spec, timeout)
        link: Link | None = None
        with anyio.move_on_after(limit):
            link = await self._live()
            try:
                return await send(link)
            except MCPError as exc:
                if exc.code == CONNECTION_CLOSED or self._session_lost(exc):
                    raise await self._broken(link) from exc
                raise DownstreamError(exc.error.message, code=exc.code) from exc
            except (ValidationError, InvalidAnswer) as exc:
                raise DownstreamError(
                    f"{self._describe()} sent an invalid {method} result", code=-32603
                ) from exc
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise await self._broken(link) from exc
        if link is None:
            raise ConnectorBroken(f"{self._describe()} was not available within {limit:g}s")
        raise CallTimeout(f"{method} to {self._describe()} exceeded its {limit:g}s deadline")

    async def _live(self) -> Link:
        """The current session; waits (within the caller's deadline) while one is being opened."""
        if self._state == "new":
            await self.start()
        while True:
            if self._state == "closed":
                raise ConnectorClosed(f"{self._describe()} is closed")
            if self._gave_up is not None:
                raise self._gave_up
            if self._state == "failed":
                raise ConnectorBroken(f"{self._describe()} failed to start")
            link = self._link
            if link is not None and not link.dead.is_set():
                return link
            if self._changed is not None:
                await self._changed.wait()

    async def _broken(self, link: Link) -> ConnectorError:
        if self._state == "closed":
            return ConnectorClosed(f"{self._describe()} was closed during the call")
        with anyio.move_on_after(_DEATH_NOTE_WAIT):
            await link.dead.wait()
        # Still "alive" (an HTTP session the server forgot): drop it so the supervisor reopens.
        link.die(f"{self._describe()} lost the session")
        return ConnectorBroken(link.why)

    def _wake(self) -> None:
        if self._changed is not None:
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    # -- supervision --------------------------------------------------------------------------

    async def _supervise(self, first: list[BaseException | None], first_done: anyio.Event) -> None:
        closing, stopped = self._closing, self._stopped
        if closing is None or stopped is None:
            return
        restarts = 0
        opened_once = False
        try:
            while not closing.is_set():
                cause: BaseException | None = None
                up_since: float | None = None
                link: Link | None = None
                try:
                    # One scope around the whole session (task groups entered by `_open` must
                    # exit inside it); its deadline bounds only the opening and is lifted after.
                    connect_limit = self._connect_timeout
                    with anyio.CancelScope(deadline=anyio.current_time() + connect_limit) as scope:
                        async with AsyncExitStack() as stack:
                            link = await self._open(stack)
                            scope.deadline = math.inf
                            up_since = anyio.current_time()
                            self._capabilities = link.client.server_capabilities
                            self._link = link
                            self._wake()
                            if opened_once:
                                logger.info("connector restarted", extra={"connector": self.id})
                                await self._resubscribe(link)
                                await self._notify(ChangeKind.RESTARTED)
                            else:
                                opened_once = True
                                first.append(None)
                                first_done.set()
                            await _wait_any(link.dead, closing)
                            self._link = None
                            self._wake()
                    if scope.cancelled_caught and up_since is None:
                        cause = TimeoutError(f"no handshake within {connect_limit:g}s")
                except Exception as exc:
                    cause = exc
                if link is not None:
                    link.die(f"{self._describe()} connection failed")
                self._link = None
                self._wake()
                if closing.is_set():
                    break
                if not opened_once:
                    first.append(cause)
                    first_done.set()
                    return
                logger.warning(
                    "connector session ended",
                    extra={
                        "connector": self.id,
                        "why": link.why if link else None,
                        "error": type(cause).__name__ if cause else None,
                    },
                )
                logger.debug("connector session failure", exc_info=cause)
                if up_since is not None and anyio.current_time() - up_since > _STABLE_AFTER:
                    restarts = 0
                if restarts >= self._max_restarts:
                    self._gave_up = ConnectorBroken(
                        f"{self._describe()} gave up after {restarts} restarts"
                    )
                    logger.error("connector gave up restarting", extra={"connector": self.id})
                    return
                backoff = self._backoff
                delay = backoff[min(restarts, len(backoff) - 1)] if backoff else 0.0
                restarts += 1
                with anyio.move_on_after(delay):
                    await closing.wait()
        finally:
            self._link = None
            if not first_done.is_set():
                first.append(ConnectorClosed(f"{self._describe()} was closed while starting"))
                first_done.set()
            stopped.set()
            self._wake()

    @property
    def _backoff(self) -> tuple[float, ...]:
        return getattr(self._spec, "restart_backoff", (0.1, 0.5, 1.0, 2.0, 5.0))

    @property
    def _max_restarts(self) -> int:
        return getattr(self._spec, "max_restarts", 5)

    async def _on_message(self, message: object) -> None:
        kind: ChangeKind | None = None
        if isinstance(message, types.ToolListChangedNotification):
            kind = ChangeKind.TOOLS
        elif isinstance(message, types.ResourceListChangedNotification):
            kind = ChangeKind.RESOURCES
        elif isinstance(message, types.PromptListChangedNotification):
            kind = ChangeKind.PROMPTS
        if kind is not None:
            await self._notify(kind)
        elif isinstance(message, types.ResourceUpdatedNotification):
            uri = str(message.params.uri)
            for listener in list(self._resource_listeners):
                try:
                    await listener(uri)
                except Exception:
                    logger.exception("resource listener failed", extra={"connector": self.id})

    async def _notify(self, kind: ChangeKind) -> None:
        for listener in list(self._listeners):
            try:
                await listener(kind)
            except Exception:  # a listener's bug must not take the connector down
                logger.exception(
                    "change listener failed", extra={"connector": self.id, "change": str(kind)}
                )


def _refused(what: str) -> types.ErrorData:
    return types.ErrorData(
        code=types.INVALID_REQUEST,
        message=f"{what} is not available: no caller of this server can answer it now",
    )


async def _wait_any(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)
