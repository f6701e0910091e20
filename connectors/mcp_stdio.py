"""StdioConnector: an MCP server run as a child process. Imports mcp, anyio, stdlib; never `broker`.

Why not the SDK's `stdio_client`: it always adds HOME, LOGNAME, PATH, SHELL, TERM and USER from
the broker's environment, and it hides the process, so neither the exit code nor the child's
stderr can be had. This module spawns the child itself:

- argv is ``[spec.command, *spec.args]``, no shell; the child starts a new session (its own
  process group), so the whole group can be signalled;
- the environment is exactly the names in ``spec.env_allowlist`` found in the broker's
  environment plus ``spec.env`` (see `child_environment`);
- stderr is read line by line into the ``connectors.stdio`` logger (``extra={"connector": id}``),
  never onto the broker's own stderr;
- shutdown closes stdin, waits `STDIN_GRACE`, sends SIGTERM to the group, waits `TERM_GRACE`,
  then SIGKILL; it runs shielded, so a cancelled caller cannot leave the child behind;
- a child that exits makes in-flight calls fail at once with ``ConnectorBroken("stdio server
  'fs' exited with code 1")``, and the supervisor restarts it with the spec's backoff.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import anyio
import anyio.abc
import mcp.types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.message import SessionMessage

from connectors._mcp import Link, McpConnector
from connectors.base import StdioSpec
from connectors.errors import ConnectorConfigError

__all__ = ["STDIN_GRACE", "TERM_GRACE", "StdioConnector", "child_environment"]

logger = logging.getLogger("connectors.stdio")

STDIN_GRACE = 0.5
"""Seconds a child gets to exit on its own once its stdin is closed."""

TERM_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL."""

START_TIMEOUT = 30.0
"""Spawn plus handshake; npm servers take about a second on a quiet machine."""

MAX_LINE = 16 * 1024 * 1024
"""A stdout line (one JSON-RPC message) longer than this ends the session."""

MAX_STDERR_LINE = 8 * 1024
"""Longer stderr lines are cut before logging."""


def child_environment(spec: StdioSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The child's whole environment: allowlisted names from ``environ``, then ``spec.env``."""
    env = {name: environ[name] for name in spec.env_allowlist if name in environ}
    env.update(spec.env)
    return env


class StdioConnector(McpConnector):
    """An MCP server as a supervised subprocess (see the module docstring for the guarantees)."""

    kind = "stdio"

    def __init__(self, spec: StdioSpec, *, environ: Mapping[str, str] | None = None) -> None:
        """``environ`` is the broker's environment the allowlist draws from (default: os.environ).

        Raises:
            ConnectorConfigError: ``spec.command`` is empty.
        """
        if not spec.command:
            raise ConnectorConfigError(f"stdio connector '{spec.id}' has an empty command")
        super().__init__(spec)
        self.spec = spec
        self._env = child_environment(spec, os.environ if environ is None else environ)
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The current child's process id (None while none runs); for tests and operators."""
        return self._pid

    def _describe(self) -> str:
        return f"stdio server '{self.id}'"

    @property
    def _connect_timeout(self) -> float:
        return START_TIMEOUT

    async def _open(self, stack: AsyncExitStack) -> Link:
        holder: list[Link] = []

        def died(why: str) -> None:
            if holder:
                holder[0].die(why)

        transport = _child_transport(self, died)
        client = self._client(transport)
        link = Link(client)
        holder.append(link)
        await stack.enter_async_context(client)
        return link


_Streams = tuple[
    MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]
]


@asynccontextmanager
async def _child_transport(
    owner: StdioConnector, died: Callable[[str], None]
) -> AsyncIterator[_Streams]:
    spec = owner.spec
    describe = owner._describe()  # pyright: ignore[reportPrivateUsage]
    process = await anyio.open_process(
        [spec.command, *spec.args],
        env=owner._env,  # pyright: ignore[reportPrivateUsage]
        cwd=spec.cwd,
        start_new_session=True,
    )
    owner._pid = process.pid  # pyright: ignore[reportPrivateUsage]
    extra = {"connector": spec.id, "pid": process.pid}
    logger.info("stdio server started", extra=extra)
    to_session, from_child = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    to_child, from_session = anyio.create_memory_object_stream[SessionMessage](0)

    async def read_stdout() -> None:
        stdout = process.stdout
        if stdout is None:
            return
        buffer = b""
        try:
            async with to_session:
                async for chunk in stdout:
                    buffer += chunk
                    if len(buffer) > MAX_LINE and b"\n" not in buffer:
                        logger.error("stdio server sent an oversized message", extra=extra)
                        break
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            await to_session.send(_parse(line))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        # Prefer the exit code as the reason: the child usually exits right after EOF.
        with anyio.move_on_after(1.0):
            await _wait_exit(process)
        if process.returncode is not None:
            died(f"{describe} exited with code {process.returncode}")
        else:
            died(f"{describe} closed its stdout")

    async def write_stdin() -> None:
        stdin = process.stdin
        if stdin is None:
            return
        try:
            async with from_session:
                async for message in from_session:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdin.send(data.encode() + b"\n")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            died(f"{describe} stopped reading its stdin")
        finally:
            with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stdin.aclose()

    async def read_stderr() -> None:
        stderr = process.stderr
        if stderr is None:
            return
        buffer = b""
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            async for chunk in stderr:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_STDERR_LINE:
                    lines.append(buffer)
                    buffer = b""
                for line in lines:
                    _log_stderr(line, extra)
        if buffer:
            _log_stderr(buffer, extra)

    async def watch_exit() -> None:
        code = await _wait_exit(process)
        logger.info("stdio server exited", extra={**extra, "returncode": code})
        died(f"{describe} exited with code {code}")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_stdout)
            tg.start_soon(write_stdin)
            tg.start_soon(read_stderr)
            tg.start_soon(watch_exit)
            try:
                yield from_child, to_child
            finally:
                with anyio.CancelScope(shield=True):
                    to_child.close()
                    from_child.close()
                    await _stop(process, extra)
                tg.cancel_scope.cancel()
    finally:
        owner._pid = None  # pyright: ignore[reportPrivateUsage]
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            await process.aclose()


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        return exc


def _log_stderr(line: bytes, extra: Mapping[str, object]) -> None:
    text = line[:MAX_STDERR_LINE].decode("utf-8", errors="replace").rstrip("\r")
    if text:
        logger.info("%s", text, extra=dict(extra))


async def _wait_exit(process: anyio.abc.Process) -> int:
    """Wait for the child to exit without waiting for its pipes (a grandchild may hold them)."""
    pidfd: int | None = None
    with suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(process.pid)
    try:
        if pidfd is not None and process.returncode is None:
            await anyio.wait_readable(pidfd)
        # asyncio's child watcher records the status a moment after the pidfd fires.
        while process.returncode is None:  # noqa: ASYNC110 - no event carries the status
            await anyio.sleep(0.01 if pidfd is not None else 0.05)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return process.returncode


async def _stop(process: anyio.abc.Process, extra: Mapping[str, object]) -> None:
    """Close stdin, then SIGTERM and SIGKILL the child's process group, each step bounded."""
    if process.stdin is not None:
        with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.aclose()
    for sig, grace in ((None, STDIN_GRACE), (signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 2.0)):
        if sig is not None and process.returncode is None:
            logger.info("signalling stdio server", extra={**extra, "signal": sig.name})
            _signal_group(process.pid, sig)
        with anyio.move_on_after(grace):
            await _wait_exit(process)
        if process.returncode is not None:
            break
    else:
        logger.error("stdio server survived SIGKILL", extra=dict(extra))
    # Whatever the child left in its process group is an orphan now.
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
