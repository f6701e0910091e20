"""Tool calls on a stdio child without the SDK session: one JSON line out, one line back.

A ``tools/call`` through the SDK's client session builds and dumps request models, hands the
message through two memory streams and a dispatcher task, and validates the answer twice (as a
JSON-RPC message, then as a result): about a third of a millisecond of the broker's CPU per call
on the hot path, for work a plain request needs none of. `DirectCalls` writes the request line
straight to the child's stdin and the stdout reader hands it the answer line before the SDK
would parse it.

What stays the SDK's: the handshake, every other request, notifications, requests from the
server (sampling, elicitation, roots), and every call that wants progress (its notifications are
routed by the SDK's progress-token table). The decisions here, made to behave exactly as the SDK
path does for the caller:

- ids are strings ``"broker-N"``; the SDK numbers its own requests with integers, so an answer
  can never be claimed by the wrong side;
- cancellation (the caller's deadline or cancel scope) sends ``notifications/cancelled`` for
  the request, shielded and bounded, as the SDK does;
- the child dying fails every waiting call with `anyio.BrokenResourceError`, which the connector
  maps onto ``ConnectorBroken`` with the exit reason, as it does for the SDK's closed session;
- an error answer raises `DownstreamError` with the server's code and message;
- an answer holding ``NaN`` or ``Infinity`` (not JSON; the record could not hold them) raises
  `InvalidAnswer`, one that is not a `CallToolResult` pydantic's ``ValidationError``; the
  connector reports both as an invalid result.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import anyio
import anyio.abc
import mcp.types as types

from connectors.base import JSONValue
from connectors.errors import DownstreamError

__all__ = ["DirectCalls", "InvalidAnswer"]

_ID_PREFIX = "broker-"
_MARK = b'"' + _ID_PREFIX.encode()
_CANCEL_WRITE_TIMEOUT = 1.0
"""How long a cancelled call may spend telling the child; a stuck pipe must not hold it."""


def _line(message: Mapping[str, Any]) -> bytes:
    """One JSON-RPC message as the stdio transport frames it: compact JSON and a newline."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class InvalidAnswer(ValueError):
    """The child's answer to a direct call is not a JSON-RPC answer the broker can use."""


class _Waiter:
    __slots__ = ("answer", "done", "not_json")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.answer: dict[str, Any] | None = None
        self.not_json = False


class DirectCalls:
    """The direct ``tools/call`` channel of one child process (one link)."""

    def __init__(self) -> None:
        self._stdin: anyio.abc.ByteSendStream | None = None
        self._pending: dict[str, _Waiter] = {}
        self._ids = itertools.count(1)
        self._closed = False

    def attach(self, stdin: anyio.abc.ByteSendStream) -> None:
        """Write requests to ``stdin`` (the child's, shared with the SDK's writer)."""
        self._stdin = stdin

    def close(self) -> None:
        """The child is gone: every waiting call and every later one is broken."""
        self._closed = True
        for waiter in self._pending.values():
            waiter.done.set()

    def offer(self, line: bytes) -> bool:
        """Take ``line`` if it answers one of our calls; False leaves it to the SDK."""
        if not self._pending or _MARK not in line:
            return False
        constants: list[str] = []

        def constant(name: str) -> None:
            constants.append(name)

        try:
            message = json.loads(line, parse_constant=constant)
        except ValueError:
            return False
        if not isinstance(message, dict) or "method" in message:
            return False
        key = message.get("id")
        waiter = self._pending.get(key) if isinstance(key, str) else None
        if waiter is None:
            return False
        waiter.answer = message
        waiter.not_json = bool(constants)
        waiter.done.set()
        return True

    async def call_tool(
        self, name: str, arguments: Mapping[str, JSONValue]
    ) -> types.CallToolResult:
        """Send ``tools/call`` and wait for its answer (the caller bounds the wait).

        Raises:
            anyio.BrokenResourceError: the child is gone (or was never attached).
            DownstreamError: the server answered with a JSON-RPC error.
            InvalidAnswer: the answer is malformed.
            pydantic.ValidationError: the result is not a valid ``CallToolResult``.
        """
        stdin = self._stdin
        if stdin is None or self._closed:
            raise anyio.BrokenResourceError
        request_id = f"{_ID_PREFIX}{next(self._ids)}"
        request = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
        waiter = _Waiter()
        self._pending[request_id] = waiter
        try:
            await stdin.send(_line(request))
            await waiter.done.wait()
        except anyio.get_cancelled_exc_class():
            if waiter.answer is None and not self._closed:
                await self._cancel(stdin, request_id)
            raise
        finally:
            del self._pending[request_id]
        answer = waiter.answer
        if answer is None:
            raise anyio.BrokenResourceError
        error = answer.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise InvalidAnswer("the error answer is not an object")
            code = error.get("code")
            message = error.get("message")
            raise DownstreamError(
                message if isinstance(message, str) else "the server refused the call",
                code=code if isinstance(code, int) else types.INTERNAL_ERROR,
            )
        if waiter.not_json:
            raise InvalidAnswer("the answer holds NaN or Infinity, which JSON does not have")
        return types.CallToolResult.model_validate(answer.get("result"))

    async def _cancel(self, stdin: anyio.abc.ByteSendStream, request_id: str) -> None:
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": "the caller cancelled the call"},
        }
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_CANCEL_WRITE_TIMEOUT),
            suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await stdin.send(_line(note))
