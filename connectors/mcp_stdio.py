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
  'fs' exited with code 1")``, and the supervisor restarts it with the spec's backoff;
- with ``spec.sandbox`` (mode ``required`` or ``auto``) each spawn runs inside the bubblewrap
  jail `connectors.sandbox.plan_sandbox` builds (and, when the spec declares egress, behind a
  fresh unix socket of the `connectors.egress.EgressProxy` passed as ``egress``); ``required``
  on a platform that cannot sandbox is refused at construction, ``auto`` logs a warning and
  runs unsandboxed. Unsandboxed children are started through ``setpriv --pdeathsig KILL`` so
  they die with the broker even when it is SIGKILLed (bubblewrap's ``--die-with-parent`` does
  the same for jails);
- ``tools/call`` requests that want no progress go straight to the child's stdin and their
  answers are taken off its stdout before the SDK session sees them
  (`connectors._direct_calls`); everything else is the SDK's;
- with ``spec.expected_provenance`` each spawn first recomputes the connector's provenance
  digest (`connectors.provenance`) and refuses to run anything else.
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

from connectors._direct_calls import DirectCalls
from connectors._mcp import Link, McpConnector
from connectors.base import SandboxMode, StdioSpec
from connectors.egress import EgressListener, EgressProxy
from connectors.errors import ConnectorConfigError
from connectors.provenance import ProvenanceChanged, connector_provenance
from connectors.sandbox import SandboxUnavailable, plan_sandbox, probe_sandbox

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

SETPRIV = "/usr/bin/setpriv"
"""util-linux; gives unsandboxed children PR_SET_PDEATHSIG without a pre-exec hook."""


def child_environment(spec: StdioSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The child's whole environment: allowlisted names from ``environ``, then ``spec.env``."""
    env = {name: environ[name] for name in spec.env_allowlist if name in environ}
    env.update(spec.env)
    return env


class StdioConnector(McpConnector):
    """An MCP server as a supervised subprocess (see the module docstring for the guarantees)."""

    kind = "stdio"

    def __init__(
        self,
        spec: StdioSpec,
        *,
        environ: Mapping[str, str] | None = None,
        egress: EgressProxy | None = None,
    ) -> None:
        """``environ`` is the broker's environment the allowlist draws from (default: os.environ);
        ``egress`` is the proxy a sandboxed connector that declares egress goes out through.

        Raises:
            ConnectorConfigError: ``spec.command`` is empty, the sandbox paths are invalid, or
                egress is declared without a proxy.
            SandboxUnavailable: ``spec.sandbox.mode`` is ``required`` and the platform cannot
                sandbox (the message says why).
        """
        if not spec.command:
            raise ConnectorConfigError(f"stdio connector '{spec.id}' has an empty command")
        super().__init__(spec)
        self.spec = spec
        self._env = child_environment(spec, os.environ if environ is None else environ)
        self._pid: int | None = None
        self._egress = egress
        self._sandboxed = False
        box = spec.sandbox
        if box is not None and box.mode is not SandboxMode.OFF:
            support = probe_sandbox()
            if support.available:
                if box.egress is not None and egress is None:
                    raise ConnectorConfigError(
                        f"stdio connector '{spec.id}' declares egress but no egress proxy runs"
                    )
                plan_sandbox(spec, self._env, support=support)  # fail early on bad paths
                self._sandboxed = True
            elif box.mode is SandboxMode.REQUIRED:
                raise SandboxUnavailable(
                    f"stdio connector '{spec.id}' requires a sandbox: {support.reason}"
                )
            else:
                logger.warning(
                    "SANDBOX UNAVAILABLE: stdio connector runs unsandboxed",
                    extra={"connector": spec.id, "reason": support.reason},
                )

    @property
    def sandboxed(self) -> bool:
        """Whether each spawn runs inside the bubblewrap jail."""
        return self._sandboxed

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

        direct = DirectCalls()
        transport = _child_transport(self, died, direct)
        client = self._client(transport)
        link = Link(client, direct)
        holder.append(link)
        await stack.enter_async_context(client)
        return link


_Streams = tuple[
    MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]
]


@asynccontextmanager
async def _child_transport(
    owner: StdioConnector, died: Callable[[str], None], direct: DirectCalls
) -> AsyncIterator[_Streams]:
    describe = owner._describe()  # pyright: ignore[reportPrivateUsage]
    async with AsyncExitStack() as stack:
        argv, env, cwd = await _launch(owner, stack)
        process = await anyio.open_process(argv, env=env, cwd=cwd, start_new_session=True)
        async with _supervised(owner, process, describe, died, direct) as streams:
            yield streams


async def _launch(
    owner: StdioConnector, stack: AsyncExitStack
) -> tuple[list[str], dict[str, str], str | None]:
    """The argv, environment and cwd of one spawn: provenance checked, jailed when configured."""
    spec = owner.spec
    env: dict[str, str] = owner._env  # pyright: ignore[reportPrivateUsage]
    if spec.expected_provenance is not None:
        seen = await anyio.to_thread.run_sync(connector_provenance, spec, env)
        if seen.digest != spec.expected_provenance:
            logger.error(
                "stdio server provenance changed",
                extra={
                    "connector": spec.id,
                    "expected": spec.expected_provenance,
                    "seen": seen.digest,
                },
            )
            raise ProvenanceChanged(
                f"stdio server '{spec.id}' is not what was approved: provenance "
                f"{seen.digest[:12]} != approved {spec.expected_provenance[:12]}"
            )
    box = spec.sandbox
    if box is None or box.mode is SandboxMode.OFF or not owner.sandboxed:
        if box is not None and box.mode is SandboxMode.AUTO:
            logger.warning(
                "SANDBOX UNAVAILABLE: spawning unsandboxed", extra={"connector": spec.id}
            )
        prefix = [SETPRIV, "--pdeathsig", "KILL", "--"] if os.access(SETPRIV, os.X_OK) else []
        return [*prefix, spec.command, *spec.args], env, spec.cwd
    socket_path: str | None = None
    if box.egress is not None:
        proxy = owner._egress  # pyright: ignore[reportPrivateUsage]
        if proxy is None:  # checked at construction; kept for the type checker
            raise ConnectorConfigError(f"stdio connector '{spec.id}' has no egress proxy")
        listener: EgressListener = await proxy.listen(spec.id, box.egress)
        stack.push_async_callback(listener.aclose)
        socket_path = listener.path
    plan = plan_sandbox(spec, env, egress_socket=socket_path)
    logger.info("stdio server sandboxed", extra={"connector": spec.id, "network": plan.network})
    return list(plan.argv), dict(plan.env), None


@asynccontextmanager
async def _supervised(
    owner: StdioConnector,
    process: anyio.abc.Process,
    describe: str,
    died: Callable[[str], None],
    direct: DirectCalls,
) -> AsyncIterator[_Streams]:
    spec = owner.spec
    owner._pid = process.pid  # pyright: ignore[reportPrivateUsage]
    extra = {"connector": spec.id, "pid": process.pid}
    logger.info("stdio server started", extra=extra)
    to_session, from_child = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    to_child, from_session = anyio.create_memory_object_stream[SessionMessage](0)
    if process.stdin is not None:
        direct.attach(process.stdin)

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
                        if line.strip() and not direct.offer(line):
                            await to_session.send(_parse(line))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        direct.close()
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
