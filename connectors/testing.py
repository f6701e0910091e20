"""Shipped test helpers: the `check_connector` conformance suite and the `EchoConnector` fake.

Every connector kind, the fake included, must pass `check_connector`, so the fake cannot drift
from the real ones. The suite needs the downstream to serve the *conformance tools*:

- ``echo(text: str)``: returns ``text`` as its only text content;
- ``fail(message: str)``: a tool error (``is_error``) whose text contains ``message``;
- ``sleep(seconds: float)``: waits, then returns ``"slept"``.

Imports no test framework; failures are `AssertionError`s.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import mcp.types as types

from connectors.base import ChangeKind, Connector, NativeSpec
from connectors.errors import CallTimeout, ConnectorClosed
from connectors.native import NativeConnector, ToolError, ToolSet

__all__ = ["EchoConnector", "check_connector", "conformance_toolset"]

STEP_LIMIT = 30.0
"""Seconds any one step of the suite may take (a spawn on a loaded 2-core machine included)."""


def conformance_toolset() -> ToolSet:
    """A fresh ToolSet with the three conformance tools."""
    tools = ToolSet()

    @tools.tool
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @tools.tool
    async def fail(message: str = "failed") -> str:
        """Always fail with a tool error carrying the message."""
        raise ToolError(message)

    @tools.tool
    async def sleep(seconds: float) -> str:
        """Wait for the given number of seconds."""
        await anyio.sleep(seconds)
        return "slept"

    return tools


class EchoConnector(NativeConnector):
    """An in-memory connector serving the conformance tools; `emit` fakes downstream changes."""

    def __init__(self, id: str = "echo", *, call_timeout: float = 30.0) -> None:
        spec = NativeSpec(id=id, target="<in-memory>", call_timeout=call_timeout)
        super().__init__(spec, conformance_toolset())

    async def emit(self, kind: ChangeKind) -> None:
        """Tell listeners that ``kind`` changed, as a downstream notification would."""
        for listener in list(self._listeners):
            await listener(kind)


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


async def check_connector(make: Callable[[], Connector]) -> None:
    """Run the conformance suite against a fresh connector from ``make`` (not yet started).

    Checks: start is idempotent; the conformance tools are listed; a call returns its result; a
    tool error is a result, not an exception; a deadline raises `CallTimeout` promptly and the
    connector still works afterwards; `aclose` is idempotent; every call after it raises
    `ConnectorClosed`.

    Raises:
        AssertionError: the connector broke the contract (the message says where).
    """
    connector = make()
    _expect(isinstance(connector, Connector), "does not implement the Connector protocol")
    try:
        with anyio.fail_after(STEP_LIMIT):
            await connector.start()
            await connector.start()
        with anyio.fail_after(STEP_LIMIT):
            names = {tool.name for tool in await connector.list_tools()}
        _expect({"echo", "fail", "sleep"} <= names, f"conformance tools missing from {names}")

        with anyio.fail_after(STEP_LIMIT):
            result = await connector.call_tool("echo", {"text": "hello"})
        _expect(not result.is_error, "echo returned an error")
        _expect(_text(result) == "hello", f"echo returned {_text(result)!r}")

        with anyio.fail_after(STEP_LIMIT):
            result = await connector.call_tool("fail", {"message": "expected failure"})
        _expect(result.is_error is True, "a tool error did not come back as is_error")
        _expect("expected failure" in _text(result), "the tool error lost its message")

        started = anyio.current_time()
        timed_out = False
        with anyio.fail_after(STEP_LIMIT):
            try:
                await connector.call_tool("sleep", {"seconds": 60}, timeout=0.5)
            except CallTimeout:
                timed_out = True
        _expect(timed_out, "a call past its deadline did not raise CallTimeout")
        _expect(anyio.current_time() - started < 5.0, "CallTimeout came long after the deadline")

        with anyio.fail_after(STEP_LIMIT):
            result = await connector.call_tool("echo", {"text": "still here"})
        _expect(_text(result) == "still here", "the connector did not recover from a timeout")
    finally:
        with anyio.fail_after(STEP_LIMIT):
            await connector.aclose()
    with anyio.fail_after(STEP_LIMIT):
        await connector.aclose()

    for attempt in (
        lambda: connector.call_tool("echo", {"text": "closed"}),
        connector.list_tools,
        connector.start,
    ):
        closed = False
        with anyio.fail_after(STEP_LIMIT):
            try:
                await attempt()
            except ConnectorClosed:
                closed = True
        _expect(closed, "a call after aclose() did not raise ConnectorClosed")


TARGET_TOOLS = conformance_toolset()
"""The conformance tools by target: ``NativeSpec(target="connectors.testing:TARGET_TOOLS")``."""
