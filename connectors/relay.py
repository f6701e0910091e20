"""Per-call relays: what a downstream MCP server may send back to the caller during one tool call.

An MCP connector's session is shared by every caller, so a log notification or a
server-to-client request (sampling, elicitation) that a downstream server sends while a tool
call runs is not tagged with the call it belongs to. The caller (the broker's front) states,
for the duration of one `Connector.call_tool`, where such traffic may go::

    with relaying(CallRelay(owner="agent-1", log=..., sampling=..., elicitation=...)):
        await connector.call_tool(...)

The connector registers the relay while the call is in flight and routes by a fail-closed
rule (`InFlight.route`): traffic goes to a call only when it is unambiguous, i.e. every call in
flight on that connector carries a relay of the same ``owner`` (a downstream server cannot be
made to reach another owner's caller); the most recent such call is used. Otherwise a log
message is dropped and a request is refused with an error to the downstream server. A relay
whose ``sampling`` / ``elicitation`` is None refuses those requests.

Imports mcp, stdlib only; never `broker`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import mcp.types as types

__all__ = [
    "CallRelay",
    "ElicitationRelay",
    "InFlight",
    "LogRelay",
    "SamplingRelay",
    "current_relay",
    "relaying",
]

LogRelay = Callable[[types.LoggingMessageNotificationParams], Awaitable[None]]
SamplingRelay = Callable[
    [types.CreateMessageRequestParams],
    Awaitable[types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData],
]
ElicitationRelay = Callable[
    [types.ElicitRequestParams], Awaitable[types.ElicitResult | types.ErrorData]
]


@dataclass(frozen=True, slots=True, eq=False)
class CallRelay:
    """Where one call's downstream log messages and requests go; ``owner`` names the caller."""

    owner: str
    log: LogRelay | None = None
    sampling: SamplingRelay | None = None
    elicitation: ElicitationRelay | None = None


current_relay: ContextVar[CallRelay | None] = ContextVar("connectors_call_relay", default=None)


@contextmanager
def relaying(relay: CallRelay | None) -> Iterator[None]:
    """Make ``relay`` the relay of the calls made in this block (this task and its children)."""
    token = current_relay.set(relay)
    try:
        yield
    finally:
        current_relay.reset(token)


class InFlight:
    """The calls in flight on one connector, each with its relay (or None)."""

    def __init__(self) -> None:
        self._calls: list[CallRelay | None] = []

    @contextmanager
    def call(self, relay: CallRelay | None) -> Iterator[None]:
        entry: list[CallRelay | None] = [relay]
        self._calls.append(entry[0])
        try:
            yield
        finally:
            # Remove this very entry (by identity: None entries are interchangeable).
            for i in range(len(self._calls) - 1, -1, -1):
                if self._calls[i] is entry[0]:
                    del self._calls[i]
                    break

    def __len__(self) -> int:
        return len(self._calls)

    def route(self) -> CallRelay | None:
        """The relay downstream traffic may go to now, or None when it must not go anywhere.

        None unless at least one call is in flight and all of them carry relays of one owner.
        """
        if not self._calls:
            return None
        owners = {relay.owner if relay is not None else None for relay in self._calls}
        if len(owners) != 1 or None in owners:
            return None
        return self._calls[-1]
